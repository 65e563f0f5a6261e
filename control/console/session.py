"""The console's login session: a signed cookie and a CSRF token, both stateless.

The signing key is derived from the admin token's SHA-256 digest, which every worker and
replica shares through its snapshot: a session opened on one process is valid on all,
and rotating the admin token ends every session. The cookie holds only an expiry and a
MAC; it never carries the token. POSTs must also send `x-csrf-token`, a MAC of the cookie
that only a page read from this origin can know (SameSite=Strict is the first line).
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE_NAME = "sluice_console"
SESSION_SECONDS = 8 * 3600
CSRF_HEADER = b"x-csrf-token"


def _key(admin_token_hash: bytes) -> bytes:
    return hashlib.sha256(b"sluice-console-session\0" + admin_token_hash).digest()


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def issue_cookie(admin_token_hash: bytes, now: float | None = None) -> str:
    """The cookie value for a fresh session: `<expiry>.<mac>`."""
    expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
    return f"{expires}.{_mac(_key(admin_token_hash), f'session:{expires}')}"


def session_valid(admin_token_hash: bytes, value: str, now: float | None = None) -> bool:
    expires_text, _, mac = value.partition(".")
    if not expires_text.isdigit() or len(mac) != 64:
        return False
    expected = _mac(_key(admin_token_hash), f"session:{expires_text}")
    # compare_digest refuses str with non-ASCII (a cookie is read as latin-1): no match.
    if not mac.isascii() or not hmac.compare_digest(mac, expected):
        return False
    return int(expires_text) > (now if now is not None else time.time())


def csrf_token(admin_token_hash: bytes, cookie_value: str) -> str:
    return _mac(_key(admin_token_hash), f"csrf:{cookie_value}")


def csrf_valid(admin_token_hash: bytes, cookie_value: str, given: str) -> bool:
    return given.isascii() and hmac.compare_digest(
        csrf_token(admin_token_hash, cookie_value), given
    )


def cookie_from_header(header: bytes | None) -> str | None:
    """The console cookie's value from a Cookie header, if present."""
    if not header:
        return None
    for part in header.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME and value:
            return value
    return None


def set_cookie_header(value: str, *, secure: bool) -> bytes:
    attrs = f"{COOKIE_NAME}={value}; Path=/console; HttpOnly; SameSite=Strict"
    attrs += f"; Max-Age={SESSION_SECONDS}"
    if secure:
        attrs += "; Secure"
    return attrs.encode()


def clear_cookie_header() -> bytes:
    return f"{COOKIE_NAME}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0".encode()
