"""Socket options and a write path Autobahn on Twisted does not provide by itself."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.protocols import tls


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


#: Under TLS a write is encrypted at most this many bytes at a time, and each
#: piece's records leave OpenSSL's memory BIO before the next is encrypted.
#: That BIO's buffer grows to the most ciphertext it ever held and never
#: shrinks while the connection lives: one 13 KB READY encrypted whole kept
#: about 14 KB per idle TLS connection (measured: 48.6 against 34.1 KB per
#: connection in one process). Frames of the fan-out are far smaller.
TLS_SLICE = 2048


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

    Under TLS, Twisted's transport gathers a turn's writes and encrypts them
    on a timer of its own per connection; with one frame per connection per
    turn that timer only adds work. A frame is encrypted at once unless
    something already waits there (Autobahn's own writes still go through
    it), and the TCP connection beneath sends the records at once when idle;
    a large write is encrypted in pieces of :data:`TLS_SLICE` bytes.
    Other transports (test doubles, anything unknown) get their own ``write``.
    """
    if _plain_tcp(transport):
        write = transport.write
        return lambda data: _send_now(transport, data, write)
    if isinstance(transport, tls.BufferingTLSTransport) and _plain_tcp(transport.transport):
        _send_eagerly(transport.transport)
        encrypt = tls.TLSMemoryBIOProtocol.write

        def write_tls(data: bytes) -> None:
            waiting = getattr(transport._aggregator, "_buffer", None)
            if waiting is None:  # the connection is gone: its write drops it too
                transport.write(data)
            elif waiting:
                transport.write(data)  # behind what waits, in order
            elif len(data) <= TLS_SLICE:
                encrypt(transport, data)
            else:
                for start in range(0, len(data), TLS_SLICE):
                    encrypt(transport, data[start : start + TLS_SLICE])

        return write_tls
    plain: Callable[[bytes], None] = transport.write
    return plain


def _plain_tcp(transport: Any) -> bool:
    return type(transport) is tcp.Server and all(
        hasattr(transport, name) for name in ("dataBuffer", "_tempDataLen", "socket", "SEND_LIMIT")
    )


def _send_eagerly(transport: Any) -> None:
    """Make every write to this TCP connection (from the TLS layer above) send when idle."""
    write = transport.write
    if getattr(write, "eager", False):
        return

    def send(data: bytes) -> None:
        _send_now(transport, data, write)

    send.eager = True  # type: ignore[attr-defined]
    transport.write = send


def _send_now(transport: Any, data: bytes, write: Callable[[bytes], None]) -> None:
    if (
        transport._tempDataLen
        or transport.dataBuffer
        or transport.disconnecting
        or len(data) > transport.SEND_LIMIT
    ):
        write(data)
        return
    if not transport.connected:
        return  # as write() does
    try:
        sent = transport.socket.send(data)
    except OSError:
        # Full (EAGAIN, ENOBUFS) or the connection is gone: the buffered write
        # sends it later, or meets the same error and reports the loss.
        sent = 0
    if sent != len(data):
        write(data[sent:])


class Coalescer:
    """Frames written to a connection in one reactor turn leave it in one write.

    A status's frames are written from inside the fan-out loop, one per
    viewer; a viewer that gets several in one turn (a burst, or a reactor
    that fell behind) would otherwise pay a send (and under TLS a record and
    an encryption) for each. Each connection's frames wait in a list until
    a single call at the end of the turn (one for all connections) hands
    them to :func:`writer` joined. Whatever else writes to the connection
    must :meth:`Output.flush` first to keep the order.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._dirty: list[Output] = []
        self._call: Any = None

    def output(self, transport: Any) -> Output:
        return Output(self, writer(transport))

    def flush(self) -> None:
        self._call = None
        dirty, self._dirty = self._dirty, []
        for out in dirty:
            out.flush()


class Output:
    """One connection's frames of the current turn (see :class:`Coalescer`)."""

    __slots__ = ("_owner", "_put", "_frames")

    def __init__(self, owner: Coalescer, put: Callable[[bytes], None]) -> None:
        self._owner = owner
        self._put = put
        self._frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        frames = self._frames
        if not frames:
            owner = self._owner
            owner._dirty.append(self)
            if owner._call is None:
                owner._call = owner.clock.callLater(0, owner.flush)
        frames.append(data)

    def flush(self) -> None:
        frames = self._frames
        if frames:
            self._frames = []
            self._put(frames[0] if len(frames) == 1 else b"".join(frames))

    def discard(self) -> None:
        """The connection is gone: what waited goes nowhere."""
        self._frames = []
