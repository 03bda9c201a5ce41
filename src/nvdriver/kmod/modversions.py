"""What a module file says about the kernel it was built for: vermagic and symbol CRCs.

With CONFIG_MODVERSIONS the kernel checks, at load, each symbol a module imports
against the CRC recorded in the module's `__versions` section (struct
modversion_info: an unsigned long CRC and a 56-byte name, include/linux/module.h;
kernels with CONFIG_EXTENDED_MODVERSIONS add `__version_ext_crcs` and
`__version_ext_names`), and the module's `vermagic=` (its `.modinfo`) against its
own. Those, not `/proc/version`, decide whether a module fits a kernel (docs/package.md).

The same sections are read from three places: the modules a build made (what a
package records), the host's own modules (what the running kernel accepts: `modprobe
--dump-modversions` reads the same section), and `Module.symvers` of a build tree
(every exported symbol's CRC). Modules may be xz- or gzip-compressed (Flatcar's and
Debian 6.12's are `.ko.xz`); zstd ones are skipped (no decoder in the standard library).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Container, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_VERSION_ENTRY = 64  # struct modversion_info on 64-bit kernels


class NotAModule(ValueError):
    """The file is not a readable 64-bit little-endian ELF object."""


class ModuleFacts(NamedTuple):
    """The symbols a module imports with their CRCs, and its modinfo fields."""

    versions: Mapping[str, int]
    modinfo: Mapping[str, tuple[str, ...]]

    @property
    def vermagic(self) -> str | None:
        values = self.modinfo.get("vermagic")
        return values[0] if values else None


def read_bytes(path: Path) -> bytes:
    """A module's ELF bytes, decompressed by its suffix."""
    data = path.read_bytes()
    if not path.name.endswith((".xz", ".gz")):
        return data
    # Only the host's modules are compressed, not the tree a start links and loads.
    import gzip
    import lzma
    import zlib

    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as e:
        raise NotAModule(f"{path}: cannot decompress: {e}") from e
    return data


def _sections(
    data: bytes | mmap.mmap, wanted: Container[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Each section's name and bytes (only those `wanted`, when given: from a mapped
    file, only those are read)."""
    if len(data) < 64 or data[:4] != _ELF_MAGIC:
        raise NotAModule("not an ELF file")
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise NotAModule("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(data) or shstrndx >= shnum:
        raise NotAModule("truncated section table")
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        if _type != 8 and offset + size > len(data):  # 8: SHT_NOBITS has no bytes
            raise NotAModule("a section lies past the end of the file")
        headers.append((name, _type, offset, size))
    _, _, str_off, str_size = headers[shstrndx]
    strtab = data[str_off : str_off + str_size]
    for name, _type, offset, size in headers:
        end = strtab.find(b"\0", name)
        label = strtab[name : end if end >= 0 else None].decode("ascii", "replace")
        if wanted is None or label in wanted:
            yield label, b"" if _type == 8 else data[offset : offset + size]


def _versions(sections: Mapping[str, bytes]) -> dict[str, int]:
    found: dict[str, int] = {}
    table = sections.get("__versions", b"")
    for at in range(0, len(table) - _VERSION_ENTRY + 1, _VERSION_ENTRY):
        crc = struct.unpack_from("<Q", table, at)[0] & 0xFFFFFFFF
        name = table[at + 8 : at + _VERSION_ENTRY].split(b"\0", 1)[0]
        if name:
            found[name.decode("ascii", "replace")] = crc
    crcs, names = sections.get("__version_ext_crcs"), sections.get("__version_ext_names")
    if crcs and names:
        values = struct.unpack_from(f"<{len(crcs) // 4}I", crcs)
        for crc, name in zip(values, names.split(b"\0"), strict=False):
            found[name.decode("ascii", "replace")] = crc
    return found


def _modinfo(section: bytes) -> dict[str, tuple[str, ...]]:
    fields: dict[str, list[str]] = {}
    for entry in section.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in fields.items()}


def module_facts(data: bytes) -> ModuleFacts:
    """The imports' CRCs and the modinfo of a module (or of an interface object, which
    holds its `.mod.o`), from its ELF bytes."""
    sections = dict(_sections(data))
    return ModuleFacts(_versions(sections), _modinfo(sections.get(".modinfo", b"")))


def read_module(path: Path) -> ModuleFacts:
    return module_facts(read_bytes(path))


def read_modinfo(path: Path) -> Mapping[str, tuple[str, ...]]:
    """A module's modinfo fields (`modinfo -F FIELD` prints one line per value). An
    uncompressed module is mapped and only its `.modinfo` read: NVIDIA's `nvidia.ko` is
    tens of MB."""
    if path.name.endswith((".xz", ".gz")):
        return read_module(path).modinfo
    with path.open("rb") as f:
        try:
            data: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # empty, or on a file system that cannot map it
            data = f.read()
        try:
            sections = dict(_sections(data, {".modinfo"}))
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    return _modinfo(sections.get(".modinfo", b""))


def read_symvers(path: Path) -> dict[str, int]:
    """Every symbol's CRC from a build tree's Module.symvers (`0xCRC<TAB>symbol<TAB>...`)."""
    found: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].startswith("0x"):
            try:
                found[fields[1]] = int(fields[0], 16)
            except ValueError:
                continue
    return found
