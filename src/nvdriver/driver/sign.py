"""Module signing for `update --sign KEY` (Secure Boot: lockdown rejects unsigned modules).

KEY is a PEM file holding the private key and its X.509 certificate, as the
kernel's `sign-file` takes them. Finished modules are signed in place before
packing. Split modules are never stored linked (a license constraint:
docs/package.md, "The file"), so they are linked here once, signed, and only the
signature is kept, with the SHA-256 of the module it covers; linking on the node
gives the same bytes (same linker, same inputs) and the signature is appended.

In a container KEY must come from a mount: `docker commit` (the seed's workflow)
keeps whatever lies on the container's own layer, a private key among it
(`check_key`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from nvdriver import mounts
from nvdriver.driver.build import Artifact, BuildOutput, BuildRoot
from nvdriver.driver.link import link_command
from nvdriver.driver.package import sha256_file
from nvdriver.errors import DriverError, UsageError
from nvdriver.host import KernelTree, in_container
from nvdriver.run import run

log = logging.getLogger(__name__)

HASH = "sha512"
# This process's own mount table (its container's, whatever HOST_ROOT says). Tests patch it.
MOUNTINFO = mounts.MOUNTINFO


def on_root_mount(key: Path, mountinfo: Path | None = None) -> bool:
    """Whether `key` lies on the root mount `/` of this process's mount table (or of the
    mountinfo-format file `mountinfo`): in a container, that is its own layer, which
    `docker commit` keeps. `key` is made absolute and its links resolved first, as the
    kernel sees it."""
    held_by = mounts.mount_holding(Path(os.path.realpath(key)), mounts.mount_table(mountinfo))
    return held_by is None or held_by.target == Path("/")


def check_key(key: Path) -> None:
    """Refuse `--sign KEY` before anything is built: a KEY that does not exist (exit 1),
    and in a container (a marker of host.CONTAINER_MARKERS exists) a KEY on the
    container's own layer (by MOUNTINFO; UsageError, exit 2). Outside a container any
    existing KEY is accepted."""
    if not key.is_file():
        raise DriverError(
            f"The signing key {key} does not exist.",
            hint="--sign takes a PEM file with the private key and its X.509 certificate.",
        )
    if not in_container():
        return
    if on_root_mount(key, MOUNTINFO):
        raise UsageError(
            f"The signing key {key} lies on the container's own file system (its root "
            "mount): `docker commit` would keep the private key in the image, and anyone "
            "with the image would have it.",
            hint="Mount the key into the container instead and give that path, e.g. "
            "`-v /path/on/the/host/key.pem:/keys/key.pem:ro` and `--sign /keys/key.pem`.",
        )


def sign_build(
    output: BuildOutput, kernel: KernelTree, key: Path, workdir: Path, build_root: BuildRoot
) -> BuildOutput:
    """Sign every module of `output`; `workdir` lies under the build root."""
    sign_file = kernel.output / "scripts" / "sign-file"
    if not sign_file.is_file():
        raise DriverError(
            f"The kernel tree {kernel.output} has no scripts/sign-file to sign modules with.",
            hint="Build against a kernel tree with its scripts prepared, or drop --sign.",
        )
    workdir.mkdir(parents=True, exist_ok=True)
    inner_key = workdir / "signing-key.pem"
    inner_key.touch(mode=0o600)
    shutil.copyfile(key, inner_key)
    try:
        key_inside = build_root.inside(inner_key)
        signer = [build_root.inside(sign_file), HASH, key_inside, key_inside]
        scripts = [build_root.inside(s) for s in output.ld_scripts]
        signed = [_sign(a, output, signer, scripts, workdir, build_root) for a in output.artifacts]
        ident = run(["modinfo", "-F", "signer", str(_first_signed(signed, workdir))]).stdout
    finally:
        inner_key.unlink()
    log.info("Signed %d modules (%s, signer %s)", len(signed), HASH, ident.strip())
    return dataclasses.replace(
        output, artifacts=tuple(signed), signing={"hash": HASH, "signer": ident.strip()}
    )


def _sign(
    a: Artifact,
    output: BuildOutput,
    signer: list[str],
    scripts: list[str],
    workdir: Path,
    build_root: BuildRoot,
) -> Artifact:
    if a.core is None:
        run(build_root.argv([*signer, build_root.inside(a.path)]))
        return a
    linked = workdir / f"{a.module}.ko"
    core = output.tree / a.core
    ld = link_command(
        ["ld"],
        scripts,
        build_root.inside(linked),
        build_root.inside(a.path),
        build_root.inside(core),
    )
    run(build_root.argv(ld))
    unsigned = sha256_file(linked)
    size = linked.stat().st_size
    run(build_root.argv([*signer, build_root.inside(linked)]))
    signature = workdir / f"{a.module}.ko.sig"
    with linked.open("rb") as f:
        f.seek(size)
        signature.write_bytes(f.read())
    return dataclasses.replace(a, signature=signature, linked_sha256=unsigned)


def _first_signed(artifacts: list[Artifact], workdir: Path) -> Path:
    for a in artifacts:
        if a.signature is not None:
            return workdir / f"{a.module}.ko"
    return artifacts[0].path
