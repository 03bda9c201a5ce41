/*
 * Stand-in NVIDIA driver: symbols the modules export to each other.
 * Kernel interface layer only (needs no kernel header itself).
 */
#ifndef NV_STANDIN_H
#define NV_STANDIN_H

#define NV_MAJOR_DEVICE_NUMBER 195

/* Exported by nvidia.ko: used by nvidia-uvm, nvidia-modeset, nvidia-peermem. */
int nvidia_standin_register_client(const char *name);
void nvidia_standin_unregister_client(const char *name);

/* Exported by nvidia-modeset.ko: used by nvidia-drm. */
struct NvKmsKapiFunctionsTable {
    struct {
        const char *versionString;   /* in: the caller's NV_VERSION_STRING */
    } versionInfo;
    const char *systemInfo;          /* out: the core's version string */
};
int nvKmsKapiGetFunctionsTable(struct NvKmsKapiFunctionsTable *funcsTable);

#endif /* NV_STANDIN_H */
