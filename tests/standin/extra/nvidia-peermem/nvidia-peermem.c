/*
 * Stand-in NVIDIA driver: nvidia-peermem.ko (GPUDirect RDMA). The real one
 * also needs ib_core (or MOFED); the stand-in only depends on nvidia.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/init.h>

#include "nv-standin.h"

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Stand-in for NVIDIA's GPUDirect RDMA peer memory driver (tests only)");
MODULE_INFO(supported, "external");
MODULE_VERSION(NV_VERSION_STRING);

static int peerdirect_support;
module_param(peerdirect_support, int, S_IRUGO);
MODULE_PARM_DESC(peerdirect_support, "Set level of support for Peer-direct, 0 [default] or 1 [legacy, for example MLNX_OFED 4.9 LTS]");

static int __init nv_mem_client_init(void)
{
    return nvidia_standin_register_client("nvidia-peermem");
}

static void __exit nv_mem_client_cleanup(void)
{
    nvidia_standin_unregister_client("nvidia-peermem");
}

module_init(nv_mem_client_init);
module_exit(nv_mem_client_cleanup);
