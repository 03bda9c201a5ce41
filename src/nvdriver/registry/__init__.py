"""Packages shared through an OCI registry: the distribution API, spoken directly.

Why no library: the API a package needs is six requests (GET/HEAD a manifest or a
blob, POST+PUT a blob upload, PUT a manifest) plus the token dance, which `http.client`
and `ssl` do in a few hundred lines; the image gains no dependency and no byte. PyPI's
`oras` (with `requests`, `jsonschema`, ~7 MB) sent its blob PUT without credentials
against a registry with basic auth over TLS (README, "Registry"), and the `skopeo`/`oras`
binaries are 20-40 MB each.

One concern per module:

- `reference`: where a fleet keeps its packages (PRECOMPILED_REGISTRY, HOST/REPO).
- `errors`: a registry that cannot be used, a failure worth another try, a refused form.
- `artifact`: the package artifact's format: media types, annotations, descriptors, the
  manifest written (OCI 1.1, or the OCI 1.0 form older registries take) and read.
- `auth`: credentials (environment, auth file, credential helpers) and the answer to a
  401 challenge (Basic, or a Bearer token from the registry's token service).
- `client`: one repository over HTTP(S): redirects, retries within a budget, resumed
  blobs checked as they stream.
- `pushing`: a package signed with the fleet key and pushed with its signature.
- `pulling`: a package resolved, checked, fetched and verified into the node's store.

Importing this package costs http.client and ssl: callers on the init path import it
where a registry is used, not at the top of their module.
"""

from nvdriver.registry.artifact import (
    ANNOTATION,
    ARTIFACT_TYPE,
    CREATED,
    DRIVER_VERSION,
    EMPTY,
    EMPTY_TYPE,
    FLAVOUR,
    KERNEL_ABI_SHA256,
    KERNEL_RELEASE,
    KERNEL_SYMBOLS,
    KERNEL_VERMAGIC,
    MANIFEST_TYPE,
    MAX_MANIFEST,
    MAX_PACKAGE,
    MAX_SIGNATURE,
    PACKAGE_LAYER,
    PACKAGE_TAG,
    SIGNATURE_LAYER,
    TITLE,
    Descriptor,
    annotations_for,
    artifact_manifest,
    artifact_tag,
    descriptor_of,
    kernel_annotations,
    kernel_of,
)
from nvdriver.registry.auth import CLIENT_ID, Credentials, credentials
from nvdriver.registry.client import CHUNK, MAX_REDIRECTS, TIMEOUT, Client
from nvdriver.registry.errors import FORM_REFUSED, FormRefused, RegistryError, TransientError
from nvdriver.registry.pulling import Wanted, pull
from nvdriver.registry.pushing import push, push_artifact
from nvdriver.registry.reference import Reference

__all__ = [
    "ANNOTATION",
    "ARTIFACT_TYPE",
    "CHUNK",
    "CLIENT_ID",
    "CREATED",
    "DRIVER_VERSION",
    "EMPTY",
    "EMPTY_TYPE",
    "FLAVOUR",
    "FORM_REFUSED",
    "KERNEL_ABI_SHA256",
    "KERNEL_RELEASE",
    "KERNEL_SYMBOLS",
    "KERNEL_VERMAGIC",
    "MANIFEST_TYPE",
    "MAX_MANIFEST",
    "MAX_PACKAGE",
    "MAX_REDIRECTS",
    "MAX_SIGNATURE",
    "PACKAGE_LAYER",
    "PACKAGE_TAG",
    "SIGNATURE_LAYER",
    "TIMEOUT",
    "TITLE",
    "Client",
    "Credentials",
    "Descriptor",
    "FormRefused",
    "Reference",
    "RegistryError",
    "TransientError",
    "Wanted",
    "annotations_for",
    "artifact_manifest",
    "artifact_tag",
    "credentials",
    "descriptor_of",
    "kernel_annotations",
    "kernel_of",
    "pull",
    "push",
    "push_artifact",
]
