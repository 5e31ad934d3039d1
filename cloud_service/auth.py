"""Node authentication: the shared node token from gRPC metadata, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from cloud_service import errors
from splitclip.constants import TOKEN_METADATA_KEY


def token_from_metadata(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """`x-splitclip-token: T` or `authorization: Bearer T`."""
    for key, value in metadata:
        k = key.lower()
        v = value.decode() if isinstance(value, bytes) else str(value)
        if k == TOKEN_METADATA_KEY:
            return v
        if k == "authorization" and v.lower().startswith("bearer "):
            return v[7:].strip()
    return None


class TokenAuth:
    """With a token every call must carry it; with "" (no token configured) every call passes."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raise UNAUTHENTICATED unless the metadata carries the token. `None` is a call from inside
        the cluster (a deployment handle, no gRPC metadata at all): trusted."""
        if not self._token or metadata is None:
            return
        given = token_from_metadata(metadata)
        if given is None:
            raise errors.unauthenticated(
                f"this service requires a node token: send metadata '{TOKEN_METADATA_KEY}: <token>' "
                "or 'authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(given.encode(), self._token):
            raise errors.unauthenticated("node token is wrong")
