"""What goes wrong with a registry, as error types: a registry that cannot be used (the
fallback is a build), a failure another try may cure, a manifest form an older registry
refuses."""

from __future__ import annotations

from nvdriver.errors import DriverError


class RegistryError(DriverError):
    """The registry could not be used (down, refused credentials, no such tag, a cut
    connection): nothing says the package is bad, so the fallback is a build (exit 1)."""


class TransientError(RegistryError):
    """A failure another try may cure (a connection reset, cut or timed out): `kind` names
    it for the summary, `reached` is how far a blob came."""

    def __init__(self, message: str, kind: str, *, reached: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.reached = reached


class FormRefused(RegistryError):
    """The registry refused the manifest's form (an OCI 1.1 artifact on an older registry)."""


# The distribution API's error codes of a registry that refuses a manifest's form.
FORM_REFUSED = frozenset({"MANIFEST_INVALID", "UNSUPPORTED"})
