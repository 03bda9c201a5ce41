/* A stand-in libcuda.so.1 for `validate` on a machine without a GPU (a mock: there is no
 * GPU here, and there cannot be one). It has the CUDA driver API calls validate makes, with
 * their real signatures, error codes and error names, and it does their work honestly:
 *   - "device memory" is host memory it allocated; every copy, free and kernel argument is
 *     checked against the live allocations (a wrong size or pointer is an error, as on a GPU);
 *   - a module is the PTX text it was loaded from; cuModuleGetFunction finds only an entry
 *     that text declares (`.entry NAME(`);
 *   - cuLaunchKernel of the `vector_add` entry does on the host what that kernel does on a
 *     GPU, c[i] = a[i] + b[i] for every thread i < n of the grid it was launched with, on the
 *     arguments it was passed; so a wrong argument order, size, grid or copy in validate
 *     gives a wrong result that validate's element check must catch.
 * Environment: FAKE_CUDA_DEVICES=N devices (default 1; 0: cuInit says CUDA_ERROR_NO_DEVICE,
 * as the real library does without a GPU), device I with the UUID 5eed0000-0000-0000-0000-I
 * (I in 12 hex digits); FAKE_CUDA_MIG=MIG-UUID,...: the MIG devices of the node's
 * MIG-enabled GPUs, which (as NVIDIA's MIG user guide says under "CUDA Device Enumeration")
 * CUDA enumerates only when CUDA_VISIBLE_DEVICES names one, and then that one alone (a
 * process enumerates a single MIG device; CUDA_VISIBLE_DEVICES naming no device it has:
 * cuInit says CUDA_ERROR_NO_DEVICE); FAKE_CUDA_EXCLUSIVE=I,...: devices in exclusive-process
 * compute mode (cuDeviceGetAttribute's CU_DEVICE_ATTRIBUTE_COMPUTE_MODE says
 * CU_COMPUTEMODE_EXCLUSIVE_PROCESS) and FAKE_CUDA_HELD=I,...: of those, the ones another
 * process has a context on, where cuCtxCreate says CUDA_ERROR_DEVICE_UNAVAILABLE (cuda.h:
 * "Devices are often unavailable due to use of CU_COMPUTEMODE_EXCLUSIVE_PROCESS or
 * CU_COMPUTEMODE_PROHIBITED"; the runtime calls the same code 46
 * cudaErrorDevicesUnavailable); FAKE_CUDA_CORRUPT=1 flips a byte on the way back;
 * FAKE_CUDA_WRONG=I makes the kernel's element I wrong; FAKE_CUDA_FAIL=NAME:CODE makes the
 * call NAME return CODE; FAKE_CUDA_REPORT=FILE: at exit, what was never freed is written
 * there ("contexts=C modules=M allocations=A"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct context *CUcontext;
typedef struct module *CUmodule;
typedef struct function *CUfunction;
typedef void *CUstream;
typedef struct { char bytes[16]; } CUuuid;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    DEVICE_UNAVAILABLE = 46,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    NOT_SUPPORTED = 801,
};

static const struct {
    CUresult code;
    const char *name, *text;
} errors[] = {
    {SUCCESS, "CUDA_SUCCESS", "no error"},
    {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {DEVICE_UNAVAILABLE, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"},
    {NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
};

struct context { CUdevice device; };
struct module { char *ptx; };
struct function { CUmodule module; char name[64]; };

#define MAX_ALLOCATIONS 64
static struct { CUdeviceptr start; size_t size; } allocations[MAX_ALLOCATIONS];
static int initialized, live_contexts, live_modules, live_allocations;
static CUcontext current;

/* cuda.h: CU_DEVICE_ATTRIBUTE_COMPUTE_MODE and the CUcomputemode values. */
enum { ATTRIBUTE_COMPUTE_MODE = 20 };
enum { COMPUTEMODE_DEFAULT = 0, COMPUTEMODE_EXCLUSIVE_PROCESS = 3 };

/* Whether the comma-separated list in environment variable `name` has `item`. */
static int listed(const char *name, const char *item) {
    const char *list = getenv(name);
    size_t len = strlen(item);
    for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (strncmp(p, item, len) == 0 && (p[len] == ',' || p[len] == '\0')) return 1;
    return 0;
}

static int listed_ordinal(const char *name, int ordinal) {
    char item[16];
    snprintf(item, sizeof item, "%d", ordinal);
    return listed(name, item);
}

/* The MIG device CUDA_VISIBLE_DEVICES names (an existing one), else NULL. */
static const char *visible_mig(void) {
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    return visible && strncmp(visible, "MIG-", 4) == 0 && listed("FAKE_CUDA_MIG", visible)
               ? visible
               : NULL;
}

