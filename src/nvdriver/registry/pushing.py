"""Pushing a package: signed with the fleet key, its blobs and manifest stored under its tag.

Older registries (Harbor before 2.8, Artifactory, Nexus) refuse the OCI 1.1 form of an
artifact (`artifactType` and the empty config); a push they refuse so is made again in
the form ORAS falls back to (the config's media type is the artifact type, no
`artifactType`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from nvdriver import trust
from nvdriver.config import Config
from nvdriver.driver.package import Package
from nvdriver.errors import UsageError
from nvdriver.registry.artifact import (
    EMPTY,
    EMPTY_TYPE,
    PACKAGE_LAYER,
    SIGNATURE_LAYER,
    TITLE,
    Descriptor,
    annotations_for,
    artifact_manifest,
    artifact_tag,
    descriptor_of,
)
from nvdriver.registry.client import Client
from nvdriver.registry.errors import FormRefused, RegistryError
from nvdriver.registry.reference import Reference

log = logging.getLogger(__name__)


def push_artifact(
    client: Client,
    tag: str,
    package: Descriptor,
    signature: Descriptor | None,
    annotations: Mapping[str, str],
) -> str:
    """Store the manifest under `tag` (its blobs pushed): the OCI 1.1 form, or the OCI 1.0
    form when the registry refuses that one (older Harbor, Artifactory, Nexus); the
    manifest's digest."""
    try:
        return client.push_manifest(tag, artifact_manifest(package, signature, annotations))
    except FormRefused as e:
        log.info("%s refused an OCI 1.1 artifact (%s); pushing the OCI 1.0 form", client.ref, e)
        older = artifact_manifest(package, signature, annotations, oci_1_1=False)
        try:
            return client.push_manifest(tag, older)
        except RegistryError as again:
            raise RegistryError(
                f"{e.message.rstrip('.')} (the OCI 1.1 form); {again.message} (the OCI 1.0 form)"
            ) from again


def push(config: Config, package: Package, ref: Reference) -> str:
    """Sign `package` with the fleet key and push it with its signature; the pushed
    reference `HOST/REPO@sha256:...` (under the tag of `artifact_tag`)."""
    if config.fleet_signing_key is None:
        raise UsageError("Pushing a package needs PRECOMPILED_SIGNING_KEY (the fleet's key).")
    m = package.manifest
    tag = artifact_tag(m.driver_version, m.kernel_release, m.flavour, m.tag)
    signature = trust.sign(package.path, config.fleet_signing_key)
    client = Client.for_config(config, ref)
    layer = descriptor_of(PACKAGE_LAYER, package.path, **{TITLE: package.path.name})
    sig = descriptor_of(SIGNATURE_LAYER, signature, **{TITLE: package.path.name + ".asc"})
    try:
        client.push_blob(descriptor_of(EMPTY_TYPE, EMPTY).digest, EMPTY)
        client.push_blob(layer.digest, package.path)
        client.push_blob(sig.digest, signature)
        digest = push_artifact(client, tag, layer, sig, annotations_for(m))
    except RegistryError as e:
        raise RegistryError(
            f"Pushing {package.path.name} to the registry {ref} (tag {tag}) failed: {e.message}",
            hint=e.hint,
        ) from e
    log.info("Pushed %s to %s:%s (%s@%s)", package.path.name, ref, tag, ref, digest)
    return f"{ref}@{digest}"
