"""Value types of the config files: names, durations, secrets, hosts and URLs.

Each is a `str`/`float` annotated with a validator whose ValueError message is what
`sluice check` prints, so the wording here is user-facing. Strings that end up in a
rendered nginx config or Worker script (hosts, URLs, paths, rates) are matched against
strict patterns: nothing that could close a directive or a string literal (`;`, `{`, `}`,
quotes, whitespace, newlines) can pass.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, AllowInfNan, BeforeValidator, Strict

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
# Upstream model ids are whatever the backend serves (`/models/llama`, `org/name:tag`);
# they go into a JSON body only, so anything printable without whitespace or quotes.
UPSTREAM_MODEL_RE = re.compile(r"[^\s\"'\\;{}$`]{1,256}")
ENV_RE = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]*)")
SHA256_RE = re.compile(r"sha256:([0-9a-fA-F]*)")
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){LABEL}(?:\.{LABEL})*\.?")
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
HTTP_PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]*")
FILE_PATH_RE = re.compile(r"[A-Za-z0-9._/+-]+")
HEADER_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class TypeLabel:
    """How docs/CONFIG.md names a value type (pydantic ignores unknown metadata)."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label


def check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, at most 64 characters"
        )
    return value


def check_model(value: str) -> str:
    if not MODEL_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid model name: use letters, digits and '._:/-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return value


def check_upstream_model(value: str) -> str:
    if not UPSTREAM_MODEL_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid model id: 1-256 characters, no whitespace or quotes"
        )
    return value


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string with a unit: 250ms, 5s, 2m, 1h."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration (seconds, or like 250ms, 5s, 2m), got {value}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float
            raise ValueError(f"a duration must be finite, got {len(str(value))} digits") from None
    elif isinstance(value, str):
        match = DURATION_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"expected a duration (seconds, or like 250ms, 5s, 2m, 1h), got {value!r}"
            )
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("expected a duration (seconds, or like 250ms, 5s, 2m, 1h)")
    if not math.isfinite(seconds):  # .inf, .nan (nan passes `<= 0`; 1e999ms is inf)
        raise ValueError(f"a duration must be finite, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be > 0, got {value!r}")
    return seconds


MIN_KEEPALIVE_INTERVAL = 0.1


def parse_keepalive_interval(value: Any) -> Any:
    """A duration of at least 100ms: a keep-alive beats an idle timeout of seconds, and
    a shorter one (0.1ms reads as 0 in nginx and the Worker) floods every waiting stream."""
    seconds = parse_duration(value)
    if seconds < MIN_KEEPALIVE_INTERVAL:
        raise ValueError(f"a keep-alive interval must be at least 100ms, got {value!r}")
    return seconds


def parse_duration_or_zero(value: Any) -> Any:
    """A duration, or 0 (off)."""
    if not isinstance(value, bool) and value in (0, "0"):
        return 0.0
    return parse_duration(value)


def check_secret(value: str) -> str:
    """`sha256:<64 hex>` or `env:VAR`. The message never echoes the value: it may be a key."""
    if ENV_RE.fullmatch(value):
        return value
    match = SHA256_RE.fullmatch(value)
    if match is not None:
        digest = match.group(1)
        if len(digest) != 64:
            raise ValueError(f"sha256: needs 64 hex digits, got {len(digest)}")
        return "sha256:" + digest.lower()
    if value.startswith("sha256:"):
        raise ValueError("sha256: needs 64 hex digits (0-9, a-f)")
    if value.startswith("env:"):
        raise ValueError("env: needs a variable name ([A-Za-z_][A-Za-z0-9_]*)")
    raise ValueError(
        "plaintext secret: a key or token in a file must be sha256:<64 hex digits> "
        "(`sluice key new APP` prints one) or env:VAR"
    )


def _check_host_text(value: str) -> str | None:
    """None when `value` is a hostname or an IP address; otherwise why not."""
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if HOSTNAME_RE.fullmatch(value):
        return None
    return f"{value!r} is not a hostname or IP address"


