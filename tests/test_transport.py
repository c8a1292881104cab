"""Hand-built WebSocket frames, parsed by a real Autobahn client over loopback."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
    connectWS,
    listenWS,
)
from twisted.internet import defer
from twisted.trial import unittest

from bridge.transport import set_nodelay, text_frame
from tests.wsclient import TestClientFactory

SIZES = (0, 1, 125, 126, 127, 65535, 65536, 200_000)


class RawWriter(WebSocketServerProtocol):
    """Writes frames with text_frame() straight to the transport, as the bridge does."""

    def onOpen(self) -> None:
        assert self.transport is not None
        for size in SIZES:
            self.transport.write(text_frame(b'"' + b"x" * size + b'"'))
        self.transport.write(text_frame('"é"'.encode()))


class TextFrameTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_every_length_class_parses(self) -> Any:
        server = WebSocketServerFactory()
        server.protocol = RawWriter
        port = listenWS(server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = TestClientFactory(f"ws://127.0.0.1:{port.getHost().port}/")
        connectWS(client)
        proto = yield client.opened
        self.addCleanup(proto.dropConnection, abort=True)
        received = []
        for _ in range(len(SIZES) + 1):
            received.append((yield client.frames.get()))
        self.assertEqual([len(m) for m in received[:-1]], list(SIZES))
        self.assertEqual(received[-1], "é")

    def test_nodelay_reaches_the_tcp_transport_under_wrappers(self) -> None:
        calls = []

        class TCP:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        class Wrapper:
            transport = TCP()

        set_nodelay(Wrapper())
        set_nodelay(None)
        self.assertEqual(calls, [True])
