"""Socket options Autobahn on Twisted does not apply by itself."""

from __future__ import annotations

import struct
from typing import Any


def set_nodelay(transport: Any) -> None:
    """Turn Nagle off on the TCP socket under ``transport`` (TLS wrappers too).

    Autobahn's ``tcpNoDelay`` is applied before the factory's options are copied
    and the error is swallowed, and a connection taken over from twisted.web
    never runs it at all: small frames then wait for delayed ACKs (up to 40 ms).
    """
    while transport is not None:
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            return
        transport = getattr(transport, "transport", None)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (RFC 6455 §5.2).

    Server frames are never masked, so the frame is a 2 to 10 byte header and
    the payload as it is: far cheaper than Autobahn's general sendMessage,
    which also applies its incoming size limit to what we send.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload
