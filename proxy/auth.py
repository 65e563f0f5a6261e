"""Who is calling: the edge's origin secret and the app's API key.

Keys are stored as SHA-256 digests only. The lookup is by digest (which leaks nothing
usable about a key) and the match is confirmed with a constant-time comparison.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from .errors import ApiError
from .http import Request
from .snapshot import App, Snapshot

ORIGIN_SECRET_HEADER: Final = b"x-sluice-origin-secret"


def api_key(request: Request) -> bytes | None:
    """The key from `Authorization: Bearer <key>` or `x-api-key`."""
    auth = request.headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
        return None
    return request.headers.get(b"x-api-key")


def check_origin(request: Request, snap: Snapshot) -> None:
    if snap.origin_secret_hash is None:
        return
    given = request.headers.get(ORIGIN_SECRET_HEADER, b"")
    if not hmac.compare_digest(hashlib.sha256(given).digest(), snap.origin_secret_hash):
        raise ApiError(
            403,
            "requests must come through the edge (origin secret missing or wrong)",
            type="permission_error",
            code="origin_secret_required",
        )


def authenticate(request: Request, snap: Snapshot) -> App | None:
    """The calling app; None when the gateway declares no apps (open). Raises 401/403."""
    check_origin(request, snap)
    if not snap.requires_auth:
        return None
    key = api_key(request)
    if not key:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'",
            type="authentication_error",
            code="missing_api_key",
        )
    digest = hashlib.sha256(key).digest()
    app = snap.apps_by_key.get(digest)
    if app is None or not any(hmac.compare_digest(digest, h) for h in app.key_hashes):
        raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    return app
