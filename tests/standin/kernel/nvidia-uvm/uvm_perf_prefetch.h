#ifndef UVM_PERF_PREFETCH_H
#define UVM_PERF_PREFETCH_H

extern unsigned int uvm_perf_prefetch_enable;
extern unsigned int uvm_perf_prefetch_threshold;

#endif
