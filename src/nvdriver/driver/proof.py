"""The proof that a linked module tree came from a package verified on this node.

Verifying a package reads and hashes every member, and linking hashes NVIDIA's core
object (about 50 MB for 535): seconds at every start under emulation, for a package
that this node verified and linked before and that nobody changed since (issue 22).
When driver/link.py has verified a package and linked its tree, it records inside the
tree (`PROOF`, written before the tree is swapped into place: a tree and its proof
appear together, and a half-linked tree has none) what it verified:

- the package file's identity: device, inode, size, mtime and ctime;
- the SHA-256 of its manifest (canonical JSON), which names every member's SHA-256;
- the identity of each NVIDIA core object it linked, from the driver image;
- the identity of each file of the tree as linked and depmod'ed.

A later start uses the tree as it is (no unpack, no hash, no link, no depmod) only when
every one of these is the same now. Any difference is a full verification and a fresh
link: a package touched, replaced, truncated or rewritten, another core object, a tree
file changed, added or missing, an unreadable or older proof. A package new to this
node (built elsewhere, pulled from a registry) has no proof here and is verified
completely before its first use. The identity taken before verifying must still hold
after it, or no proof is written: a file changed while it was read is not proven.

Why ctime besides mtime: mtime is whatever the writer sets (`touch -d`, `cp -p` and
`tar` restore it), so a package rewritten in place to the same size can keep its size
and mtime. ctime is set by the kernel at every change of the file, its content or its
metadata, and no system call sets it back. What changes ctime without changing the
content (chmod, chown, a copy-up in an overlay, a file system whose device number
differs after a remount) costs one verification, never trust in a changed file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from nvdriver.atomic import write_atomically

if TYPE_CHECKING:
    from nvdriver.driver.package import Manifest

log = logging.getLogger(__name__)

PROOF = ".verified.json"
FORMAT = 1


class FileIdentity(NamedTuple):
    """What says a file is the very one seen before, without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """The identity of `path` now (OSError when it is gone)."""
        st = path.stat()
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Proof(NamedTuple):
    """What a verification and link checked (see the module's docstring)."""

    package: str
    identity: FileIdentity
    manifest_sha256: str
    cores: Mapping[str, FileIdentity]
    tree: Mapping[str, FileIdentity]

    def is_of(self, package: Path) -> bool:
        """Whether `package` is the file this proof names, by its identity alone (a stat):
        the first check, before its manifest is read."""
        try:
            return str(package) == self.package and FileIdentity.of(package) == self.identity
        except OSError:
            return False

    def holds(self, package: Path, manifest: Manifest, cores: Sequence[Path], tree: Path) -> bool:
        """Whether `tree` was linked from this very `package` (with `manifest`) and `cores`,
        verified on this node, and nothing of it has changed since."""
        try:
            now = observe(package, FileIdentity.of(package), manifest, cores, tree)
        except OSError:
            return False
        changed = [
            name for name, was, is_ in zip(self._fields, self, now, strict=True) if is_ != was
        ]
        if changed:
            log.info("%s changed since its proof was written (%s)", tree, ", ".join(changed))
        return not changed

    def unchanged(self, package: Path, tree: Path) -> bool:
        """Whether `package`, the core objects and `tree` are the very files this proof
        names, by their identities alone (a stat of each, nothing read): a restart that
        adopts the modules loaded from `tree` (lifecycle) reads no package. The manifest
        digest needs no reading either: it is the one of the file whose identity holds."""
        try:
            return (
                self.is_of(package)
                and {core: FileIdentity.of(Path(core)) for core in self.cores} == self.cores
                and _tree_files(tree) == self.tree
            )
        except OSError:
            return False

    def to_json(self) -> str:
        def identities(files: Mapping[str, FileIdentity]) -> dict[str, dict[str, int]]:
            return {name: identity._asdict() for name, identity in files.items()}

        obj = {
            "format": FORMAT,
            "package": self.package,
            "identity": self.identity._asdict(),
            "manifest_sha256": self.manifest_sha256,
            "cores": identities(self.cores),
            "tree": identities(self.tree),
        }
        return json.dumps(obj, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Proof:
        """Parse a proof (ValueError, KeyError or TypeError when it is not one)."""
        obj = json.loads(text)
        if obj["format"] != FORMAT:
            raise ValueError(f"format {obj['format']}")

        def identities(entries: dict[str, Any]) -> dict[str, FileIdentity]:
            return {str(name): FileIdentity(**fields) for name, fields in entries.items()}

        return cls(
            package=str(obj["package"]),
            identity=FileIdentity(**obj["identity"]),
            manifest_sha256=str(obj["manifest_sha256"]),
            cores=identities(obj["cores"]),
            tree=identities(obj["tree"]),
        )


def manifest_digest(manifest: Manifest) -> str:
    import hashlib  # OpenSSL's library: not loaded by a restart that adopts

    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


def _tree_files(tree: Path) -> dict[str, FileIdentity]:
    """Every file of the tree but the hidden ones (this proof, lifecycle's loaded stamp)."""
    return {
        entry.name: FileIdentity.of(Path(entry.path))
        for entry in os.scandir(tree)
        if not entry.name.startswith(".")
    }


def observe(
    package: Path, identity: FileIdentity, manifest: Manifest, cores: Sequence[Path], tree: Path
) -> Proof:
    """The proof of `tree`, linked from `package` (whose identity was `identity` before it
    was verified) and `cores`, as they are now (OSError when one is gone)."""
    return Proof(
        package=str(package),
        identity=identity,
        manifest_sha256=manifest_digest(manifest),
        cores={str(core): FileIdentity.of(core) for core in cores},
        tree=_tree_files(tree),
    )


def record(proof: Proof, tree: Path) -> None:
    write_atomically(tree / PROOF, proof.to_json().encode())


def recorded(tree: Path) -> Proof | None:
    """The proof recorded in `tree`, or None (none, or one this program cannot read)."""
    try:
        return Proof.from_json((tree / PROOF).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("Ignoring the unreadable proof %s (%s); verifying again", tree / PROOF, e)
        return None
