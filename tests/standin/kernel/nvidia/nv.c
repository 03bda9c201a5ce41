/*
 * Stand-in NVIDIA driver: nvidia.ko's module parameters, load and unload,
 * and the symbols exported to the other NVIDIA modules.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kernel.h>
#include <linux/errno.h>
#include <linux/string.h>
#include <linux/firmware.h>

#include "nv-linux.h"

/*
 * Parameters named and typed as NVIDIA's (NVreg_<key>, int or charp). The
 * real driver registers them with permission 0 (readable only through
 * /proc/driver/nvidia/params); the stand-in also shows them under
 * /sys/module/nvidia/parameters so that tests can see what a load applied.
 */
int NVreg_EnableGpuFirmware = 0x12;
int NVreg_EnableGpuFirmwareLogs = 0x2;
int NVreg_ModifyDeviceFiles = 1;
int NVreg_DeviceFileUID = 0;
int NVreg_DeviceFileGID = 0;
int NVreg_DeviceFileMode = 0666;
int NVreg_OpenRmEnableUnsupportedGpus = 0;
char *NVreg_RegistryDwords = NULL;
/* Stand-in only: 1 makes the load fail as the real driver's does without a GPU. */
int NVreg_StandinNoGpu = 0;
/*
 * Stand-in only: make the load fail with ENODEV after the kernel lines the
 * real driver (535.261.03, kernel-open/nvidia/nv.c and
 * src/nvidia/arch/nvalloc/unix/src/osapi.c) logs when
 *   "not-probed": its GPUs are bound to another driver (nouveau, vfio-pci);
 *   "no-gsp":     the open nvidia.ko meets a GPU without GSP (before Turing);
 *   "release":    the GPU is not supported by this driver release.
 * The GPU those lines name: 0000:<NVreg_StandinGpuBus>:00.0, 10de:<NVreg_StandinGpuDevice>.
 */
char *NVreg_StandinRefuse = NULL;
int NVreg_StandinGpuBus = 1;
int NVreg_StandinGpuDevice = 0x1db4;
/* Stand-in only: 1 = the GPU runs GSP-RM (a Hopper): its firmware is read at load. */
int NVreg_StandinGspFirmware = 0;

module_param(NVreg_EnableGpuFirmware, int, 0444);
module_param(NVreg_EnableGpuFirmwareLogs, int, 0444);
module_param(NVreg_ModifyDeviceFiles, int, 0444);
module_param(NVreg_DeviceFileUID, int, 0444);
module_param(NVreg_DeviceFileGID, int, 0444);
module_param(NVreg_DeviceFileMode, int, 0444);
module_param(NVreg_OpenRmEnableUnsupportedGpus, int, 0444);
module_param(NVreg_RegistryDwords, charp, 0444);
module_param(NVreg_StandinNoGpu, int, 0444);
MODULE_PARM_DESC(NVreg_StandinNoGpu,
                 "Stand-in only: 1 = behave as on a machine without an NVIDIA GPU (load fails, ENODEV)");
module_param(NVreg_StandinRefuse, charp, 0444);
MODULE_PARM_DESC(NVreg_StandinRefuse,
                 "Stand-in only: not-probed, no-gsp or release: fail as the real driver does");
module_param(NVreg_StandinGpuBus, int, 0444);
module_param(NVreg_StandinGpuDevice, int, 0444);
module_param(NVreg_StandinGspFirmware, int, 0444);
MODULE_PARM_DESC(NVreg_StandinGspFirmware,
                 "Stand-in only: 1 = the GPU needs GSP firmware: the load reads "
                 "nvidia/<version>/gsp_ga10x.bin and fails (EIO) without it");

/*
 * The GSP firmware as the real driver names it (nv-firmware.h: Hopper, Ada and
 * GA10x GPUs run gsp_ga10x.bin). The real driver reads it with request_firmware
 * in RmInitAdapter, when a GPU is first opened: during the load when
 * nvidia-drm's modeset opens it, else when nvidia-persistenced or nvidia-smi
 * does. The stand-in reads it at load, the earliest of these moments, and
 * fails as RmInitAdapter does without it. Not read when NVreg_EnableGpuFirmware's
 * mode (its low four bits) is 0, disabled.
 */
#define NV_GSP_FIRMWARE "nvidia/" NV_VERSION_STRING "/gsp_ga10x.bin"

static int nv_fetch_gsp_firmware(void)
{
    const struct firmware *fw;
    int rc;

    if (!NVreg_StandinGspFirmware || (NVreg_EnableGpuFirmware & 0xf) == 0)
        return 0;

    rc = request_firmware(&fw, NV_GSP_FIRMWARE, NULL);
    if (rc != 0) {
        printk(KERN_ERR "NVRM: RmFetchGspRmImages: No firmware image found (%s: error %d)\n",
               NV_GSP_FIRMWARE, rc);
        return -EIO;
    }
    printk(KERN_INFO "NVRM: GSP firmware %s: %zu bytes\n", NV_GSP_FIRMWARE, fw->size);
    release_firmware(fw);
    return 0;
}

static void nv_registry_key(void *ctx, const char *key, unsigned int key_len, unsigned int value)
{
    printk(KERN_INFO "NVRM: RegistryDwords: %.*s=0x%x\n", (int)key_len, key, value);
}

