/*
 * Stand-in NVIDIA driver: nvidia.ko's front end (module entry points and the
 * character device with NVIDIA's major number 195, "nvidia-frontend" in
 * /proc/devices, as the real driver registers it).
 */
#include <linux/module.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/miscdevice.h>

#include "nv-linux.h"

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Stand-in for the NVIDIA GPU driver (tests only, drives no hardware)");
MODULE_INFO(supported, "external");
MODULE_VERSION(NV_VERSION_STRING);
MODULE_ALIAS_CHARDEV_MAJOR(NV_MAJOR_DEVICE_NUMBER);

static int nv_frontend_open(struct inode *inode, struct file *file)
{
    return 0;
}

static int nv_frontend_release(struct inode *inode, struct file *file)
{
    return 0;
}

static const struct file_operations nv_frontend_fops = {
    .owner = THIS_MODULE,
    .open = nv_frontend_open,
    .release = nv_frontend_release,
};

static int __init nvidia_frontend_init_module(void)
{
    int status;

    status = register_chrdev(NV_MAJOR_DEVICE_NUMBER, "nvidia-frontend", &nv_frontend_fops);
    if (status < 0) {
        printk(KERN_ERR "NVRM: register_chrdev() failed!\n");
        return status;
    }

    status = nvidia_init_module();
    if (status < 0)
        unregister_chrdev(NV_MAJOR_DEVICE_NUMBER, "nvidia-frontend");

    return status;
}

static void __exit nvidia_frontend_exit_module(void)
{
    nvidia_exit_module();
    unregister_chrdev(NV_MAJOR_DEVICE_NUMBER, "nvidia-frontend");
}

module_init(nvidia_frontend_init_module);
module_exit(nvidia_frontend_exit_module);
