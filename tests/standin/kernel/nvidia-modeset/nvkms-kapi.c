/*
 * Stand-in NVIDIA driver: the kernel API nvidia-modeset.ko exports to
 * nvidia-drm.ko. As the real one, it refuses a caller of another version.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/string.h>

#include "nv-standin.h"
#include "nv-standin-core.h"

int nvKmsKapiGetFunctionsTable(struct NvKmsKapiFunctionsTable *funcsTable)
{
    const char *version = nvKmsVersionString();

    if (funcsTable == NULL || funcsTable->versionInfo.versionString == NULL ||
        strcmp(funcsTable->versionInfo.versionString, version) != 0) {
        if (funcsTable != NULL)
            funcsTable->versionInfo.versionString = version;
        return 0;
    }
    funcsTable->systemInfo = version;
    return 1;
}
EXPORT_SYMBOL(nvKmsKapiGetFunctionsTable);
