"""Whether a package fits the running kernel, judged by what the kernel itself checks.

The kernel loads a module when its vermagic equals the kernel's and, with
CONFIG_MODVERSIONS, when the CRC the module records for each symbol it imports
equals the kernel's. A package records both for its modules (its KernelIdentity);
the running kernel's are read here, without loading anything, from:

1. a build tree of the host's own kernel, when one is mounted
   (`/lib/modules/RELEASE/build/Module.symvers`): every exported symbol's CRC (read
   only when what was kept, below, does not already have every symbol asked for);
2. the host's own modules (`/lib/modules/RELEASE/kernel/**.ko[.xz|.gz]`): their
   `__versions` hold the running kernel's CRCs of what they import, their `vermagic`
   is the kernel's. They are read lazily, a few at a time in parallel threads (one per
   usable CPU, up to READ_THREADS), the DRM core first, then the GPU drivers
   (together they import most of what NVIDIA's modules import), until every symbol asked
   for is found or SCAN_BUDGET seconds of reading are spent: a symbol no host module
   imports would otherwise cost a read of every module (about 2,000 `.ko.xz` on Flatcar,
   seconds each start), and one agreeing CRC of a core symbol is already strong evidence
   (a rebuild with another configuration changes the CRCs of the structures it changed).

What the host modules gave is kept in the node's cache (`kernel-abi/RELEASE.json`), for this
very kernel build (its `/proc/version`) and modules (`modules.dep`'s identity): the next
command goes on reading where the last one stopped, and once every module has been read, a
symbol that no host module imports is known to be nowhere at once. Only the first starts
after a kernel update spend the budget.

A package fits when its release is the running one, its vermagic equals the host
modules' (when one could be read) and every CRC the node could read agrees. Symbols
the node finds nowhere are left to the kernel's own check at load; a refusal there
marks the package stale (lifecycle). Never the full `/proc/version`: Flatcar's tree is
another build than the kernel it boots (docs/package.md).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from nvdriver.atomic import write_atomically
from nvdriver.config import Config
from nvdriver.host import KernelIdentity
from nvdriver.kmod.modversions import (
    MODULE_SUFFIXES,
    ModuleFacts,
    NotAModule,
    read_module,
    read_symvers,
)

log = logging.getLogger(__name__)

# Read first, in this order: the modules most likely to import what NVIDIA's modules
# import. A directory ending in "/" is read without its subdirectories (the DRM core
# modules, before the large GPU drivers under it).
_FIRST = ("kernel/drivers/gpu/drm/", "kernel/drivers/gpu", "kernel/drivers/video")
# Seconds of reading host modules per command, at most (see the module's docstring).
SCAN_BUDGET = 3.0
# Threads that read host modules at once (at most; one per CPU this process may use), and
# the modules each reads per batch (the budget is checked between batches).
READ_THREADS = 8
_PER_THREAD = 4
# The kept scans' directory in the cache, and their format.
INDEX_DIRECTORY = "kernel-abi"
_INDEX_FORMAT = 1


class Fit(NamedTuple):
    """The verdict on one package: whether it fits, and why, for logs and `status`."""

    fits: bool
    reason: str
    checked: int = 0  # how many of the package's symbol CRCs the node could compare

    def __str__(self) -> str:
        return self.reason


class RunningAbi:
    """The running kernel's vermagic and symbol CRCs, as far as the node can read them;
    one per command (what was read once is kept)."""

    def __init__(
        self,
        config: Config,
        release: str,
        *,
        budget: float = SCAN_BUDGET,
        keep: bool = True,
        threads: int = READ_THREADS,
    ) -> None:
        self.release = release
        self.directory = config.host("/lib/modules") / release
        self._tree: dict[str, int] = {}  # from the build tree: taken first
        self._scanned: dict[str, int] = {}  # from host modules (kept and read): what is kept
        self._vermagic: str | None = None
        self._started = False
        self._tree_read = False
        self._files: Iterator[Path] = iter(())
        self._budget = budget  # seconds of reading left
        self.modules_read = 0  # by this command
        self._threads = max(1, min(threads, len(os.sched_getaffinity(0))))
        # The kept scan: where, for which kernel build and modules, how far it got.
        self._index = config.cache_dir / INDEX_DIRECTORY / f"{release}.json" if keep else None
        self._proc_version = config.host("/proc/version")
        self._position = 0  # module files consumed, in _module_files' order
        self._complete = False  # every module file was consumed
        self._kept = (0, False)  # (_position, _complete) as last kept
        self._identity: dict[str, object] | None = None  # of this kernel and modules, at start

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._files = self._module_files()
        if self._index is not None:
            self._identity = self._read_identity()
            self._resume()

    def _read_tree(self) -> None:
        """The build tree's CRCs, once, when one is mounted: read only when what was kept
        does not have every symbol asked for (its `Module.symvers` is megabytes: half a
        second of a start under emulation). Both are the running kernel's; on a symbol
        both name, the tree's is taken."""
        if self._tree_read:
            return
        self._tree_read = True
        symvers = self.directory / "build" / "Module.symvers"
        try:
            self._tree = read_symvers(symvers)
        except OSError:
            pass
        else:
            log.debug("Read the running kernel's CRCs from %s", symvers)

    def _read_identity(self) -> dict[str, object] | None:
        """What the kept scan is valid for: this kernel build and these module files."""
        try:
            version = self._proc_version.read_text().strip()
            dep = self.directory / "modules.dep"
            st = (dep if dep.exists() else self.directory).stat()
        except (OSError, UnicodeDecodeError):
            return None
        return {
            "format": _INDEX_FORMAT,
            "kernel": version,
            "modules": [str(self.directory), st.st_ino, st.st_size, st.st_mtime_ns],
        }

    def _resume(self) -> None:
        """Take what an earlier command read of these very modules, and skip those files."""
        assert self._index is not None
        try:
            kept = json.loads(self._index.read_bytes())
            if self._identity is None or kept["identity"] != self._identity:
                return
            # Taken as written (thousands of CRCs, not copied); a value that is no number,
            # which this module never writes, counts as not found (`crcs`).
            crcs = kept["crcs"]
            vermagic, position = kept["vermagic"], int(kept["position"])
            if not isinstance(crcs, dict):
                return
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # none kept, another kernel's, or unreadable: read the modules
        self._scanned = crcs
        self._vermagic = vermagic if isinstance(vermagic, str) else None
        self._position, self._complete = position, kept.get("complete") is True
        self._kept = (self._position, self._complete)
        if self._complete:
            self._files = iter(())
        else:
            for _ in range(position):
                next(self._files, None)
        log.debug("Took %d host modules' CRCs from %s", position, self._index)

    def _keep(self) -> None:
        """Keep what was read for the next command (best effort: a cache, never needed)."""
        if self._index is None or (self._position, self._complete) == self._kept:
            return
        if self._position == 0:  # no module file here (yet): nothing worth keeping
            return
        if self._identity is None:
            return
        kept = {
            "identity": self._identity,
            "vermagic": self._vermagic,
            "position": self._position,
            "complete": self._complete,
            "crcs": self._scanned,
        }
        try:
            self._index.parent.mkdir(parents=True, exist_ok=True)
            for other in self._index.parent.glob("*.json"):  # only the running kernel's
                if other != self._index:
                    other.unlink(missing_ok=True)
            write_atomically(self._index, json.dumps(kept, separators=(",", ":")).encode())
        except OSError as e:
            log.debug("Not keeping the host modules' CRCs in %s: %s", self._index, e)
            return
        self._kept = (self._position, self._complete)

    def _module_files(self) -> Iterator[Path]:
        """Every module file once: those of _FIRST in its order, then the rest."""
        seen: set[Path] = set()
        for top in [*_FIRST, ""]:
            for dirpath, dirnames, filenames in os.walk(self.directory / top, followlinks=True):
                here = Path(dirpath)
                dirnames[:] = (
                    [] if top.endswith("/") else sorted(set(dirnames) - {"build", "source"})
                )
                for name in sorted(filenames):
                    path = here / name
                    if name.endswith(MODULE_SUFFIXES) and path not in seen:
                        seen.add(path)
                        yield path

    def _read_next(self) -> bool:
        """Read the next few host modules (in parallel threads: xz and zlib decoding let go
        of the interpreter's lock) into what is known; False when none is left or the
        reading budget is spent."""
        if self._budget <= 0:
            return False
        batch = list(itertools.islice(self._files, self._threads * _PER_THREAD))
        if not batch:
            self._complete = True
            return False
        started = time.monotonic()
        read = _read_modules(batch, self._threads)
        self._budget -= time.monotonic() - started
        self._position += len(batch)
        for path, facts in zip(batch, read, strict=True):
            if isinstance(facts, Exception):
                log.debug("Not reading %s: %s", path, facts)
                continue
            self.modules_read += 1
            for name, crc in facts.versions.items():
                self._scanned.setdefault(name, crc)
            if self._vermagic is None:
                self._vermagic = facts.vermagic
        if self._budget <= 0:
            log.debug("Stopped reading host modules after %d", self.modules_read)
        return True

    def vermagic(self) -> str | None:
        """The running kernel's vermagic: that of its own modules (the kernel refuses any
        other), None when no host module can be read."""
        self._start()
        while self._vermagic is None and not self._complete and self._read_next():
            pass
        self._keep()
        return self._vermagic

    def crcs(self, names: Iterable[str]) -> dict[str, int]:
        """The running kernel's CRCs of `names`, those the node can find."""
        self._start()
        wanted = set(names)
        if not self._known(wanted):
            self._read_tree()
        while not self._known(wanted) and not self._complete and self._read_next():
            pass
        self._keep()
        found = {n: c for n in wanted if type(c := self._scanned.get(n)) is int}
        found.update((n, self._tree[n]) for n in wanted if n in self._tree)
        return found

    def _known(self, names: set[str]) -> bool:
        return all(n in self._tree or n in self._scanned for n in names)

    def fit(self, kernel: KernelIdentity) -> Fit:
        """Whether a package made for `kernel` fits the running kernel, and why."""
        if kernel.release != self.release:
            return Fit(False, f"it is for kernel {kernel.release}, this one is {self.release}")
        running = self.vermagic()
        if kernel.vermagic is not None and running is not None and kernel.vermagic != running:
            return Fit(
                False,
                f"its vermagic {kernel.vermagic!r} is not the running kernel's {running!r}",
            )
        recorded = dict(kernel.symbols)
        found = self.crcs(recorded)
        wrong = sorted(n for n, crc in found.items() if recorded[n] != crc)
        if wrong:
            first = wrong[0]
            return Fit(
                False,
                f"{len(wrong)} of the kernel symbols its modules import have another CRC in "
                f"the running kernel (e.g. {first}: the package's 0x{recorded[first]:08x}, "
                f"the kernel's 0x{found[first]:08x}): it was built for another build of "
                f"{kernel.release} with another ABI",
                len(found),
            )
        if not recorded or not found:
            what = "records no symbol CRCs" if not recorded else "imports none the node can read"
            return Fit(
                True,
                f"release {kernel.release} matches; the package {what} "
                f"(host modules in {self.directory}), so the kernel's own check at load decides",
            )
        unread = len(recorded) - len(found)
        rest = f" ({unread} not found on the node: the kernel checks them at load)"
        return Fit(
            True,
            f"release and vermagic match and {len(found)} of {len(recorded)} symbol CRCs "
            "agree with the running kernel's" + (rest if unread else ""),
            len(found),
        )


def _read_modules(paths: list[Path], threads: int) -> list[ModuleFacts | Exception]:
    """`read_module` of each path, in up to `threads` threads (each a stride of `paths`,
    the first in this one); a module that cannot be read gives its error, in its place."""
    threads = max(1, min(threads, len(paths)))
    read: list[ModuleFacts | Exception] = [NotAModule("not read")] * len(paths)

    def work(first: int) -> None:
        for i in range(first, len(paths), threads):
            try:
                read[i] = read_module(paths[i])
            except (OSError, NotAModule) as e:
                read[i] = e

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, threads)]
    for worker in workers:
        worker.start()
    work(0)
    for worker in workers:
        worker.join()
    return read
