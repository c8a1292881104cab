"""Socket options Autobahn on Twisted does not apply by itself."""

from __future__ import annotations

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
