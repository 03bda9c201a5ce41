/*
 * Stand-in NVIDIA driver: nvidia-modeset.ko's kernel interface layer. It is a
 * client of nvidia.ko (uses its exported symbols, so it depends on nvidia)
 * and links the precompiled core nv-modeset-kernel.o_binary.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/init.h>
#include <linux/errno.h>

#include "nv-standin.h"
#include "nv-standin-core.h"

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Stand-in for NVIDIA's kernel mode setting driver (tests only)");
MODULE_INFO(supported, "external");
MODULE_VERSION(NV_VERSION_STRING);

/* Called by the core (nv-modeset-kernel.o_binary). */
void nvkms_log(const int level, const char *gpuPrefix, const char *msg)
{
    if (gpuPrefix == NULL)
        gpuPrefix = "";
    if (level == NV_STANDIN_LOG_ERROR)
        printk(KERN_ERR "nvidia-modeset: ERROR: %s%s\n", gpuPrefix, msg);
    else
        printk(KERN_INFO "nvidia-modeset: %s%s\n", gpuPrefix, msg);
}

static int __init nvkms_init(void)
{
    int rc;

    rc = nvidia_standin_register_client("nvidia-modeset");
    if (rc < 0)
        return rc;

    if (nvKmsModuleLoad() != 0) {
        nvidia_standin_unregister_client("nvidia-modeset");
        return -EINVAL;
    }
    return 0;
}

static void __exit nvkms_exit(void)
{
    nvKmsModuleUnload();
    nvidia_standin_unregister_client("nvidia-modeset");
}

module_init(nvkms_init);
module_exit(nvkms_exit);
