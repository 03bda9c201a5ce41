/* Stand-in NVIDIA driver: declarations shared by nvidia.ko's interface files. */
#ifndef NV_LINUX_H
#define NV_LINUX_H

#include "nv-standin.h"
#include "nv-standin-core.h"

/* Module parameters (nv.c), as NVIDIA names them: NVreg_<key>. */
extern int NVreg_EnableGpuFirmware;
extern int NVreg_EnableGpuFirmwareLogs;
extern int NVreg_ModifyDeviceFiles;
extern int NVreg_DeviceFileUID;
extern int NVreg_DeviceFileGID;
extern int NVreg_DeviceFileMode;
extern int NVreg_OpenRmEnableUnsupportedGpus;
extern int NVreg_StandinNoGpu;
extern int NVreg_StandinGspFirmware;
extern char *NVreg_RegistryDwords;

int nvidia_init_module(void);
void nvidia_exit_module(void);

int nv_procfs_init(void);
void nv_procfs_exit(void);

int nv_caps_init(void);
void nv_caps_exit(void);

#endif /* NV_LINUX_H */