static int devices(void) {
    if (visible_mig()) return 1;
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    if (visible && strncmp(visible, "MIG-", 4) == 0) return 0; /* names no device here */
    const char *n = getenv("FAKE_CUDA_DEVICES");
    return n ? atoi(n) : 1;
}

/* The code FAKE_CUDA_FAIL names for `call`, else 0. */
static CUresult fault(const char *call) {
    const char *spec = getenv("FAKE_CUDA_FAIL");
    size_t len = strlen(call);
    if (spec && strncmp(spec, call, len) == 0 && spec[len] == ':') return atoi(spec + len + 1);
    return SUCCESS;
}

#define ENTER(call)                                   \
    do {                                              \
        CUresult injected = fault(call);              \
        if (injected) return injected;                \
        if (!initialized) return NOT_INITIALIZED;     \
    } while (0)
#define IN_CONTEXT(call)                              \
    do {                                              \
        ENTER(call);                                  \
        if (!current) return INVALID_CONTEXT;         \
    } while (0)

/* Whether [p, p + size) lies in one live allocation. */
static int mapped(CUdeviceptr p, size_t size) {
    for (int i = 0; i < MAX_ALLOCATIONS; i++)
        if (allocations[i].start && p >= allocations[i].start &&
            p + size <= allocations[i].start + allocations[i].size)
            return 1;
    return 0;
}

static void report(void) __attribute__((destructor));
static void report(void) {
    const char *path = getenv("FAKE_CUDA_REPORT");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (!f) return;
    fprintf(f, "contexts=%d modules=%d allocations=%d\n", live_contexts, live_modules,
            live_allocations);
    fclose(f);
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == error) return *name = errors[i].name, SUCCESS;
    *name = NULL;
    return INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == error) return *text = errors[i].text, SUCCESS;
    *text = NULL;
    return INVALID_VALUE;
}

CUresult cuInit(unsigned int flags) {
    CUresult injected = fault("cuInit");
    if (injected) return injected;
    if (flags != 0) return INVALID_VALUE;
    if (devices() == 0) return NO_DEVICE;
    initialized = 1;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    *version = 12020;
    return fault("cuDriverGetVersion");
}

CUresult cuDeviceGetCount(int *count) {
    ENTER("cuDeviceGetCount");
    *count = devices();
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    ENTER("cuDeviceGet");
    if (ordinal < 0 || ordinal >= devices()) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    ENTER("cuDeviceGetName");
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    if (len <= 0) return INVALID_VALUE;
    strncpy(name, visible_mig() ? "NVIDIA H200 MIG 1g.18gb" : "NVIDIA H200", (size_t)len - 1);
    name[len - 1] = '\0';
    return SUCCESS;
}

/* The 16 bytes of the device's UUID; a MIG device's is its MIG UUID (MIG-<these bytes>). */
CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice device) {
    ENTER("cuDeviceGetUuid_v2");
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    char text[40];
    const char *mig = visible_mig();
    if (mig)
        snprintf(text, sizeof text, "%s", mig + 4);
    else
        snprintf(text, sizeof text, "5eed0000-0000-0000-0000-%012x", (unsigned)device);
    for (int i = 0, j = 0; i < 16; i++, j += 2) {
        if (text[j] == '-') j++;
        unsigned byte;
        if (sscanf(text + j, "%2x", &byte) != 1) return INVALID_VALUE;
        uuid->bytes[i] = (char)byte;
    }
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    ENTER("cuDeviceGetAttribute");
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    if (attribute != ATTRIBUTE_COMPUTE_MODE) return INVALID_VALUE; /* the one validate asks */
    *value = !visible_mig() && listed_ordinal("FAKE_CUDA_EXCLUSIVE", device)
                 ? COMPUTEMODE_EXCLUSIVE_PROCESS
                 : COMPUTEMODE_DEFAULT;
    return SUCCESS;
}

CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned int flags, CUdevice device) {
    ENTER("cuCtxCreate_v2");
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    (void)flags;
    if (!visible_mig() && listed_ordinal("FAKE_CUDA_EXCLUSIVE", device) &&
        listed_ordinal("FAKE_CUDA_HELD", device))
        return DEVICE_UNAVAILABLE; /* another process has its one context */
    *ctx = current = malloc(sizeof **ctx);
    current->device = device;
    live_contexts++;
    return SUCCESS;
}

