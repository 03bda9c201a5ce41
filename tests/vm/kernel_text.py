"""The running kernel's own code, read in a guest: is it patched while vCPUs run?

The guest's kernel patches its code when a static key flips, and under TCG a vCPU can
trip over the int3 of that patch (guest.py KERNEL_COMMAND_LINE). This script, run in
the guest as root, reads the core kernel's text (``_stext`` to ``_etext``, through
``/proc/kcore`` at the addresses ``/proc/kallsyms`` gives) while a CPU goes offline and
comes back, and names the symbol of every byte range that changed:

    python kernel_text.py hotplug CPU    # exit 1 when the text changed
"""

from __future__ import annotations

import bisect
import struct
import sys
from pathlib import Path

KCORE = Path("/proc/kcore")
KALLSYMS = Path("/proc/kallsyms")
_PT_LOAD = 1
_PAGE = 4096


def core_symbols() -> list[tuple[int, str]]:
    """The core kernel's symbols (module symbols carry a fourth field), by address."""
    symbols = []
    for line in KALLSYMS.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3:
            symbols.append((int(fields[0], 16), fields[2]))
    return sorted(symbols)


def read_kernel(start: int, length: int) -> bytes:
    """``length`` bytes of kernel memory at virtual address ``start``, from the
    PT_LOAD segment of /proc/kcore (an ELF core file) that covers them."""
    with KCORE.open("rb") as core:
        header = core.read(64)
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        core.seek(phoff)
        table = core.read(phentsize * phnum)
        for i in range(phnum):
            kind, _, offset, vaddr, _, size = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if kind == _PT_LOAD and vaddr <= start and start + length <= vaddr + size:
                core.seek(offset + start - vaddr)
                return core.read(length)
    raise SystemExit(f"no segment of {KCORE} holds {start:#x}+{length:#x}")


def core_text() -> tuple[int, bytes]:
    """The address and the bytes of the core kernel's text, as it is now."""
    addresses = {name: address for address, name in core_symbols()}
    start, end = addresses["_stext"], addresses["_etext"]
    return start, read_kernel(start, end - start)


def changes(before: bytes, after: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, old bytes, new bytes) of each changed run of bytes."""
    found = []
    for page in range(0, len(before), _PAGE):
        end = min(page + _PAGE, len(before))
        if before[page:end] == after[page:end]:
            continue
        i = page
        while i < end:
            j = i
            while j < end and before[j] != after[j]:
                j += 1
            if j > i:
                found.append((i, before[i:j], after[i:j]))
            i = j + 1
    return found


def set_online(cpu: int, online: bool) -> None:
    Path(f"/sys/devices/system/cpu/cpu{cpu}/online").write_text("1" if online else "0")


def hotplug(cpu: int) -> int:
    """Take ``cpu`` offline and bring it back; print each change of the text (each
    step's against the one before), by symbol. 1 when the text changed."""
    start, online = core_text()
    set_online(cpu, False)
    _, offline = core_text()
    set_online(cpu, True)
    _, online_again = core_text()
    symbols = core_symbols()
    addresses = [address for address, _ in symbols]
    found = 0
    for step, before, after in (("offline", online, offline), ("online", offline, online_again)):
        for offset, old, new in changes(before, after):
            found += 1
            base, name = symbols[bisect.bisect_right(addresses, start + offset) - 1]
            print(f"{step}: {name}+{start + offset - base:#x}: {old.hex()} -> {new.hex()}")
    return 1 if found else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hotplug" and argv[1].isdigit():
        return hotplug(int(argv[1]))
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
