"""Socket options every connection of the data plane gets."""

from __future__ import annotations

import asyncio
import socket
from typing import cast


def stream_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """The transport of a new TCP connection, with Nagle's algorithm off: an SSE event is
    a small write that must leave now, not wait for the previous one's ACK.

    (uvloop's transports implement asyncio.Transport without subclassing it.)"""
    stream = cast(asyncio.Transport, transport)
    sock = stream.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return stream