CUresult cuCtxDestroy_v2(CUcontext ctx) {
    ENTER("cuCtxDestroy_v2");
    if (!ctx) return INVALID_CONTEXT;
    if (ctx == current) current = NULL;
    free(ctx);
    live_contexts--;
    return SUCCESS;
}

CUresult cuCtxSynchronize(void) {
    IN_CONTEXT("cuCtxSynchronize");
    return SUCCESS;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image) {
    IN_CONTEXT("cuModuleLoadData");
    if (!image || strstr(image, ".entry") == NULL) return INVALID_IMAGE;
    *module = malloc(sizeof **module);
    (*module)->ptx = strdup(image);
    live_modules++;
    return SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
    IN_CONTEXT("cuModuleUnload");
    if (!module) return INVALID_HANDLE;
    free(module->ptx);
    free(module);
    live_modules--;
    return SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
    IN_CONTEXT("cuModuleGetFunction");
    if (!module) return INVALID_HANDLE;
    size_t len = strlen(name);
    if (len >= sizeof (*function)->name) return NOT_FOUND;
    for (const char *p = strstr(module->ptx, ".entry"); p; p = strstr(p + 1, ".entry")) {
        const char *q = p + strlen(".entry");
        while (*q == ' ' || *q == '\t') q++;
        if (strncmp(q, name, len) == 0 && (q[len] == '(' || q[len] == ' ' || q[len] == '\n')) {
            *function = malloc(sizeof **function); /* freed with the process, as CUDA's */
            (*function)->module = module;
            strcpy((*function)->name, name);
            return SUCCESS;
        }
    }
    return NOT_FOUND;
}

CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t size) {
    IN_CONTEXT("cuMemAlloc_v2");
    if (size == 0) return INVALID_VALUE;
    for (int i = 0; i < MAX_ALLOCATIONS; i++) {
        if (allocations[i].start) continue;
        void *memory = malloc(size);
        if (!memory) return OUT_OF_MEMORY;
        allocations[i].start = *pointer = (CUdeviceptr)(size_t)memory;
        allocations[i].size = size;
        live_allocations++;
        return SUCCESS;
    }
    return OUT_OF_MEMORY;
}

CUresult cuMemFree_v2(CUdeviceptr pointer) {
    IN_CONTEXT("cuMemFree_v2");
    for (int i = 0; i < MAX_ALLOCATIONS; i++) {
        if (allocations[i].start != pointer || !pointer) continue;
        free((void *)(size_t)pointer);
        allocations[i].start = 0;
        live_allocations--;
        return SUCCESS;
    }
    return INVALID_VALUE;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t size) {
    IN_CONTEXT("cuMemcpyHtoD_v2");
    if (!mapped(dst, size) || !src) return INVALID_VALUE;
    memcpy((void *)(size_t)dst, src, size);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t size) {
    IN_CONTEXT("cuMemcpyDtoH_v2");
    if (!mapped(src, size) || !dst) return INVALID_VALUE;
    memcpy(dst, (const void *)(size_t)src, size);
    if (getenv("FAKE_CUDA_CORRUPT") && size) ((unsigned char *)dst)[size / 2] ^= 0xff;
    return SUCCESS;
}

/* vector_add(const float *a, const float *b, float *c, unsigned n), as the PTX kernel. */
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream stream,
                        void **params, void **extra) {
    IN_CONTEXT("cuLaunchKernel");
    if (!f || !f->module) return INVALID_HANDLE;
    if (strcmp(f->name, "vector_add") != 0) return NOT_SUPPORTED; /* the one kernel it can run */
    if (!params || extra || stream || shared) return INVALID_VALUE;
    if (!gx || !gy || !gz || !bx || !by || !bz || (size_t)bx * by * bz > 1024) return INVALID_VALUE;
    CUdeviceptr a = *(CUdeviceptr *)params[0], b = *(CUdeviceptr *)params[1],
                c = *(CUdeviceptr *)params[2];
    unsigned n = *(unsigned *)params[3];
    size_t threads = (size_t)gx * bx, used = threads < n ? threads : n;
    if (used && (!mapped(a, used * 4) || !mapped(b, used * 4) || !mapped(c, used * 4)))
        return ILLEGAL_ADDRESS;
    const float *fa = (const float *)(size_t)a, *fb = (const float *)(size_t)b;
    float *fc = (float *)(size_t)c;
    for (size_t i = 0; i < used; i++) fc[i] = fa[i] + fb[i];
    const char *wrong = getenv("FAKE_CUDA_WRONG");
    if (wrong && (size_t)atol(wrong) < used) fc[atol(wrong)] += 1.0f;
    return SUCCESS;
}
