"""The package artifact's format: an OCI image manifest of artifact type ARTIFACT_TYPE.

The OCI empty config, a layer with the package file and a layer with its detached OpenPGP
signature by the fleet's key (trust.py), and annotations naming what it is for: the
driver, flavour, package tag and the kernel ABI it was built for. Written in the OCI 1.1
form (`artifactType`) or, for older registries, the OCI 1.0 form ORAS falls back to (the
config's media type is the artifact type); read in both. No I/O here but hashing a file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvdriver.driver import package as pkg
from nvdriver.driver.package import Manifest
from nvdriver.errors import IntegrityError
from nvdriver.host import KernelIdentity
from nvdriver.pattern import Pattern

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.nvidia-driver.package.v1"
PACKAGE_LAYER = "application/vnd.nvidia-driver.package.v1.tar"
SIGNATURE_LAYER = "application/vnd.nvidia-driver.package.signature.v1.pgp"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
ANNOTATION = "org.nvidia-driver."
DRIVER_VERSION = ANNOTATION + "driver-version"
FLAVOUR = ANNOTATION + "flavour"
KERNEL_RELEASE = ANNOTATION + "kernel-release"
# The kernel ABI the package was built for (docs/package.md): its vermagic, the CRCs of
# the kernel symbols its modules import (compact JSON, {"name": "crc"}), and their digest.
KERNEL_VERMAGIC = ANNOTATION + "kernel-vermagic"
KERNEL_SYMBOLS = ANNOTATION + "kernel-symbols"
KERNEL_ABI_SHA256 = ANNOTATION + "kernel-abi-sha256"
PACKAGE_TAG = ANNOTATION + "tag"

MAX_MANIFEST = 4 << 20
MAX_SIGNATURE = 64 << 10
MAX_PACKAGE = 8 << 30
_DIGEST_RE = Pattern(r"^sha256:[0-9a-f]{64}$")
_TAG_BAD = Pattern(r"[^A-Za-z0-9_.-]")


def artifact_tag(driver_version: str, kernel_release: str, flavour: str, tag: str | None) -> str:
    """`<driver>-<kernel-release>-<flavour>[-<package tag>]`, every character an OCI tag
    may not hold (`+` of Debian's releases) as `_`, at most 128 characters."""
    raw = f"{driver_version}-{kernel_release}-{flavour}" + (f"-{tag}" if tag else "")
    return _TAG_BAD.sub("_", raw)[:128]


def kernel_annotations(kernel: KernelIdentity) -> dict[str, str]:
    symbols = {name: f"{crc:08x}" for name, crc in kernel.symbols}
    return {
        KERNEL_RELEASE: kernel.release,
        KERNEL_VERMAGIC: kernel.vermagic or "",
        KERNEL_SYMBOLS: json.dumps(symbols, separators=(",", ":"), sort_keys=True),
        KERNEL_ABI_SHA256: kernel.abi_digest,
    }


def kernel_of(annotations: Mapping[str, str], where: str) -> KernelIdentity:
    """The kernel ABI an artifact's annotations name; IntegrityError when they are
    malformed or their digest does not match them."""
    try:
        symbols = json.loads(annotations.get(KERNEL_SYMBOLS, ""))
        if not isinstance(symbols, dict):
            raise TypeError("not an object")
        kernel = KernelIdentity(annotations.get(KERNEL_RELEASE, ""), "").with_abi(
            annotations.get(KERNEL_VERMAGIC) or None,
            {str(k): int(str(v), 16) for k, v in symbols.items()},
        )
    except (ValueError, TypeError) as e:
        raise IntegrityError(
            f"The package {where} names its kernel ABI in malformed annotations: {e}."
        ) from e
    if kernel.abi_digest != annotations.get(KERNEL_ABI_SHA256):
        raise IntegrityError(
            f"The package {where} names a kernel ABI whose digest is not the annotated "
            f"{KERNEL_ABI_SHA256.removeprefix(ANNOTATION)}."
        )
    return kernel


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        obj["size"] = self.size
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return obj

    @classmethod
    def from_json(cls, obj: object, limit: int) -> Descriptor:
        if not isinstance(obj, dict):
            raise ValueError("a descriptor is not an object")
        media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media, str) or not isinstance(digest, str):
            raise ValueError("a descriptor lacks mediaType or digest")
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"digest {digest!r} is not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
            raise ValueError(f"size {size!r} of {digest} is not between 0 and {limit}")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ValueError("annotations are not an object")
        return cls(media, digest, size, {str(k): str(v) for k, v in annotations.items()})


def descriptor_of(media_type: str, data: bytes | Path, **annotations: str) -> Descriptor:
    if isinstance(data, Path):
        return Descriptor(
            media_type, "sha256:" + pkg.sha256_file(data), data.stat().st_size, annotations
        )
    return Descriptor(
        media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), annotations
    )


def annotations_for(manifest: Manifest) -> dict[str, str]:
    return {
        DRIVER_VERSION: manifest.driver_version,
        FLAVOUR: manifest.flavour,
        **kernel_annotations(manifest.kernel),
        PACKAGE_TAG: manifest.tag or "",
        CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def artifact_manifest(
    package: Descriptor,
    signature: Descriptor | None,
    annotations: Mapping[str, str],
    *,
    oci_1_1: bool = True,
) -> bytes:
    """The OCI image manifest of a package artifact (a signature layer unless None: the
    tests push unsigned ones, as an attacker would). `oci_1_1`: `artifactType` and the
    empty config; else the form of OCI 1.0 registries (ORAS's `--image-spec v1.0`): the
    config, still `{}`, has the artifact type as its media type."""
    layers = [package] if signature is None else [package, signature]
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE}
    if oci_1_1:
        obj["artifactType"] = ARTIFACT_TYPE
    config = descriptor_of(EMPTY_TYPE if oci_1_1 else ARTIFACT_TYPE, EMPTY)
    obj |= {
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
        "annotations": dict(annotations),
    }
    return json.dumps(obj, sort_keys=True).encode()


def parse_manifest(data: bytes, where: str) -> tuple[Descriptor, Descriptor | None, dict[str, str]]:
    """The package layer, the signature layer (None when missing) and the annotations of a
    package manifest; IntegrityError for anything else (garbage, another artifact)."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("schemaVersion") != 2:
            raise ValueError("not an OCI manifest of schemaVersion 2")
        if obj.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
            raise ValueError(f"media type {obj.get('mediaType')!r}")
        config = obj.get("config")
        kind = obj.get("artifactType") or (  # the OCI 1.0 form: the config's media type
            config.get("mediaType") if isinstance(config, dict) else None
        )
        if kind != ARTIFACT_TYPE:
            raise ValueError(f"artifact type {kind!r}, not {ARTIFACT_TYPE}")
        layers = [Descriptor.from_json(d, MAX_PACKAGE) for d in obj.get("layers") or []]
        packages = [d for d in layers if d.media_type == PACKAGE_LAYER]
        signatures = [d for d in layers if d.media_type == SIGNATURE_LAYER]
        if len(packages) != 1 or len(signatures) > 1:
            raise ValueError("not one package layer and at most one signature layer")
        if signatures and signatures[0].size > MAX_SIGNATURE:
            raise ValueError(f"a signature of {signatures[0].size} bytes")
        annotations = obj.get("annotations")
        if not isinstance(annotations, dict):
            raise ValueError("no annotations")
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise IntegrityError(f"The manifest {where} is not a package artifact: {e}.") from e
    return (
        packages[0],
        (signatures[0] if signatures else None),
        {str(k): str(v) for k, v in annotations.items()},
    )
