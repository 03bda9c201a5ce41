"""Pulling a package: resolved, checked and verified before it appears in the store.

A pull resolves the tag, computes the manifest's digest from its bytes and fetches by
that digest; the annotations must name the kernel asked for before any blob is fetched;
each blob is checked against its descriptor while it streams into a temporary file in
the store; the signature is checked with gpgv before the package is opened; the package
is verified and its own manifest checked again; only then does it appear under its name
(an atomic rename). Any failure leaves nothing in the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from nvdriver import fleet, trust
from nvdriver.atomic import atomic_file
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.package import Manifest, Package
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import Fit
from nvdriver.registry.artifact import (
    ANNOTATION,
    DRIVER_VERSION,
    FLAVOUR,
    KERNEL_RELEASE,
    PACKAGE_TAG,
    artifact_tag,
    kernel_of,
    parse_manifest,
)
from nvdriver.registry.client import Client
from nvdriver.registry.errors import RegistryError
from nvdriver.registry.reference import Reference

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Wanted:
    """The package a node needs: for this kernel release, fitting its ABI (`fit`: the
    running kernel's verdict, kmod/abi.py), of this driver, flavour and package tag (None:
    untagged)."""

    release: str
    fit: Callable[[KernelIdentity], Fit]
    driver_version: str
    flavour: str
    tag: str | None

    @property
    def artifact_tag(self) -> str:
        return artifact_tag(self.driver_version, self.release, self.flavour, self.tag)


def _check_annotations(
    annotations: Mapping[str, str], wanted: Wanted, where: str
) -> KernelIdentity:
    """The kernel the annotations name, once they say the package is the one wanted and
    fits this node's kernel ABI; before any blob is fetched."""
    expected = {
        DRIVER_VERSION: wanted.driver_version,
        FLAVOUR: wanted.flavour,
        KERNEL_RELEASE: wanted.release,
        PACKAGE_TAG: wanted.tag or "",
    }
    wrong = [k for k, v in expected.items() if annotations.get(k) != v]
    if wrong:
        got = ", ".join(f"{k.removeprefix(ANNOTATION)}={annotations.get(k)!r}" for k in wrong)
        raise IntegrityError(
            f"The package {where} is not for this node: {got} (wanted driver "
            f"{wanted.driver_version} {wanted.flavour} for kernel {wanted.release})."
        )
    kernel = kernel_of(annotations, where)
    verdict = wanted.fit(kernel)
    if not verdict.fits:
        raise RegistryError(
            f"The package {where} does not fit this node's kernel: {verdict}.",
            hint="A node of this kernel's ABI builds and pushes its own (it replaces this one "
            "under the tag when PRECOMPILED_REGISTRY_PUSH is set).",
        )
    return kernel


def _check_manifest(m: Manifest, wanted: Wanted, kernel: KernelIdentity, where: str) -> None:
    if (m.kernel_release, m.driver_version, m.flavour, m.tag, m.kernel.abi_digest) != (
        wanted.release,
        wanted.driver_version,
        wanted.flavour,
        wanted.tag,
        kernel.abi_digest,
    ):
        raise IntegrityError(
            f"The package {where} is for driver {m.driver_version} {m.flavour} on kernel "
            f"{m.kernel_release} (ABI {m.kernel.abi_digest[:12]}) although its annotations say "
            f"it is for this node (kernel {wanted.release}, ABI {kernel.abi_digest[:12]})."
        )


def pull(config: Config, ref: Reference, wanted: Wanted, store_root: Path) -> Package:
    """Fetch, check and verify the package `wanted` from `ref` into the store `store_root`
    (the node's); IntegrityError when what the registry holds is bad or untrusted,
    RegistryError when the registry cannot be used. Nothing is left behind on failure."""
    trusted = trust.trusted_keys(config)  # before any request: no key, no pull
    client = Client.for_config(config, ref)
    tag = wanted.artifact_tag
    raw = client.get_manifest(tag)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    where = f"{ref}@{digest} (tag {tag})"
    layer, sig, annotations = parse_manifest(raw, where)
    kernel = _check_annotations(annotations, wanted, where)
    if client.get_manifest(digest) != raw:  # by digest: what the tag pointed at, still
        raise IntegrityError(f"The manifest {where} by digest differs from the one by tag.")
    if sig is None:
        raise IntegrityError(
            f"The package {where} carries no signature: refused (only packages signed by a "
            f"key of PRECOMPILED_TRUSTED_KEYS {trusted} are used)."
        )
    signature = io.BytesIO()
    client.fetch_blob(sig, signature)
    kernel_dir = store_root / wanted.release
    created = not kernel_dir.exists()
    final = kernel_dir / pkg.package_name(wanted.driver_version, wanted.flavour, wanted.tag)
    verified: list[Manifest] = []

    def check(path: Path) -> None:
        trust.verify(path, signature.getvalue(), trusted, source=f"the package {where}")
        try:
            m = pkg.verify(path, keep_failed=False)
        except IntegrityError as e:
            raise IntegrityError(f"The package {where}, signed, fails verification: {e}") from e
        _check_manifest(m, wanted, kernel, where)
        verified.append(m)

    try:
        kernel_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(final, check=check) as out:
            client.fetch_blob(layer, out)
    except BaseException as e:
        if created:
            with contextlib.suppress(OSError):
                kernel_dir.rmdir()
        if isinstance(e, OSError):  # the store's disk, not the registry
            raise DriverError(
                f"Cannot write the package {where} into {kernel_dir}: {e.strerror or e}.",
                hint="NODE_PRECOMPILED_DIR must be writable and have free space.",
            ) from e
        raise
    fleet.write_origin(
        final,
        {
            "origin": "registry",
            "reference": f"{ref}@{digest}",
            "tag": tag,
            "pulled": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    log.info("Pulled %s from the registry %s into %s", final.name, where, kernel_dir)
    return Package(final, verified[0])
