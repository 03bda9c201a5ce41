"""NVIDIA's kernel modules on the node, one concern per module.

- `loaded`: what /sys/module and /proc say is loaded (introspection only).
- `params`: the `/drivers/<module>.conf` parameter files.
- `tree`: the private module tree the package is linked into, and which of its
  modules to load.
- `kmsg`: the kernel's log, to quote what it said about a load.
- `loading`: loading from the private tree (host prerequisites first).
- `devices`: the /dev/nvidia* nodes where no udev makes them.
- `refusal`: why the kernel refused nvidia.ko, as an error with the right exit code.
- `unloading`: how modules are unloaded (NVIDIA's refcount rule, gdrdrv first, undoing a
  failed load).
- `firmware`: the firmware search path for GSP firmware.
- `peermem`: nvidia-peermem (GPUDirect RDMA), whose failure to load is a warning.
- `modversions`: what a module file says of its kernel: vermagic, the CRCs it imports.
- `abi`: whether a package fits the running kernel, by those, read from the host.
"""
