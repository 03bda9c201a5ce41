/*
 * Stand-in NVIDIA driver: /proc/driver/nvidia/{version,params} and
 * gpus/<bus id>/information of its one pretended GPU, in the real driver's format.
 */
#include <linux/kernel.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

#include "nv-linux.h"
#include "nv_compiler.h"

static struct proc_dir_entry *proc_nvidia;

static int nv_procfs_read_version(struct seq_file *s, void *v)
{
    seq_printf(s, "NVRM version: %s\n", pNVRM_ID);
    seq_printf(s, "GCC version:  %s\n", NV_COMPILER);
    return 0;
}

static int nv_procfs_read_params(struct seq_file *s, void *v)
{
    seq_printf(s, "EnableGpuFirmware: %u\n", (unsigned int)NVreg_EnableGpuFirmware);
    seq_printf(s, "EnableGpuFirmwareLogs: %u\n", (unsigned int)NVreg_EnableGpuFirmwareLogs);
    seq_printf(s, "ModifyDeviceFiles: %u\n", (unsigned int)NVreg_ModifyDeviceFiles);
    seq_printf(s, "DeviceFileUID: %u\n", (unsigned int)NVreg_DeviceFileUID);
    seq_printf(s, "DeviceFileGID: %u\n", (unsigned int)NVreg_DeviceFileGID);
    seq_printf(s, "DeviceFileMode: %u\n", (unsigned int)NVreg_DeviceFileMode);
    seq_printf(s, "OpenRmEnableUnsupportedGpus: %u\n",
               (unsigned int)NVreg_OpenRmEnableUnsupportedGpus);
    seq_printf(s, "RegistryDwords: \"%s\"\n", NVreg_RegistryDwords ? NVreg_RegistryDwords : "");
    return 0;
}

static int nv_procfs_read_gpu_info(struct seq_file *s, void *v)
{
    seq_printf(s, "Model: \t\t NVIDIA stand-in GPU\n");
    seq_printf(s, "Bus Type: \t PCIe\n");
    seq_printf(s, "Bus Location: \t 0000:00:00.0\n");
    seq_printf(s, "Device Minor: \t 0\n");
    seq_printf(s, "GPU Excluded:\t No\n");
    return 0;
}

int nv_procfs_init(void)
{
    struct proc_dir_entry *gpu;

    proc_nvidia = proc_mkdir("driver/nvidia", NULL);
    if (proc_nvidia == NULL)
        return -ENOMEM;
    if (proc_create_single("version", 0444, proc_nvidia, nv_procfs_read_version) == NULL ||
        proc_create_single("params", 0444, proc_nvidia, nv_procfs_read_params) == NULL ||
        proc_mkdir("gpus", proc_nvidia) == NULL ||
        (gpu = proc_mkdir("gpus/0000:00:00.0", proc_nvidia)) == NULL ||
        proc_create_single("information", 0444, gpu, nv_procfs_read_gpu_info) == NULL) {
        proc_remove(proc_nvidia);
        proc_nvidia = NULL;
        return -ENOMEM;
    }
    return 0;
}

void nv_procfs_exit(void)
{
    proc_remove(proc_nvidia);
    proc_nvidia = NULL;
}
