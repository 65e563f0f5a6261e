"""The request-field policy (allow / deny / force on top-level body fields other than the
sampling ones) and per-app prefix-cache isolation through vLLM's `cache_salt`.

Deny means "may not change": a denied field sent as null, or with the value vLLM uses when
it is left out (`priority: 0`), changes nothing and is accepted (and dropped); any other
value is refused with 400 naming the field and who denies it.

The salt of an app is HMAC-SHA256(key, app name), hex; a client that sends its own
cache_salt gets HMAC-SHA256(key, app name + NUL + its salt), so it can partition its own
app's cache further but never reach another app's. The key is secret: without it a
tenant cannot compute another tenant's salt.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Final

from .errors import ApiError, bad_request
from .snapshot import FieldRules

# vLLM's value for a field the request leaves out (ChatCompletionRequest's and
# ResponsesRequest's defaults).
VLLM_FIELD_DEFAULTS: Final[dict[str, Any]] = {"priority": 0, "background": False}
CACHE_SALT: Final = "cache_salt"


def apply_field_rules(body: dict[str, Any], rules: FieldRules) -> bool:
    """Raises ApiError(400) for a denied field set to another value; sets forced fields.
    True when the body changed."""
    forced = rules.forced_items
    changed = bool(forced)
    for field, who in rules.denied_items:
        value = body.get(field)
        if value is None:
            continue
        default = VLLM_FIELD_DEFAULTS.get(field)
        if default is not None and value == default and type(value) is type(default):
            del body[field]
            changed = True
            continue
        raise ApiError(
            400,
            f"'{field}' may not be set by the client: {who} denies it",
            param=field,
            code="field_denied",
        )
    for field, value in forced:
        body[field] = value
    return changed


def app_salt(key: bytes, app: str) -> str:
    return hmac.new(key, app.encode(), hashlib.sha256).hexdigest()


def salt_request(body: dict[str, Any], key: bytes, app: str, base: str) -> None:
    """Sets body["cache_salt"]: the app's salt `base`, or one derived from the client's."""
    given = body.get(CACHE_SALT)
    if given is None:
        body[CACHE_SALT] = base
        return
    if not isinstance(given, str):
        raise bad_request("'cache_salt' must be a string", param=CACHE_SALT, code="invalid_type")
    message = app.encode() + b"\0" + given.encode()
    body[CACHE_SALT] = hmac.new(key, message, hashlib.sha256).hexdigest()
