"""nvidia-peermem: GPUDirect RDMA through MOFED's peer-memory API, optional by nature.

nvidia-peermem registers the GPU's memory with `ib_register_peer_memory_client`, an
export of NVIDIA's MLNX_OFED/DOCA-OFED `ib_core` only: no upstream kernel has it. NVIDIA's
Kbuild looks for MOFED's tree in /usr/src/ofa_kernel (`ARCH/RELEASE`, `RELEASE`,
`default`) and its conftest for those two symbols in its Module.symvers; without them the
module still builds, but its init returns -EINVAL (open-gpu-kernel-modules,
kernel-open/nvidia-peermem/nvidia-peermem.c `nv_mem_client_init`; conftest.sh
`ib_peer_memory_symbols`). Flatcar's developer container has no MOFED, so a package built
there carries a peermem that can only fail to load; one built against MOFED fails with
"Unknown symbol ib_register_peer_memory_client" where MOFED's modules are not loaded.

So nvidia-peermem is loaded after the base modules, alone, and its failure is a warning
that quotes modprobe and the kernel and says what to do: never a rollback of the driver.
The MOFED driver container (NVIDIA network operator) shares its root at
/run/mellanox/drivers; NVIDIA's driver container links its `usr/src/ofa_kernel` to
/usr/src/ofa_kernel before building (gpu-driver-container, `_link_ofa_kernel`), and so
does a build here (builder.py). The other way to GPUDirect RDMA needs no peermem at all:
dma-buf, with the open kernel modules on Linux 5.12 or later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nvdriver.config import Config
from nvdriver.kmod.kmsg import KernelLog
from nvdriver.kmod.tree import ModuleTree
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

PEERMEM = "nvidia-peermem"
# The MOFED driver container's root on the host (NVIDIA network operator).
MOFED_ROOT = Path("/run/mellanox/drivers")
OFA_KERNEL = MOFED_ROOT / "usr/src/ofa_kernel"
PEER_MEMORY_SYMBOL = "ib_register_peer_memory_client"
DMA_BUF = (
    "For GPUDirect RDMA without MOFED use dma-buf: the open kernel modules "
    "(KERNEL_MODULE_TYPE=open) on Linux 5.12 or later, with an RDMA stack that imports "
    "dma-bufs (NCCL and UCX do); it needs no nvidia-peermem."
)


def mofed_present(config: Config) -> bool:
    """Whether the MOFED driver container shares its root (with its kernel tree) here."""
    return config.host(OFA_KERNEL).is_dir()


def advise(config: Config) -> None:
    """At start, with GPUDirect RDMA asked for: say whether nvidia-peermem can work here."""
    if mofed_present(config):
        log.info(
            "GPU_DIRECT_RDMA_ENABLED: MOFED's kernel tree is at %s; nvidia-peermem is loaded "
            "after the driver",
            config.host(OFA_KERNEL),
        )
        return
    log.warning(
        "GPU_DIRECT_RDMA_ENABLED: nvidia-peermem needs NVIDIA's MOFED (MLNX_OFED or "
        "DOCA-OFED: %s, exported by its ib_core only), and %s is absent: built without "
        "MOFED, nvidia-peermem fails to load (EINVAL), and the driver runs without it. "
        "Deploy MOFED (the NVIDIA network operator's driver container shares %s) and "
        "restart the driver. %s",
        PEER_MEMORY_SYMBOL,
        config.host(MOFED_ROOT),
        MOFED_ROOT,
        DMA_BUF,
    )


def load_peermem(config: Config, tree: ModuleTree, params: Sequence[str]) -> bool:
    """Load nvidia-peermem from `tree`; on failure warn with modprobe's and the kernel's
    words and what to do, and return False. The driver stays loaded either way."""
    with KernelLog(config.host("/dev/kmsg")) as klog:
        log.info("Loading %s%s", PEERMEM, f" ({' '.join(params)})" if params else "")
        try:
            run(["modprobe", "-d", tree.base, PEERMEM, *params])
            return True
        except RunError as e:
            said = [line.strip() for line in e.stderr.splitlines() if line.strip()]
            said += klog.read()
    log.warning(
        "%s did not load; the driver stays loaded without GPUDirect RDMA through it "
        "(the readiness file says GPU_DIRECT_RDMA_ENABLED: false). modprobe and the kernel "
        "said: %s. %s",
        PEERMEM,
        " | ".join(said) or "nothing",
        _why(config, said),
    )
    return False


def _why(config: Config, said: Sequence[str]) -> str:
    """What the failure means and what to do, from what was said and whether MOFED is here."""
    if any(PEER_MEMORY_SYMBOL in line for line in said):
        return (
            f"It was built against MOFED, whose ib_core (with {PEER_MEMORY_SYMBOL}) is not "
            "loaded: load MOFED's modules first (the network operator's driver container), "
            f"then restart the driver. {DMA_BUF}"
        )
    if not mofed_present(config):
        return (
            f"It was built without MOFED's peer-memory symbols ({PEER_MEMORY_SYMBOL}), so "
            f"its init refuses (EINVAL): deploy MOFED, which shares {MOFED_ROOT}, and restart "
            f"the driver to build it against MOFED's ofa_kernel. {DMA_BUF}"
        )
    return (
        f"MOFED is present ({config.host(OFA_KERNEL)}), but this package's nvidia-peermem "
        "was built without it: rebuild on this node (nvidia-driver update, then restart), "
        f"so that NVIDIA's build finds MOFED's ofa_kernel. {DMA_BUF}"
    )
