/*
 * Stand-in for NVIDIA's kernel mode setting core, nv-modeset-kernel.o_binary:
 * the OS-agnostic part of nvidia-modeset.ko, compiled without any kernel
 * header. The interface calls nvKms* entry points; the core logs through
 * nvkms_log(), which the interface defines. Built by tests/standin/tree.py.
 */
#include "nv-standin-core.h"

#ifndef NV_VERSION_STRING
#error "NV_VERSION_STRING must be defined"
#endif

static int nvkms_loaded;

int nvKmsModuleLoad(void)
{
    if (nvkms_loaded)
        return -1;
    nvkms_loaded = 1;
    nvkms_log(NV_STANDIN_LOG_INFO, (const char *)0,
              "Loading NVIDIA Kernel Mode Setting Driver for UNIX platforms  " NV_VERSION_STRING);
    return 0;
}

void nvKmsModuleUnload(void)
{
    nvkms_loaded = 0;
}

const char *nvKmsVersionString(void)
{
    return NV_VERSION_STRING;
}
