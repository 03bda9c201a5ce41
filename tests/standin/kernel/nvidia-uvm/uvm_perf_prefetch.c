/* Stand-in NVIDIA driver: nvidia-uvm.ko's prefetch parameters, as NVIDIA's. */
#include <linux/module.h>
#include <linux/moduleparam.h>

#include "uvm_perf_prefetch.h"

unsigned int uvm_perf_prefetch_enable = 1;
unsigned int uvm_perf_prefetch_threshold = 51;

module_param(uvm_perf_prefetch_enable, uint, S_IRUGO);
module_param(uvm_perf_prefetch_threshold, uint, S_IRUGO);
