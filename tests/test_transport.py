"""Hand-built WebSocket frames, parsed by a real Autobahn client over loopback."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
    connectWS,
    listenWS,
)
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from bridge.transport import TLS_SLICE, set_nodelay, text_frame, writer
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


# ------------------------------------------------------------ writer()


@implementer(IPushProducer)
class _Sender(protocol.Protocol):
    """Server side: writes through writer(), tells when paused and when gone."""

    def connectionMade(self) -> None:
        self.put = writer(self.transport)
        self.pauses = 0
        self.resumes = 0
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.transport.registerProducer(self, True)
        self.factory.connected.callback(self)  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.resumes += 1

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class _Reader(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.wanted = 0
        self.enough: defer.Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.enough is not None and len(self.data) >= self.wanted:
            enough, self.enough = self.enough, None
            enough.callback(None)

    def until(self, size: int) -> defer.Deferred[None]:
        self.wanted = size
        self.enough = defer.Deferred()
        if len(self.data) >= size:
            self.dataReceived(b"")
        return self.enough

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def _abort(reader: _Reader) -> None:
    if not reader.closed.called:
        reader.transport.abortConnection()


def _tcp(transport: Any) -> Any:
    return getattr(transport, "transport", None) or transport


class WriterTests(unittest.TestCase):
    """Frames sent at once on plain TCP keep Twisted's order, back-pressure and closing."""

    @defer.inlineCallbacks
    def connect(self) -> Any:
        factory = protocol.Factory.forProtocol(_Sender)
        factory.connected = defer.Deferred()  # type: ignore[attr-defined]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        reader = _Reader()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(lambda: reader)
        )
        self.addCleanup(_abort, reader)
        sender = yield factory.connected
        return sender, reader

    @defer.inlineCallbacks
    def test_sends_at_once_and_keeps_order_with_buffered_writes(self) -> Any:
        sender, reader = yield self.connect()
        chunks = [b"%06d;" % i for i in range(3000)]
        for i, chunk in enumerate(chunks):
            if i % 7 == 0:
                sender.transport.write(chunk)  # Autobahn's own writes (pings, close) go here
            else:
                sender.put(chunk)
        # The first write went through Twisted's buffer; later ones queue behind
        # it until the reactor has sent it, then go straight to the socket.
        yield reader.until(len(b"".join(chunks)))
        self.assertEqual(bytes(reader.data), b"".join(chunks))
        sender.put(b"now")
        tcp = _tcp(sender.transport)
        self.assertEqual((tcp._tempDataLen, tcp.dataBuffer), (0, b""), "sent without the reactor")

    @defer.inlineCallbacks
    def test_a_peer_that_stops_reading_pauses_the_producer_and_loses_nothing(self) -> Any:
        sender, reader = yield self.connect()
        reader.transport.pauseProducing()
        frame = b"y" * 1000
        total = 0
        for i in range(20_000):  # 20 MB: far beyond the kernel's buffers
            sender.put(b"%08d" % i + frame)
            total += 1008
            if sender.pauses:
                break
        self.assertTrue(sender.pauses, "the kernel never filled")
        tcp = _tcp(sender.transport)
        self.assertGreater(tcp._tempDataLen + len(tcp.dataBuffer), 0)
        more = b"z" * 100
        sender.put(more)  # queued behind what is buffered, not sent ahead of it
        reader.transport.resumeProducing()
        yield reader.until(total + len(more))
        data = bytes(reader.data)
        self.assertEqual(len(data), total + len(more))
        self.assertTrue(data.endswith(more))
        numbers = [int(data[k : k + 8]) for k in range(0, total, 1008)]
        self.assertEqual(numbers, list(range(len(numbers))))
        self.assertGreaterEqual(sender.resumes, 1)

    @defer.inlineCallbacks
    def test_writes_after_lose_connection_are_flushed_first_as_twisted_does(self) -> Any:
        sender, reader = yield self.connect()
        sender.put(b"before")
        sender.transport.loseConnection()
        sender.put(b"-after")
        sender.transport.unregisterProducer()  # TLS closes only once the producer is gone
        yield reader.closed
        self.assertEqual(bytes(reader.data), b"before-after")

    @defer.inlineCallbacks
    def test_a_vanished_peer_is_noticed_not_raised(self) -> Any:
        sender, reader = yield self.connect()
        reader.transport.abortConnection()
        yield reader.closed
        for _ in range(100):
            sender.put(b"x" * 10_000)  # EPIPE or ECONNRESET: left to Twisted to report
            yield deferLater(reactor, 0.001, lambda: None)
            if sender.lost.called:
                break
        yield sender.lost

    def test_other_transports_get_their_own_write(self) -> None:
        transport = StringTransport()
        put = writer(transport)
        put(b"abc")
        self.assertEqual(transport.value(), b"abc")
        self.assertEqual(put, transport.write)


