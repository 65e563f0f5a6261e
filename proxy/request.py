"""One parsed request, and the checks on its head that RFC 9112 leaves to the server
(version, Host, transfer coding, Expect), made before any of its body is read."""

from __future__ import annotations

from typing import Final

from .upload import BodyStream

# The request methods whose requests carry a body in practice: one of them without
# Content-Length or Transfer-Encoding, followed by bytes, is a client that forgot framing.
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class HeadError(Exception):
    """A request head the server refuses: answered with `status`, then the connection
    closes (its body, if any, is not read)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Request:
    """One parsed request. Header names are lower-case bytes; repeated headers are joined.

    `upgrade` is the Upgrade header's value when the client asked for a protocol switch
    (`Connection: upgrade`): the server ignores it and answers over HTTP/1.1 unless the
    handler calls `Response.claim_upgrade()`."""

    __slots__ = (
        "body",
        "body_stream",
        "client",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "reserved",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[bytes, bytes],
        http_version: str,
        keep_alive: bool,
        client: str,
        upgrade: bytes | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.client = client
        self.upgrade = upgrade
        self.body = b""
        self.reserved = 0  # bytes of the server's body budget this request holds
        # Set when the server streams this request's body to the handler (proxy/upload.py).
        self.body_stream: BodyStream | None = None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


def check_head(method: str, http_version: str, headers: dict[bytes, bytes]) -> None:
    """Raises HeadError for a head this server does not take (the parser accepted it)."""
    if method == "CONNECT":
        # llhttp reads a CONNECT as a switch to a tunnel (an upgrade that cannot be
        # declined): refused here, before it is read as one.
        raise HeadError(
            405, "CONNECT is not supported: this is an API gateway", "method_not_allowed"
        )
    if http_version == "0.9":
        raise HeadError(400, "the request line has no HTTP version", "bad_http")
    if http_version not in ("1.0", "1.1"):
        raise HeadError(505, f"HTTP/{http_version} is not supported; use HTTP/1.1", "http_version")
    host = headers.get(b"host")
    if host is None:
        if http_version == "1.1":
            raise HeadError(400, "an HTTP/1.1 request needs a Host header", "missing_host")
    elif "," in host.decode("latin-1"):  # repeated Host headers were joined with ", "
        # (Searched as text: compiled, bytes' `in` builds and drops a TypeError first.)
        raise HeadError(400, "more than one Host header", "bad_host")
    coding = headers.get(b"transfer-encoding")
    if coding is not None and coding.strip().lower() != b"chunked":
        # The parser frames `gzip, chunked` by its last coding, but nothing here decodes
        # gzip: RFC 9112 6.1 says 501 for a coding the server does not understand.
        raise HeadError(
            501,
            "Transfer-Encoding other than chunked is not supported",
            "transfer_encoding_not_supported",
        )
    if coding is not None and b"content-length" in headers:
        raise HeadError(400, "both Content-Length and Transfer-Encoding", "bad_http")
    expect = headers.get(b"expect")
    if expect is not None and expect.strip().lower() != b"100-continue":
        raise HeadError(417, "the only Expect value supported is 100-continue", "expect")


def declared_length(headers: dict[bytes, bytes]) -> int:
    """Content-Length as a number (0 when absent; the parser already rejected bad ones)."""
    value = headers.get(b"content-length")
    if value is None:
        return 0
    # The digits summed here (int() of bytes parses through a str: ~4x); anything else
    # (spaces around them, which the parser lets through) goes to int().
    n = 0
    size = len(value)
    i = 0
    while i < size and 48 <= value[i] <= 57:
        n = n * 10 + value[i] - 48
        i += 1
    if 0 < i == size <= 18:
        return n
    try:
        return int(value)
    except ValueError:
        return 0


def replay_head(method: str, url: bytes, http_version: str, headers: dict[bytes, bytes]) -> bytes:
    """The request head again without its upgrade request: fed to a fresh parser so that
    the request (and its body, which the parser skips on an upgrade) is read as plain
    HTTP/1.1."""
    lines = [b"%s %s HTTP/%s\r\n" % (method.encode("ascii"), url, http_version.encode())]
    for name, value in headers.items():
        if name in (b"upgrade", b"http2-settings"):
            continue
        line = value
        if name == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            kept = [t for t in tokens if t and t.lower() not in (b"upgrade", b"http2-settings")]
            if not kept:
                continue
            line = b", ".join(kept)
        lines.append(name + b": " + line + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


__all__ = ["BODY_METHODS", "HeadError", "Request", "check_head", "declared_length", "replay_head"]
