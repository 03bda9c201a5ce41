/*
 * Stand-in NVIDIA driver: nvidia-drm.ko binds to nvidia-modeset.ko through
 * its exported kernel API (so it depends on nvidia-modeset) and, like the
 * real driver, refuses to load against an nvidia-modeset of another version.
 */
#include <linux/kernel.h>
#include <linux/errno.h>

#include "nv-standin.h"
#include "nvidia-drm-os-interface.h"

static struct NvKmsKapiFunctionsTable nvKmsFuncsTable = {
    .versionInfo = {
        .versionString = NV_VERSION_STRING,
    },
};

int nv_drm_init(void)
{
    if (!nvKmsKapiGetFunctionsTable(&nvKmsFuncsTable)) {
        printk(KERN_ERR "nvidia-drm: Version mismatch: nvidia-modeset.ko(%s) nvidia-drm.ko(%s)\n",
               nvKmsFuncsTable.versionInfo.versionString, NV_VERSION_STRING);
        return -EINVAL;
    }
    printk(KERN_INFO "nvidia-drm: Loading NVIDIA DRM driver %s (modeset=%d)\n",
           nvKmsFuncsTable.systemInfo, nv_drm_modeset_module_param ? 1 : 0);
    return 0;
}

void nv_drm_exit(void)
{
}
