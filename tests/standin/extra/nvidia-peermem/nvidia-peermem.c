/*
 * Stand-in NVIDIA driver: nvidia-peermem.ko (GPUDirect RDMA), as NVIDIA's builds where
 * MOFED is absent (Flatcar's developer container): NVIDIA's conftest finds no
 * ib_register_peer_memory_client in a MOFED Module.symvers, leaves
 * NV_MLNX_IB_PEER_MEM_SYMBOLS_PRESENT undefined, and the module's init then returns
 * -EINVAL without a word in the kernel log (open-gpu-kernel-modules,
 * kernel-open/nvidia-peermem/nvidia-peermem.c, nv_mem_client_init). modprobe says
 * "could not insert 'nvidia_peermem': Invalid argument". Nothing else of it is needed:
 * without the symbols the real one references nothing of nvidia.ko either.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/init.h>

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Stand-in for NVIDIA's GPUDirect RDMA peer memory driver (tests only)");
MODULE_INFO(supported, "external");
MODULE_VERSION(NV_VERSION_STRING);

static int peerdirect_support;
module_param(peerdirect_support, int, S_IRUGO);
MODULE_PARM_DESC(peerdirect_support, "Set level of support for Peer-direct, 0 [default] or 1 [legacy, for example MLNX_OFED 4.9 LTS]");

static int __init nv_mem_client_init(void)
{
    return -EINVAL;
}

static void __exit nv_mem_client_cleanup(void)
{
}

module_init(nv_mem_client_init);
module_exit(nv_mem_client_cleanup);
