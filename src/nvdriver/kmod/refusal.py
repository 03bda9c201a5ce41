"""Why the kernel refused an NVIDIA module, as an error with the right exit code."""

from __future__ import annotations

from collections.abc import Sequence

from nvdriver.errors import DriverError, NoGpuError

NO_GPU_LINE = "NVRM: No NVIDIA GPU found."


def load_error(module: str, stderr: str, kernel_log: Sequence[str]) -> DriverError:
    """The error for a failed load, quoting what the kernel said about it."""
    nvrm = [line for line in kernel_log if "NVRM" in line or module.split("-")[0] in line]
    quoted = nvrm[-5:] or list(kernel_log[-5:])
    said = f" The kernel logged: {' | '.join(quoted)}" if quoted else ""
    no_gpu = next((line for line in kernel_log if NO_GPU_LINE in line), None)
    if no_gpu is not None or ("No such device" in stderr and module == "nvidia"):
        return NoGpuError(
            f"The kernel refused {module}: no NVIDIA GPU ({no_gpu or 'ENODEV'}). "
            "Nothing was left loaded.",
            hint="This machine has no NVIDIA GPU the driver supports; the modules themselves "
            "are valid for this kernel.",
        )
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "modprobe failed"
    return DriverError(
        f"Loading {module} failed: {detail}.{said} Nothing was left loaded.",
        hint="See the kernel log (dmesg) for the whole story.",
    )
