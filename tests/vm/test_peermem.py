"""GPUDirect RDMA without MOFED on a real kernel (QEMU guest), with the stand-in driver.

The stand-in's nvidia-peermem is built as NVIDIA's is where MOFED is absent (Flatcar's
developer container): its init returns -EINVAL (tests/standin/extra/nvidia-peermem). A
real kernel loads the base modules and refuses nvidia-peermem; the driver must stay up,
say why at start and at the failure, and reach readiness announcing no GPUDirect RDMA.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import Guest
from .scenario import Driver, expect, scenario

BASE = "nvidia,nvidia_uvm,nvidia_modeset,nvidia_drm"


def test_peermem_failing_without_mofed_is_a_warning_and_the_driver_stays_ready(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    start_init $LOGS/init.log GPU_DIRECT_RDMA_ENABLED=true
    wait_ready; say ready_rc $?
    say modules "$(nvidia_modules)"
    say readiness "$(paste -sd, $READY)"
    say daemon "$(persistenced_running)"
    stop_init TERM; say init_rc $INIT_RC
    state after
    """
    facts, explain = scenario(guest, standin, tmp_path, body)
    expect(
        facts,
        {
            "ready_rc": "0",
            "modules": BASE,  # nvidia_peermem refused, nothing unloaded
            "readiness": "GDRCOPY_ENABLED: false,GDS_ENABLED: false,GPU_DIRECT_RDMA_ENABLED: false",
            "daemon": "yes",
            "init_rc": "0",
            "after_modules": "",
        },
        explain,
    )
    log = (tmp_path / "init.log").read_text()
    start = log.index("nvidia-peermem needs NVIDIA's MOFED")
    failed = log.index("nvidia-peermem did not load")
    assert start < failed < log.index("is up; waiting for a signal"), explain
    warning = log[failed:].splitlines()[0]
    # modprobe's words for the kernel's -EINVAL, why, and what to do instead.
    assert "could not insert 'nvidia_peermem': Invalid argument" in warning, explain
    assert "built without MOFED's peer-memory symbols" in warning, explain
    assert "/run/mellanox/drivers" in warning, explain
    assert "dma-buf" in warning and "Linux 5.12" in warning, explain
    assert "Unloading" not in log[:failed], explain
