"""The Autobahn edge over real loopback sockets, with the real ORM (spec §5a, §6)."""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from autobahn.twisted.websocket import listenWS
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bridge.devices.models import Device, Grant
from bridge.hub import DeviceConfig, Hub
from bridge.identity import make_token
from bridge.session import Limits
from bridge.threads import PoolService
from bridge.websocket import (
    HANDSHAKE_ATTRS,
    BridgeServerProtocol,
    BridgeWebSocketFactory,
    EdgeConfig,
    origin_allowed,
    parse_path,
)
from tests.support import make_user, reset_database
from tests.test_hub import FakeUpstream
from tests.wsclient import connect


class PathAndOriginTests(unittest.SynchronousTestCase):
    def test_paths(self) -> None:
        self.assertEqual(parse_path("/ws/"), (True, None))
        self.assertEqual(parse_path("/ws"), (True, None))
        self.assertEqual(parse_path("/ws/devices/abc-_1/"), (True, "abc-_1"))
        for bad in ("/ws/devices/", "/ws/devices/a/b/", "/ws/devices/a%20b/", "/wsx/", "/"):
            self.assertFalse(parse_path(bad)[0], bad)

    def test_origins(self) -> None:
        allowed = frozenset({"https://screens.example"})
        ok = [
            (None, "h:8443", True),
            ("https://h:8443", "h:8443", True),
            ("https://h", "h", True),
            ("https://h:443", "h", True),
            ("https://screens.example", "h:8443", True),
        ]
        refused = [
            ("https://evil:8443", "h:8443", True),
            ("http://h:8443", "h:8443", True),
            ("https://h:8444", "h:8443", True),
            ("null", "h:8443", True),
            ("https://h:8443", None, True),
        ]
        for origin, host, secure in ok:
            self.assertTrue(origin_allowed(origin, host, secure, allowed), origin)
        for origin, host, secure in refused:
            self.assertFalse(origin_allowed(origin, host, secure, allowed), origin)


