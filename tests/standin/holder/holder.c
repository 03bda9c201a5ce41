/*
 * nvidia_standin_holder (or another name, HOLDER_NAME in Kbuild): keeps nvidia.ko in use. Loading it takes a
 * reference on nvidia (it calls nvidia_standin_register_client), so nvidia's
 * /sys/module/nvidia/refcnt exceeds the number of NVIDIA modules using it,
 * and rmmod nvidia fails until this module is removed.
 */
#include <linux/module.h>
#include <linux/init.h>

int nvidia_standin_register_client(const char *name);
void nvidia_standin_unregister_client(const char *name);

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Holds a reference on the stand-in nvidia module (tests only)");

static int __init holder_init(void)
{
    return nvidia_standin_register_client(KBUILD_MODNAME);
}

static void __exit holder_exit(void)
{
    nvidia_standin_unregister_client(KBUILD_MODNAME);
}

module_init(holder_init);
module_exit(holder_exit);
