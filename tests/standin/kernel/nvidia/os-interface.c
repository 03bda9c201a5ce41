/*
 * Stand-in NVIDIA driver: the functions the OS-agnostic core
 * (nv-kernel.o_binary) calls back into (NVIDIA's os-interface.c).
 */
#include <linux/kernel.h>
#include <linux/printk.h>

#include "nv-linux.h"

void nvstandin_os_log(int level, const char *msg)
{
    if (level == NV_STANDIN_LOG_ERROR)
        printk(KERN_ERR "%s\n", msg);
    else
        printk(KERN_INFO "%s\n", msg);
}

unsigned int nvstandin_os_count_gpus(void)
{
    /* The stand-in drives no hardware: it pretends one GPU unless told not to. */
    return NVreg_StandinNoGpu ? 0 : 1;
}