class EdgeTestCase(unittest.TestCase):
    """A hub and the WebSocket factory on a loopback port; ORM on a real pool."""

    limits = Limits()

    def setUp(self) -> Any:
        reset_database()
        self.user = make_user("ann")
        self.devices = [Device.objects.create(name=f"D{i}", kind="sensor") for i in range(2)]
        for device in self.devices:
            Grant.objects.create(device=device, user=self.user, permission="read")
        self.pool = PoolService(reactor, "test-edge", 1, 2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.hub = Hub(reactor, FakeUpstream())
        for device in self.devices:
            self.hub.set_device(DeviceConfig(device.id, device.name, "sensor", history_size=1))
        self.factory = BridgeWebSocketFactory(
            self.hub, self.pool, None, EdgeConfig(limits=self.limits), reactor
        )
        self.port = listenWS(self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def client(self) -> Any:
        c = yield connect(f"ws://127.0.0.1:{self.port.getHost().port}/ws/")
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send({"op": 3, "d": {"token": make_token(self.user)}})
        yield c.event("READY")
        c.send({"op": 7, "d": {"devices": [d.id for d in self.devices], "history": False}})
        yield c.event("SUBSCRIBED")
        yield c.event("SUBSCRIBED")
        return c


class SlowViewerTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_a_viewer_that_stops_reading_gets_the_newest_status_per_device(self) -> Any:
        slow = yield self.client()
        fast = yield self.client()
        [server_slow] = [
            p
            for p in self.factory.connections
            if p.session.seq == slow.last_s
            and p.transport.getPeer().port == slow.proto.transport.getHost().port
        ]
        # Small socket buffers so a few hundred KB are enough to back up.
        for sock in (slow.proto.transport.socket, server_slow.transport.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        slow.proto.transport.pauseProducing()  # the slow viewer stops reading
        pad = "x" * 20_000
        ids = [d.id for d in self.devices]
        for i in range(200):
            for device in ids:
                self.hub.publish_status(device, {"i": i, "pad": pad})
            if i % 20 == 0:
                yield task.deferLater(reactor, 0.01, lambda: None)
        # The fast viewer reached the newest statuses while the slow one was held.
        got = yield fast.until(
            lambda f: (
                f["op"] == 5 and f["d"]["payload"]["i"] == 199 and f["d"]["device"] == ids[-1]
            ),
            timeout=15,
        )
        fast_seqs = [f["s"] for f in got]
        self.assertEqual(fast_seqs, list(range(fast_seqs[0], fast_seqs[0] + len(fast_seqs))))
        self.assertIsNotNone(server_slow.session.congested_since)
        self.assertLessEqual(len(server_slow.session._pending), len(ids))
        self.assertGreater(self.factory.counters["slow_drops"], 0)

        slow.proto.transport.resumeProducing()
        frames = yield slow.until(
            lambda f: f["op"] == 5 and f["d"]["payload"]["i"] == 199, timeout=15
        )
        frames += yield slow.until(
            lambda f: f["op"] == 5 and f["d"]["payload"]["i"] == 199, timeout=15
        )
        seqs = [f["s"] for f in frames]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))
        newest = {}
        for f in frames:
            if f["op"] == 5:
                newest[f["d"]["device"]] = f["d"]["payload"]["i"]
        self.assertEqual(newest, {device: 199 for device in ids})
        self.assertLess(len(frames), 400)


class FloodTests(EdgeTestCase):
    limits = Limits(frames_per_second=20, frames_burst=40)

    @defer.inlineCallbacks
    def test_flooding_client_is_closed_4008_and_others_are_served(self) -> Any:
        calm = yield self.client()
        flood = yield self.client()
        for _ in range(100):
            flood.send({"op": 1, "d": None})
        frames = yield flood.until(lambda f: f.get("t") == "ERROR", timeout=5)
        self.assertEqual(frames[-1]["d"]["code"], 4008)
        code, _ = yield flood.closed()
        self.assertEqual(code, 4008)
        calm.send({"op": 1, "d": None})
        ack = yield calm.until(lambda f: f["op"] == 2)
        self.assertEqual(ack[-1], {"op": 2})
        self.assertEqual(self.factory.counters["rate_limited"], 1)


class LimitTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_connection_limit_refuses_the_handshake_with_503(self) -> Any:
        self.factory.config = EdgeConfig(max_connections=1)
        yield self.client()
        d = connect(f"ws://127.0.0.1:{self.port.getHost().port}/ws/")
        failure = yield self.assertFailure(d, ConnectionError)
        self.assertIn("503", str(failure))

    @defer.inlineCallbacks
    def test_sessions_per_user(self) -> Any:
        self.factory.config = EdgeConfig(max_per_user=1)
        yield self.client()
        c = yield connect(f"ws://127.0.0.1:{self.port.getHost().port}/ws/")
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send({"op": 3, "d": {"token": make_token(self.user)}})
        error = yield c.event("ERROR")
        self.assertEqual(error["d"]["code"], 4008)
        code, _ = yield c.closed()
        self.assertEqual(code, 4008)


class FaultTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_saturated_orm_pool_delays_no_heartbeat(self) -> Any:
        import threading
        import time

        c = yield self.client()
        release = threading.Event()
        self.addCleanup(release.set)
        for _ in range(8):  # twice the pool: everything else queues behind these
            self.pool.run(release.wait, 10)
        self.assertGreater(self.pool.queued, 0)
        started = time.monotonic()
        c.send({"op": 1, "d": c.last_s})
        yield c.until(lambda f: f["op"] == 2, timeout=2)
        self.assertLess(time.monotonic() - started, 0.5)
        # An IDENTIFY now waits for the pool, and completes once it frees up.
        late = yield connect(f"ws://127.0.0.1:{self.port.getHost().port}/ws/")
        self.addCleanup(lambda: late.proto.dropConnection(abort=True))
        yield late.next()
        late.send({"op": 3, "d": {"token": make_token(self.user)}})
        release.set()
        ready = yield late.event("READY", timeout=10)
        self.assertEqual(ready["d"]["user"]["username"], "ann")

    @defer.inlineCallbacks
    def test_database_down_fails_authentication_closed(self) -> Any:
        from django.db import OperationalError

        import bridge.identity

        def down(token: str) -> Any:
            raise OperationalError("could not connect to server")

        self.patch(bridge.identity, "identity_from_token", down)
        c = yield connect(f"ws://127.0.0.1:{self.port.getHost().port}/ws/")
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send({"op": 3, "d": {"token": "anything"}})
        error = yield c.event("ERROR")
        self.assertEqual(error["d"]["code"], 4000)
        self.assertIn("unavailable", error["d"]["message"])
        code, _ = yield c.closed()
        self.assertEqual(code, 4000)
        # Said once by the pool, not as a traceback per IDENTIFY.
        self.assertEqual(self.flushLoggedErrors(OperationalError), [])
        self.assertEqual(self.pool.database_health()["state"], "down")
        self.assertEqual(self.hub.sessions, {})


class ResumeAndShutdownTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_resume_with_a_seq_never_sent_is_4007(self) -> Any:
        first = yield self.client()
        session_id = next(iter(self.hub.sessions))
        first.proto.dropConnection(abort=True)
        yield first.closed()
        c = yield connect(f"ws://127.0.0.1:{self.port.getHost().port}/ws/")
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send(
            {
                "op": 9,
                "d": {
                    "session_id": session_id,
                    "seq": first.last_s + 50,
                    "token": make_token(self.user),
                },
            }
        )
        error = yield c.event("ERROR")
        self.assertEqual(error["d"]["code"], 4007)
        code, _ = yield c.closed()
        self.assertEqual(code, 4007)

    @defer.inlineCallbacks
    def test_shutdown_closes_every_connection_with_1001(self) -> Any:
        a = yield self.client()
        b = yield self.client()
        gone = self.factory.going_away()
        for c in (a, b):
            code, _ = yield c.closed()
            self.assertEqual(code, 1001)
        # It fires once the connections are closed, so shutdown can wait for it.
        yield gone
        self.assertEqual(self.factory.connections, set())


class MemoryTests(EdgeTestCase):
    """What each connection no longer carries; Autobahn's private names, with fallbacks."""

    @defer.inlineCallbacks
    def test_options_live_on_the_factorys_protocol_class(self) -> Any:
        c = yield self.client()
        (conn,) = self.factory.connections
        names = BridgeServerProtocol.CONFIG_ATTRS
        self.assertIn("maxMessagePayloadSize", names)
        self.assertEqual([n for n in names if n in conn.__dict__], [])
        for name in names:
            self.assertEqual(getattr(conn, name), getattr(self.factory, name), name)
        self.assertIsInstance(conn, BridgeServerProtocol)
        # Options set later reach the connections made afterwards, and only
        # those, as when each connection copied them.
        self.factory.setProtocolOptions(closeHandshakeTimeout=7)
        yield self.client()
        (new,) = self.factory.connections - {conn}
        self.assertEqual((new.closeHandshakeTimeout, conn.closeHandshakeTimeout), (7, 2))
        # A function among the options is not bound to the connection.
        self.assertIs(conn.perMessageCompressionAccept, self.factory.perMessageCompressionAccept)
        c.send({"op": 1, "d": None})
        ack = yield c.next()
        self.assertEqual(ack["op"], 2)

    @defer.inlineCallbacks
    def test_handshake_leftovers_and_the_send_queue_are_dropped(self) -> Any:
        c = yield self.client()
        (conn,) = self.factory.connections
        self.assertEqual([n for n in HANDSHAKE_ATTRS if n in conn.__dict__], [])
        self.assertIsNone(conn.http_headers)
        self.assertIsNone(conn.transport_details)
        self.assertNotIn("send_queue", conn.__dict__)
        self.assertEqual(len(conn.send_queue), 0)
        # Autobahn's own frames still go out; a synchronous send gets a real queue.
        conn.sendPing(b"p")
        self.assertNotIn("send_queue", conn.__dict__)
        conn.sendData(b"\x8a\x00", sync=True)  # an unsolicited pong, which peers ignore
        self.assertIsInstance(conn.__dict__.get("send_queue"), deque)
        c.send({"op": 1, "d": None})
        ack = yield c.next()
        self.assertEqual(ack["op"], 2)
        conn.sendClose(4000, "bye")
        code, reason = yield c.closed()
        self.assertEqual((code, reason), (4000, "bye"))

    @defer.inlineCallbacks
    def test_no_unused_validator_or_stale_unmasker(self) -> Any:
        c = yield self.client()
        (conn,) = self.factory.connections
        self.assertFalse(conn.utf8validateIncoming)
        self.assertNotIn("utf8validator", conn.__dict__)
        for _ in range(3):  # masked frames, one after another, each unmasked right
            self.assertNotIn("current_frame_masker", conn.__dict__)
            c.send({"op": 1, "d": None})
            ack = yield c.next()
            self.assertEqual(ack["op"], 2)
        c.send({"op": 7, "d": {"devices": [self.devices[0].id], "history": False}})
        self.assertEqual((yield c.event("SUBSCRIBED"))["d"]["device"], self.devices[0].id)

    @defer.inlineCallbacks
    def test_with_utf8_validation_on_the_validator_stays(self) -> Any:
        self.factory.setProtocolOptions(utf8validateIncoming=True)
        c = yield self.client()
        (conn,) = self.factory.connections
        self.assertIsNotNone(conn.__dict__.get("utf8validator"))
        c.send('{"op":1,"d":null,"note":"é"}'.encode())
        ack = yield c.next()
        self.assertEqual(ack["op"], 2)

    def test_without_autobahns_config_attrs_the_class_is_kept(self) -> None:
        factory = BridgeWebSocketFactory(self.hub, self.pool, None, EdgeConfig(), reactor)
        self.assertIsNot(factory.protocol, BridgeServerProtocol)
        self.patch(BridgeServerProtocol, "CONFIG_ATTRS", ())
        plain = BridgeWebSocketFactory(self.hub, self.pool, None, EdgeConfig(), reactor)
        self.assertIs(plain.protocol, BridgeServerProtocol)


class UpgradeGarbageTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_an_upgraded_request_and_its_channel_go_without_a_collection(self) -> Any:
        import gc
        import weakref

        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from bridge.websocket import BridgeWebSocketResource

        seen: list[tuple[Any, Any]] = []

        class Watched(BridgeWebSocketResource):
            def render(self, request: Any) -> Any:
                seen.append((weakref.ref(request), weakref.ref(request.channel)))
                return super().render(request)

        root = Resource()
        root.putChild(b"ws", Watched(self.factory))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gc.disable()
        self.addCleanup(gc.enable)
        c = yield connect(f"ws://127.0.0.1:{port.getHost().port}/ws/")
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send({"op": 3, "d": {"token": make_token(self.user)}})
        yield c.event("READY")
        c.send({"op": 1, "d": None})
        self.assertEqual((yield c.next())["op"], 2)
        [(request, channel)] = seen
        self.assertIsNone(request())
        self.assertIsNone(channel())
