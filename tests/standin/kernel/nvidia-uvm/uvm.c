/*
 * Stand-in NVIDIA driver: nvidia-uvm.ko, a plain module (no precompiled core)
 * that is a client of nvidia.ko and registers the "nvidia-uvm" character
 * device with a dynamic major, as the real one does.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/init.h>
#include <linux/fs.h>
#include <linux/cdev.h>

#include "nv-standin.h"
#include "uvm_perf_prefetch.h"

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Stand-in for NVIDIA's unified memory driver (tests only)");
MODULE_INFO(supported, "external");
MODULE_VERSION(NV_VERSION_STRING);

#define NVIDIA_UVM_NUM_MINOR_DEVICES 2

static dev_t g_uvm_base_dev;
static struct cdev g_uvm_cdev;

static int uvm_open(struct inode *inode, struct file *filp)
{
    return 0;
}

static int uvm_release(struct inode *inode, struct file *filp)
{
    return 0;
}

static const struct file_operations uvm_fops = {
    .owner = THIS_MODULE,
    .open = uvm_open,
    .release = uvm_release,
};

static int __init uvm_init_entry(void)
{
    int rc;

    rc = nvidia_standin_register_client("nvidia-uvm");
    if (rc < 0)
        return rc;

    rc = alloc_chrdev_region(&g_uvm_base_dev, 0, NVIDIA_UVM_NUM_MINOR_DEVICES, "nvidia-uvm");
    if (rc != 0) {
        printk(KERN_ERR "nvidia-uvm: alloc_chrdev_region failed: %d\n", rc);
        goto unregister_client;
    }

    cdev_init(&g_uvm_cdev, &uvm_fops);
    g_uvm_cdev.owner = THIS_MODULE;
    rc = cdev_add(&g_uvm_cdev, g_uvm_base_dev, 1);
    if (rc != 0) {
        printk(KERN_ERR "nvidia-uvm: cdev_add failed: %d\n", rc);
        goto unregister_region;
    }

    printk(KERN_INFO "nvidia-uvm: Loaded the UVM driver, major device number %d.\n",
           MAJOR(g_uvm_base_dev));
    return 0;

unregister_region:
    unregister_chrdev_region(g_uvm_base_dev, NVIDIA_UVM_NUM_MINOR_DEVICES);
unregister_client:
    nvidia_standin_unregister_client("nvidia-uvm");
    return rc;
}

static void __exit uvm_exit_entry(void)
{
    cdev_del(&g_uvm_cdev);
    unregister_chrdev_region(g_uvm_base_dev, NVIDIA_UVM_NUM_MINOR_DEVICES);
    nvidia_standin_unregister_client("nvidia-uvm");
}

module_init(uvm_init_entry);
module_exit(uvm_exit_entry);