def check_host(value: str) -> str:
    problem = _check_host_text(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def check_server_name(value: str) -> str:
    """An nginx server_name: a hostname, `*.` + hostname, or `_` (catch-all)."""
    if value == "_":
        return value
    host = value[2:] if value.startswith("*.") else value
    if HOSTNAME_RE.fullmatch(host) is None:
        raise ValueError(f"{value!r} is not a server name (hostname, *.hostname or _)")
    return value


def split_url(value: str) -> tuple[str, str, int | None]:
    """`http(s)://host[:port]` -> (scheme, host, port); ValueError otherwise."""
    if CONTROL_RE.search(value) or any(c.isspace() for c in value):
        raise ValueError("a URL must not contain whitespace or control characters")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not a URL: expected http://host[:port] or https://...")
    rest = rest.removesuffix("/")
    for char, what in (("@", "user info"), ("/", "a path"), ("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise ValueError(f"{value!r}: a URL here is scheme://host[:port], without {what}")
    port: int | None = None
    if rest.startswith("["):  # [IPv6]:port
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise ValueError(f"{value!r}: unclosed '[' in the host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
        port_text = tail.removeprefix(":") if tail else ""
        if tail and not tail.startswith(":"):
            raise ValueError(f"{value!r} is not a URL")
    else:
        host, colon, port_text = rest.partition(":")
        if colon and not port_text:
            raise ValueError(f"{value!r}: empty port")
        problem = _check_host_text(host)
        if problem is not None:
            raise ValueError(f"{value!r}: {problem}")
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{value!r}: port must be 1-65535")
        port = int(port_text)
    return scheme, host, port


def check_url(value: str) -> str:
    split_url(value)
    return value.removesuffix("/")


DEFAULT_PORTS = {"http": 80, "https": 443}


def check_origin(value: str) -> str:
    """A CORS origin: a URL without a path, or `*`; normalised to what a browser sends in
    its Origin header (lower-case scheme and host, no default port, compressed IPv6), which
    the Worker compares as a string."""
    if value == "*":
        return value
    scheme, sep, rest = value.partition("://")
    scheme, host, port = split_url(scheme.lower() + sep + rest)
    host = f"[{ipaddress.IPv6Address(host).compressed}]" if ":" in host else host.lower()
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def check_host_port(value: str) -> str:
    """`host:port` or `[IPv6]:port` of an nginx upstream server line."""
    host, colon, port = value.rpartition(":")
    if not value.startswith("[") and ":" in host:
        # nginx reads the text after the first colon as the port: "invalid port in upstream".
        like = f", like [{host}]:{port}" if _is_ipv6(host) and port.isdigit() else ""
        raise ValueError(f"{value!r}: an IPv6 address goes in brackets, [address]:port{like}")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        if "%" in host or not _is_ipv6(host[1:-1]):  # nginx takes no zone id
            raise ValueError(f"{host[1:-1]!r} is not an IPv6 address")
        return value
    problem = _check_host_text(host)
    if problem is not None:
        raise ValueError(problem)
    return value


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def check_http_path(value: str) -> str:
    if not HTTP_PATH_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an HTTP path (starts with /; letters, digits, ._~/-)")
    return value


def check_file_path(value: str) -> str:
    if not FILE_PATH_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a file path (letters, digits and ._/+- only)")
    return value


def check_sticky(value: str) -> str:
    """`header:<name>`, `user` or `app`."""
    if value in ("user", "app"):
        return value
    kind, _, header = value.partition(":")
    if kind == "header" and HEADER_RE.fullmatch(header):
        return f"header:{header.lower()}"
    raise ValueError(f"{value!r} is not a sticky key: expected header:<name>, user or app")


def check_header_name(value: str) -> str:
    if not HEADER_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value.lower()


RATE_RE = re.compile(r"[1-9]\d{0,6}r/[sm]")
WORKER_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ROUTE_LABEL = r"(?:\*|[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
ROUTE_PATTERN_RE = re.compile(rf"\*?{_ROUTE_LABEL}(?:\.{_ROUTE_LABEL})*(?:/[A-Za-z0-9._~%/*-]*)?")


def check_rate(value: str) -> str:
    if not RATE_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a rate like 20r/s or 600r/m")
    return value


def check_worker_name(value: str) -> str:
    if not WORKER_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a Worker name (lower-case letters, digits, '-')")
    return value


def check_route_pattern(value: str) -> str:
    if not ROUTE_PATTERN_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a route pattern like api.example.com/v1/*")
    return value


def check_text(value: str) -> str:
    """Free text that may be logged or rendered in a comment: one line, no control chars."""
    if CONTROL_RE.search(value):
        raise ValueError("must be one line without control characters")
    return value


# The integers JSON encoders and vLLM take (orjson refuses wider ones: a preset's seed of
# 10**35 passed the schema and then failed every request it applied to with a 500).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def check_int64(value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{value} does not fit in 64 bits ({INT64_MIN} to {INT64_MAX})")
    return value


def check_json_value(value: Any) -> Any:
    """A value sluice sends in a JSON body as written (a forced request field): every
    number in it finite and every integer within 64 bits, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            check_int64(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a finite number (JSON has no inf or nan)")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return value


def check_nonempty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


Name = Annotated[str, Strict(), AfterValidator(check_name), TypeLabel("name")]
ModelName = Annotated[str, Strict(), AfterValidator(check_model), TypeLabel("model name")]
UpstreamModel = Annotated[
    str, Strict(), AfterValidator(check_upstream_model), TypeLabel("model id")
]
Secret = Annotated[str, Strict(), AfterValidator(check_secret), TypeLabel("secret")]
Host = Annotated[str, Strict(), AfterValidator(check_host), TypeLabel("host")]
ServerName = Annotated[str, Strict(), AfterValidator(check_server_name), TypeLabel("server name")]
Url = Annotated[str, Strict(), AfterValidator(check_url), TypeLabel("URL")]
Origin = Annotated[str, Strict(), AfterValidator(check_origin), TypeLabel("origin")]
HostPort = Annotated[str, Strict(), AfterValidator(check_host_port), TypeLabel("host:port")]
HttpPath = Annotated[str, Strict(), AfterValidator(check_http_path), TypeLabel("HTTP path")]
FilePath = Annotated[str, Strict(), AfterValidator(check_file_path), TypeLabel("file path")]
Sticky = Annotated[str, Strict(), AfterValidator(check_sticky), TypeLabel("sticky key")]
HeaderName = Annotated[str, Strict(), AfterValidator(check_header_name), TypeLabel("header name")]
Rate = Annotated[str, Strict(), AfterValidator(check_rate), TypeLabel("rate")]
WorkerName = Annotated[str, Strict(), AfterValidator(check_worker_name), TypeLabel("worker name")]
RoutePattern = Annotated[
    str, Strict(), AfterValidator(check_route_pattern), TypeLabel("route pattern")
]
Text = Annotated[str, Strict(), AfterValidator(check_text), TypeLabel("string")]
NonEmptyText = Annotated[str, Strict(), AfterValidator(check_nonempty), TypeLabel("string")]
Duration = Annotated[float, BeforeValidator(parse_duration), TypeLabel("duration")]
KeepaliveInterval = Annotated[
    float, BeforeValidator(parse_keepalive_interval), TypeLabel("duration, >= 100ms")
]
DurationOrZero = Annotated[
    float, BeforeValidator(parse_duration_or_zero), TypeLabel("duration or 0")
]
Int = Annotated[int, Strict(), AfterValidator(check_int64), TypeLabel("integer")]
# .inf and .nan are YAML floats; as a sampling value or a weight they are always a slip
# (JSON has neither: orjson would send an infinite temperature to vLLM as null).
Float = Annotated[float, Strict(), AllowInfNan(False), TypeLabel("number")]
Bool = Annotated[bool, Strict(), TypeLabel("boolean")]
Port = Annotated[int, Strict(), TypeLabel("port")]
