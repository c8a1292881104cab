"""Socket options and a write path Autobahn on Twisted does not provide by itself."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp


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


def writer(transport: Any) -> Callable[[bytes], None]:
    """The cheapest way to write to ``transport`` with the semantics of its ``write``.

    Twisted's TCP ``write`` only buffers: it registers the socket for
    writability with epoll, and on the next turn sends and deregisters it.
    For a fan-out of one small frame per connection per turn that is three
    system calls and a pass through the reactor per frame where one ``send``
    would do. On a plain TCP connection whose buffer is empty, the frame is
    sent at once, as asyncio's transports do; whatever the kernel does not
    take (or everything, while anything is still buffered, or the connection
    is closing) goes through ``write`` as before, so order, back-pressure to
    the registered producer, and loss detection are Twisted's own.
    Other transports (TLS, test doubles) get their own ``write``.
    """
    if type(transport) is tcp.Server and all(
        hasattr(transport, name) for name in ("dataBuffer", "_tempDataLen", "writeSomeData")
    ):
        return lambda data: _send_now(transport, data)
    write: Callable[[bytes], None] = transport.write
    return write


def _send_now(transport: Any, data: bytes) -> None:
    if transport._tempDataLen or transport.dataBuffer or transport.disconnecting:
        transport.write(data)
        return
    if not transport.connected:
        return  # as write() does
    sent = transport.writeSomeData(data)
    if type(sent) is int:
        if sent == len(data):
            return
        data = data[sent:]
    # Not all taken, or the connection is lost (an exception returned): the
    # buffered write finishes the job or finds the loss on its next attempt.
    transport.write(data)
