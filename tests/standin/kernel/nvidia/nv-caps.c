/*
 * Stand-in NVIDIA driver: the capability driver (NVIDIA's nv-caps.c), as MIG
 * sees it: the "nvidia-caps" character device region (its major in
 * /proc/devices, allocated at load) and /proc/driver/nvidia/capabilities/mig/
 * {config,monitor}, each with the lines the real driver writes:
 *   DeviceFileMinor: the node's minor (nvidia-capN);
 *   DeviceFileMode:  the node's mode, in decimal;
 *   DeviceFileModify: whether the node may be made (NVreg_ModifyDeviceFiles).
 * The real driver numbers its capabilities in table order (nvlink's fabric-mgmt
 * is minor 0, MIG's config 1 and monitor 2) and makes config 0400 and monitor
 * 0444 (src/nvidia/arch/nvalloc/unix/src/os.c, osRmCapRegisterSys).
 */
#include <linux/cdev.h>
#include <linux/fs.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

#include "nv-linux.h"

#define NV_CAP_DRV_MINOR_COUNT 8192

struct nv_cap {
    const char *name;
    int minor;
    int permissions;
};

static const struct nv_cap nv_mig_caps[] = {
    { "config", 1, 0400 },
    { "monitor", 2, 0444 },
};

static dev_t nv_cap_devno;
static struct cdev nv_cap_cdev;
static struct proc_dir_entry *nv_cap_proc;

static int nv_cap_open(struct inode *inode, struct file *file)
{
    return 0;
}

static int nv_cap_release(struct inode *inode, struct file *file)
{
    return 0;
}

static const struct file_operations nv_cap_fops = {
    .owner = THIS_MODULE,
    .open = nv_cap_open,
    .release = nv_cap_release,
};

static int nv_cap_procfs_read(struct seq_file *s, void *v)
{
    const struct nv_cap *cap = s->private;

    seq_printf(s, "%s: %d\n", "DeviceFileMinor", cap->minor);
    seq_printf(s, "%s: %d\n", "DeviceFileMode", cap->permissions);
    seq_printf(s, "%s: %d\n", "DeviceFileModify", NVreg_ModifyDeviceFiles);
    return 0;
}

int nv_caps_init(void)
{
    struct proc_dir_entry *mig;
    unsigned int i;
    int rc;

    rc = alloc_chrdev_region(&nv_cap_devno, 0, NV_CAP_DRV_MINOR_COUNT, "nvidia-caps");
    if (rc < 0)
        return rc;
    cdev_init(&nv_cap_cdev, &nv_cap_fops);
    nv_cap_cdev.owner = THIS_MODULE;
    rc = cdev_add(&nv_cap_cdev, nv_cap_devno, NV_CAP_DRV_MINOR_COUNT);
    if (rc < 0)
        goto unregister;

    rc = -ENOMEM;
    nv_cap_proc = proc_mkdir("driver/nvidia/capabilities", NULL);
    if (nv_cap_proc == NULL)
        goto del;
    mig = proc_mkdir("mig", nv_cap_proc);
    if (mig == NULL)
        goto remove;
    for (i = 0; i < ARRAY_SIZE(nv_mig_caps); i++) {
        if (proc_create_single_data(nv_mig_caps[i].name, 0444, mig, nv_cap_procfs_read,
                                    (void *)&nv_mig_caps[i]) == NULL)
            goto remove;
    }
    return 0;

remove:
    proc_remove(nv_cap_proc);
    nv_cap_proc = NULL;
del:
    cdev_del(&nv_cap_cdev);
unregister:
    unregister_chrdev_region(nv_cap_devno, NV_CAP_DRV_MINOR_COUNT);
    return rc;
}

void nv_caps_exit(void)
{
    proc_remove(nv_cap_proc);
    nv_cap_proc = NULL;
    cdev_del(&nv_cap_cdev);
    unregister_chrdev_region(nv_cap_devno, NV_CAP_DRV_MINOR_COUNT);
}
