/* A stand-in libcuda.so.1 for `validate` on a machine without a GPU (a mock: there is
 * no GPU here). It has the few CUDA driver API calls validate makes, with their real
 * signatures; "device memory" is host memory. FAKE_CUDA_DEVICES sets the device count
 * (default 1), FAKE_CUDA_CORRUPT=1 flips one byte on the way back. */
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

static int devices(void) {
    const char *n = getenv("FAKE_CUDA_DEVICES");
    return n ? atoi(n) : 1;
}

CUresult cuInit(unsigned int flags) { return flags == 0 ? 0 : 1; }
CUresult cuDriverGetVersion(int *version) { *version = 12020; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = devices(); return 0; }

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (ordinal < 0 || ordinal >= devices()) return 101; /* CUDA_ERROR_INVALID_DEVICE */
    *device = ordinal;
    return 0;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    (void)device;
    strncpy(name, "NVIDIA H200", (size_t)len - 1);
    name[len - 1] = '\0';
    return 0;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
    *text = error == 101 ? "invalid device ordinal" : "unknown error";
    return 0;
}

CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned int flags, CUdevice device) {
    (void)flags;
    (void)device;
    *ctx = malloc(1);
    return 0;
}

CUresult cuCtxDestroy_v2(CUcontext ctx) { free(ctx); return 0; }

CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t size) {
    *pointer = (CUdeviceptr)(size_t)malloc(size);
    return *pointer ? 0 : 2; /* CUDA_ERROR_OUT_OF_MEMORY */
}

CUresult cuMemFree_v2(CUdeviceptr pointer) { free((void *)(size_t)pointer); return 0; }

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t size) {
    memcpy((void *)(size_t)dst, src, size);
    return 0;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t size) {
    memcpy(dst, (const void *)(size_t)src, size);
    if (getenv("FAKE_CUDA_CORRUPT") && size) ((unsigned char *)dst)[size / 2] ^= 0xff;
    return 0;
}
