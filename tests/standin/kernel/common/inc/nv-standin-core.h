/*
 * Stand-in NVIDIA driver: the boundary between the kernel interface layer
 * (built by Kbuild against the kernel's headers) and the OS-agnostic cores
 * (nv-kernel.o_binary, nv-modeset-kernel.o_binary), which are compiled
 * without any kernel header, like NVIDIA's precompiled objects.
 *
 * Only plain C types here: this header is included by both sides.
 */
#ifndef NV_STANDIN_CORE_H
#define NV_STANDIN_CORE_H

#define NV_STANDIN_LOG_ERROR 0
#define NV_STANDIN_LOG_INFO  1

/* ---- nvidia.ko: entry points of the core (nv-kernel.o_binary) ---- */

/* The driver's identification, e.g. "NVIDIA UNIX x86_64 Kernel Module  535.999.01  ..." */
extern const char *pNVRM_ID;

int rm_init_rm(void);
void rm_shutdown_rm(void);
/* Number of GPUs the core found (asks the interface, nvstandin_os_count_gpus). */
unsigned int rm_probe_devices(void);
/*
 * Parse a RegistryDwords string ("Key=Value;Key2=0x10"), calling 'cb' for each
 * entry. Returns the number of entries, or -1 if the string is malformed
 * (then 'cb' may have been called for the entries before the bad one).
 */
typedef void (*rm_registry_cb)(void *ctx, const char *key, unsigned int key_len,
                               unsigned int value);
int rm_parse_registry_dwords(const char *dwords, rm_registry_cb cb, void *ctx);
int rm_register_client(void);
int rm_unregister_client(void);
unsigned int rm_client_count(void);

/* ---- nvidia.ko: callbacks the core makes into the interface ---- */

void nvstandin_os_log(int level, const char *msg);
unsigned int nvstandin_os_count_gpus(void);

/* ---- nvidia-modeset.ko: entry points of the core (nv-modeset-kernel.o_binary) ---- */

int nvKmsModuleLoad(void);
void nvKmsModuleUnload(void);
const char *nvKmsVersionString(void);

/* ---- nvidia-modeset.ko: callbacks the core makes into the interface ---- */

void nvkms_log(const int level, const char *gpuPrefix, const char *msg);

#endif /* NV_STANDIN_CORE_H */