class TLSWriterTests(WriterTests):
    """The same over TLS: records encrypted at once and sent at once when idle."""

    @defer.inlineCallbacks
    def connect(self) -> Any:
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint

        from tests.nodered_support import write_tls_material

        pki = write_tls_material(self.mktemp())
        with open(pki["server_crt"], "rb") as f, open(pki["server_key"], "rb") as k:
            server = ssl.PrivateCertificate.loadPEM(f.read() + k.read()).options()
        with open(pki["ca_crt"], "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        factory = protocol.Factory.forProtocol(_Sender)
        factory.connected = defer.Deferred()  # type: ignore[attr-defined]
        port = yield SSL4ServerEndpoint(reactor, 0, server, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        reader = _Reader()
        yield SSL4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, ssl.optionsForClientTLS("localhost", ca)
        ).connect(protocol.Factory.forProtocol(lambda: reader))
        self.addCleanup(_abort, reader)
        sender = yield factory.connected
        # writer() is taken when the handshake is done, as the WebSocket edge does.
        yield reader.until(0)
        reader.transport.write(b"hello")
        yield deferLater(reactor, 0.05, lambda: None)
        sender.put = writer(sender.transport)
        return sender, reader

    def test_other_transports_get_their_own_write(self) -> None:
        pass  # nothing TLS-specific

    @defer.inlineCallbacks
    def test_a_frame_is_encrypted_and_sent_at_once_unless_writes_wait(self) -> Any:
        sender, reader = yield self.connect()
        sender.put(b"one")
        tcp = sender.transport.transport
        self.assertEqual(sender.transport._aggregator._buffer, [])
        self.assertEqual((tcp._tempDataLen, tcp.dataBuffer), (0, b""))
        sender.transport.write(b"-two")  # Autobahn's way: gathered for the end of the turn
        sender.put(b"-three")  # so this waits behind it
        yield reader.until(len(b"one-two-three"))
        self.assertEqual(bytes(reader.data), b"one-two-three")

    @defer.inlineCallbacks
    def test_a_large_write_is_encrypted_in_slices_and_arrives_whole(self) -> Any:
        from twisted.protocols import tls as twisted_tls

        sender, reader = yield self.connect()
        encrypted: list[int] = []
        original = twisted_tls.TLSMemoryBIOProtocol.write

        def counting(proto: Any, data: bytes) -> None:
            encrypted.append(len(data))
            original(proto, data)

        self.patch(twisted_tls.TLSMemoryBIOProtocol, "write", counting)
        sender.put = writer(sender.transport)  # it takes the TLS layer's write when made
        big = bytes(range(256)) * 52 + b"!"  # 13 313 bytes, about a 100-device READY
        sender.put(big)
        sender.put(b"small")
        yield reader.until(len(big) + 5)
        self.assertEqual(bytes(reader.data), big + b"small")
        self.assertEqual(sum(encrypted), len(big) + 5)
        self.assertLessEqual(max(encrypted), TLS_SLICE)
        self.assertEqual(len(encrypted), -(-len(big) // TLS_SLICE) + 1)


class CoalescerTests(unittest.SynchronousTestCase):
    """A turn's frames to one connection leave in one write, in order, at the turn's end."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from bridge.transport import Coalescer

        self.clock = Clock()
        self.coalescer = Coalescer(self.clock)
        self.a, self.b = StringTransport(), StringTransport()
        self.out_a, self.out_b = self.coalescer.output(self.a), self.coalescer.output(self.b)

    def test_one_write_per_connection_per_turn(self) -> None:
        writes: list[bytes] = []
        self.a.write = writes.append  # type: ignore[method-assign]
        out = self.coalescer.output(self.a)
        for frame in (b"1", b"2", b"3"):
            out.write(frame)
        self.out_b.write(b"x")
        self.assertEqual((writes, self.b.value()), ([], b""), "nothing before the turn ends")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one call for every connection")
        self.clock.advance(0)
        self.assertEqual((writes, self.b.value()), ([b"123"], b"x"))
        out.write(b"4")
        self.clock.advance(0)
        self.assertEqual(writes, [b"123", b"4"])

    def test_flush_first_keeps_other_writes_behind(self) -> None:
        self.out_a.write(b"error-frame;")
        self.out_a.flush()  # the edge does this before Autobahn writes a close frame
        self.a.write(b"close-frame")
        self.clock.advance(0)
        self.assertEqual(self.a.value(), b"error-frame;close-frame")

    def test_discarded_frames_go_nowhere(self) -> None:
        self.out_a.write(b"late")
        self.out_a.discard()
        self.clock.advance(0)
        self.assertEqual(self.a.value(), b"")
