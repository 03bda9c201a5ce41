"""Where a fleet keeps its packages: PRECOMPILED_REGISTRY as HOST[:PORT]/REPOSITORY."""

from __future__ import annotations

import dataclasses

from nvdriver.config import REGISTRY_REF_RE
from nvdriver.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Reference:
    """HOST[:PORT]/REPO[/...]: where a fleet keeps its packages."""

    host: str  # with the port, as the auth file and the Host header name it
    repository: str

    @classmethod
    def parse(cls, text: str, name: str = "PRECOMPILED_REGISTRY") -> Reference:
        match = REGISTRY_REF_RE.fullmatch(text)
        if not match:
            raise UsageError(
                f"{name}={text!r} is malformed: expected HOST[:PORT]/REPOSITORY "
                "(lower-case repository path, no scheme, no tag).",
                hint=f"Fix {name}, e.g. registry.example:5000/fleet/nvidia-driver.",
            )
        return cls(match["host"], match["repo"])

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}"
