/*
 * Stand-in NVIDIA driver: nvidia-drm.ko's module entry points and its
 * "modeset" parameter (bool, 0400), as NVIDIA's nvidia-drm-linux.c.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/init.h>

#include "nvidia-drm-os-interface.h"

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Stand-in for NVIDIA's DRM driver (tests only)");
MODULE_INFO(supported, "external");
MODULE_VERSION(NV_VERSION_STRING);

bool nv_drm_modeset_module_param = false;
module_param_named(modeset, nv_drm_modeset_module_param, bool, 0400);
MODULE_PARM_DESC(modeset, "Enable atomic kernel modesetting (1 = enable, 0 = disable (default))");

static int __init nv_linux_drm_init(void)
{
    return nv_drm_init();
}

static void __exit nv_linux_drm_exit(void)
{
    nv_drm_exit();
}

module_init(nv_linux_drm_init);
module_exit(nv_linux_drm_exit);
