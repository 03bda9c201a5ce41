"""Why the kernel refused an NVIDIA module, as an error with the right exit code.

nvidia.ko fails with ENODEV for several reasons, and only one of them is "no
NVIDIA GPU" (exit 7). The kernel's log and sysfs tell them apart; the lines
matched are the real driver's (535.261.03: kernel-open/nvidia/nv.c
nvidia_init_module, src/nvidia/arch/nvalloc/unix/src/osapi.c
rm_is_supported_device), which log several lines per message:

- `NVRM: No NVIDIA GPU found.`: no NVIDIA GPU this driver knows on the bus.
  With none in sysfs either: exit 7. With some in sysfs, the driver release
  does not support them (a legacy GPU): exit 6.
- `NVRM: The NVIDIA probe routine was not called for N device(s).` ... `No
  NVIDIA devices probed.`: the GPUs are bound to another driver (nouveau,
  vfio-pci); sysfs names it (`/sys/bus/pci/devices/*/driver`): exit 1.
- `NVRM: The NVIDIA GPU D:B:S.F (PCI ID: V:D) installed in this system is not
  supported by open nvidia.ko because it does not include the required GPU
  System Processor (GSP).`: the open flavour on a GPU before Turing: exit 6.
- `... is not supported by the NVIDIA X driver release.`: exit 6.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvdriver.errors import DriverError, KernelAbiRefused, NoGpuError, UnsupportedError
from nvdriver.host import PciDevice
from nvdriver.pattern import Pattern

NO_GPU_LINE = "NVRM: No NVIDIA GPU found."
NO_GPU = NO_GPU_LINE.removeprefix("NVRM: ")
NOT_PROBED_LINE = "The NVIDIA probe routine was not called"
# "The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1db4) installed in this system is not
# supported by open nvidia.ko ..." (vGPUs: "The NVIDIA vGPU ...", "this vGPU host system").
_REFUSED_GPU_RE = Pattern(
    r"The NVIDIA v?GPU (?P<address>[0-9a-fA-F:.]+)"
    r" \(PCI ID: (?P<id>[0-9a-fA-F]{4}:[0-9a-fA-F]{4})\)"
    r" installed in this (?:vGPU host )?system is not supported by"
    r" (?:(?P<open>open nvidia\.ko)|the NVIDIA (?P<release>\S+) driver release)"
)

_DRIVER_HINTS = {
    "nouveau": "Unload nouveau and keep it from loading (`modprobe.blacklist=nouveau` on the "
    "kernel command line, or a modprobe.d `blacklist nouveau`), then start the driver again.",
    "vfio-pci": "The GPU is reserved for passthrough to a virtual machine (vfio-pci): unbind it "
    "(echo ADDRESS > /sys/bus/pci/drivers/vfio-pci/unbind) and remove it from vfio-pci's ids, "
    "or run the driver on a node whose GPUs are not passed through.",
}


def _flat(kernel_log: Sequence[str]) -> str:
    """The kernel's messages as one line: NVIDIA splits a message over several lines (and
    records), each starting `NVRM: `."""
    lines = (line.strip() for message in kernel_log for line in message.splitlines())
    return " ".join(line.removeprefix("NVRM:").strip() for line in lines if line)


def load_error(
    module: str, stderr: str, kernel_log: Sequence[str], gpus: Sequence[PciDevice]
) -> DriverError:
    """The error for a failed load, quoting what the kernel said about it.

    `gpus` are the NVIDIA GPUs sysfs shows after the attempt, with their drivers.
    """
    nvrm = [line for line in kernel_log if "NVRM" in line or module.split("-")[0] in line]
    quoted = [" ".join(line.split()) for line in nvrm[-5:] or kernel_log[-5:]]
    said = f" The kernel logged: {' | '.join(quoted)}" if quoted else ""
    enodev = "No such device" in stderr
    if error := _abi_refusal(module, stderr, kernel_log):
        return error
    if error := _signature_refusal(module, stderr, kernel_log, said):
        return error
    if module == "nvidia" and (error := _nvidia_refusal(_flat(kernel_log), enodev, gpus, said)):
        return error
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "modprobe failed"
    return DriverError(
        f"Loading {module} failed: {detail}.{said} Nothing was left loaded.",
        hint="See the kernel log (dmesg) for the whole story.",
    )


# kernel/module/version.c check_version and main.c check_modinfo (6.1, 6.12): the lines
# of a refusal for the module's ABI.
_ABI_LINES = ("disagrees about version of symbol", "version magic", "no symbol version for")
# kernel/module/signing.c module_sig_check and security/lockdown: the lines of a refusal
# for a missing or untrusted signature (Secure Boot lockdown, module.sig_enforce=1). Not
# "module verification failed": without enforcement that only taints, and the load goes on.
_SIGNATURE_LINES = (
    "Loading of unsigned module is rejected",
    "Loading of module with unavailable key is rejected",
    "Loading of module with unsupported crypto is rejected",
    "unsigned module loading is restricted",
    "signature not signed with a trusted key",
)
_SIGNATURE_ERRORS = ("Key was rejected by service", "Required key not available")


def _abi_refusal(module: str, stderr: str, kernel_log: Sequence[str]) -> DriverError | None:
    lines = [" ".join(line.split()) for line in kernel_log if any(s in line for s in _ABI_LINES)]
    if not lines and "Exec format error" not in stderr:
        return None
    what = " | ".join(lines[:3]) if lines else stderr.strip().splitlines()[-1]
    return KernelAbiRefused(
        f"The kernel refused {module} for its kernel ABI ({what}): the package was built "
        "against another build of this kernel release. Nothing was left loaded.",
        hint="Build the package in the developer container of the Flatcar release the node "
        "runs (nvidia-driver update on the node), or remove the package from the store.",
    )


def _signature_refusal(
    module: str, stderr: str, kernel_log: Sequence[str], said: str
) -> DriverError | None:
    signature = [line for line in kernel_log if any(s in line for s in _SIGNATURE_LINES)]
    if not signature and not any(e in stderr for e in _SIGNATURE_ERRORS):
        return None
    return DriverError(
        f"The kernel refused {module} for its signature: this kernel loads only modules "
        f"signed by a key it trusts (Secure Boot lockdown or module.sig_enforce).{said} "
        "Nothing was left loaded.",
        hint="Make the packages with `nvidia-driver update --sign KEY` and enrol KEY's "
        "certificate in the machine's MOK list (mokutil --import CERT, then confirm at the "
        "next boot), or turn Secure Boot off for this node.",
    )


def _nvidia_refusal(
    text: str, enodev: bool, gpus: Sequence[PciDevice], said: str
) -> DriverError | None:
    refused = list(_REFUSED_GPU_RE.finditer(text))
    if refused:
        which = ", ".join(f"{m['address']} (PCI ID {m['id'].lower()})" for m in refused)
        if any(m["open"] for m in refused):
            return UnsupportedError(
                f"The open NVIDIA kernel modules cannot drive {which}: the GPU has no GSP "
                f"(it is older than Turing).{said} Nothing was left loaded.",
                hint="Use the proprietary modules: KERNEL_MODULE_TYPE=proprietary, or "
                "KERNEL_MODULE_TYPE=auto with the driver's supported-gpus.json in the image.",
            )
        release = refused[0]["release"]
        return UnsupportedError(
            f"NVIDIA driver {release} does not support {which}.{said} Nothing was left loaded.",
            hint="Use a driver branch that supports this GPU (NVIDIA's README, appendix A, "
            "names the legacy branch of older GPUs).",
        )
    held = [g for g in gpus if g.driver and g.driver != "nvidia"]
    if NOT_PROBED_LINE in text or (enodev and held and NO_GPU not in text):
        if held:
            which = "; ".join(f"{g} is bound to {g.driver}" for g in held)
            hints = [_DRIVER_HINTS.get(g.driver or "", "") for g in held]
            hint = " ".join(dict.fromkeys(h for h in hints if h)) or (
                "Unbind it from that driver (echo ADDRESS > /sys/bus/pci/drivers/DRIVER/unbind) "
                "and start the driver again."
            )
            return DriverError(
                f"The NVIDIA GPUs are held by another driver: {which}; nvidia.ko found no GPU "
                f"to drive.{said} Nothing was left loaded.",
                hint=hint.replace("ADDRESS", held[0].address),
            )
        return DriverError(
            f"nvidia.ko was not given any GPU: another driver holds them.{said} "
            "Nothing was left loaded.",
            hint="See which driver each NVIDIA GPU is bound to (lspci -k), unbind it, and "
            "start the driver again.",
        )
    no_gpu = NO_GPU in text
    if no_gpu or enodev:
        if not gpus:
            found = NO_GPU_LINE if no_gpu else "ENODEV"
            return NoGpuError(
                f"The kernel refused nvidia: no NVIDIA GPU ({found}). Nothing was left loaded.",
                hint="This machine has no NVIDIA GPU; the modules themselves are valid for "
                "this kernel.",
            )
        which = ", ".join(str(g) for g in gpus)
        if no_gpu:
            return UnsupportedError(
                f"nvidia.ko found no GPU it supports, though the PCI bus has {which}.{said} "
                "Nothing was left loaded.",
                hint="These GPUs need another driver branch (a legacy one for older GPUs, "
                "see NVIDIA's README, appendix A).",
            )
        return DriverError(
            f"The kernel refused nvidia with ENODEV although the PCI bus has {which}.{said} "
            "Nothing was left loaded.",
            hint="See the kernel log (dmesg) for the whole story.",
        )
    return None