/*
 * The real driver's words for each refusal, one printk per nv_printf call as it
 * makes them (KERN_CONT, several lines in one record).
 */
static int nv_standin_refuse(const char *how)
{
    const unsigned int bus = (unsigned int)NVreg_StandinGpuBus;
    const unsigned int device = (unsigned int)NVreg_StandinGpuDevice;

    if (strcmp(how, "not-probed") == 0) {
        printk(KERN_CONT "NVRM: The NVIDIA probe routine was not called for %d device(s).\n", 1);
        printk(KERN_CONT "NVRM: This can occur when a driver such as: \n"
                         "NVRM: nouveau, rivafb, nvidiafb or rivatv "
                         "\nNVRM: was loaded and obtained ownership of the NVIDIA device(s).\n");
        printk(KERN_CONT "NVRM: Try unloading the conflicting kernel module (and/or\n"
                         "NVRM: reconfigure your kernel without the conflicting\n"
                         "NVRM: driver(s)), then try loading the NVIDIA kernel module\n"
                         "NVRM: again.\n");
        printk(KERN_CONT "NVRM: No NVIDIA devices probed.\n");
        return -ENODEV;
    }
    if (strcmp(how, "no-gsp") == 0) {
        printk(KERN_CONT "NVRM: The NVIDIA GPU %04x:%02x:%02x.%x (PCI ID: %04x:%04x)\n"
                         "NVRM: installed in this system is not supported by open\n"
                         "NVRM: nvidia.ko because it does not include the required GPU\n"
                         "NVRM: System Processor (GSP).\n"
                         "NVRM: Please see the 'Open Linux Kernel Modules' and 'GSP\n"
                         "NVRM: Firmware' sections in the driver README, available on\n"
                         "NVRM: the Linux graphics driver download page at\n"
                         "NVRM: www.nvidia.com.\n",
               0, bus, 0, 0, 0x10de, device);
    } else if (strcmp(how, "release") == 0) {
        printk(KERN_CONT "NVRM: The NVIDIA GPU %04x:%02x:%02x.%x (PCI ID: %04x:%04x)\n"
                         "NVRM: installed in this system is not supported by the\n"
                         "NVRM: NVIDIA %s driver release.\n"
                         "NVRM: Please see 'Appendix A - Supported NVIDIA GPU Products'\n"
                         "NVRM: in this release's README, available on the operating system\n"
                         "NVRM: specific graphics driver download page at www.nvidia.com.\n",
               0, bus, 0, 0, 0x10de, device, NV_VERSION_STRING);
    } else {
        printk(KERN_ERR "NVRM: stand-in: unknown NVreg_StandinRefuse \"%s\"\n", how);
        return -EINVAL;
    }
    printk(KERN_CONT "NVRM: The NVIDIA probe routine failed for %d device(s).\n", 1);
    printk(KERN_CONT "NVRM: None of the NVIDIA devices were initialized.\n");
    return -ENODEV;
}

int nvidia_init_module(void)
{
    int rc;
    unsigned int count;

    rc = rm_init_rm();
    if (rc != 0) {
        printk(KERN_ERR "NVRM: failed to initialize module.\n");
        return -EIO;
    }

    count = rm_probe_devices();
    if (count == 0) {
        printk(KERN_INFO "NVRM: No NVIDIA GPU found.\n");
        rc = -ENODEV;
        goto shutdown;
    }

    if (NVreg_StandinRefuse != NULL) {
        rc = nv_standin_refuse(NVreg_StandinRefuse);
        goto shutdown;
    }

    rc = nv_fetch_gsp_firmware();
    if (rc != 0)
        goto shutdown;

    if (NVreg_RegistryDwords != NULL &&
        rm_parse_registry_dwords(NVreg_RegistryDwords, nv_registry_key, NULL) < 0)
        printk(KERN_WARNING "NVRM: ignoring malformed RegistryDwords \"%s\"\n",
               NVreg_RegistryDwords);

    rc = nv_procfs_init();
    if (rc < 0) {
        printk(KERN_ERR "NVRM: failed to initialize procfs.\n");
        goto shutdown;
    }

    rc = nv_caps_init();
    if (rc < 0) {
        printk(KERN_ERR "NVRM: nv-caps-drv failed to initialize.\n");
        nv_procfs_exit();
        goto shutdown;
    }

    printk(KERN_INFO "NVRM: loading %s\n", pNVRM_ID);
    return 0;

shutdown:
    rm_shutdown_rm();
    return rc;
}

void nvidia_exit_module(void)
{
    nv_caps_exit();
    nv_procfs_exit();
    rm_shutdown_rm();
}

int nvidia_standin_register_client(const char *name)
{
    int rc = rm_register_client();

    if (rc == 0)
        printk(KERN_DEBUG "NVRM: client %s registered\n", name);
    return rc == 0 ? 0 : -EBUSY;
}
EXPORT_SYMBOL(nvidia_standin_register_client);

void nvidia_standin_unregister_client(const char *name)
{
    if (rm_unregister_client() != 0)
        printk(KERN_WARNING "NVRM: client %s was not registered\n", name);
}
EXPORT_SYMBOL(nvidia_standin_unregister_client);
