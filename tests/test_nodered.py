"""Unit tests for the Node-RED link (spec §7) against a local autobahn server
standing in for Node-RED; no real Node-RED needed."""

from __future__ import annotations

import json
import os
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import ssl
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from bridge.nodered import (
    MAX_MESSAGE_BYTES,
    MAX_RETRY_DELAY,
    MalformedMessage,
    NodeRedLink,
    StatusMessage,
    decode_status,
    load_secret,
)
from bridge.upstream import IUpstream, IUpstreamListener, UpstreamCommand

from .nodered_support import (
    FakeListener,
    LogCapture,
    clock,
    sleep,
    wait_until,
    write_tls_material,
)

SECRET = "t0p-s3cret-link-key"


def fast_retry(attempt: int) -> float:
    return 0.05


# ------------------------------------------------------------- decoder


class DecodeStatusTests(unittest.TestCase):
    def test_full_status(self) -> None:
        status = decode_status(
            b'{"group_id": "press-1", "payload": {"on": true}, "command_id": "c"}'
        )
        self.assertEqual(status, StatusMessage("press-1", {"on": True}, "c"))

    def test_command_id_optional_and_null(self) -> None:
        self.assertIsNone(decode_status('{"group_id": "a", "payload": 1}').command_id)
        self.assertIsNone(
            decode_status('{"group_id": "a", "payload": 1, "command_id": null}').command_id
        )

    def test_other_keys_ignored(self) -> None:
        status = decode_status(
            json.dumps(
                {
                    "group_id": "a",
                    "payload": [1, "x", None],
                    "_msgid": "0f1e",
                    "_session": {"type": "websocket", "id": "1"},
                    "topic": "t",
                }
            )
        )
        self.assertEqual(status, StatusMessage("a", [1, "x", None], None))

    def test_any_json_payload(self) -> None:
        payloads: list[Any] = [None, 0, 1.5, "s", [], {}, {"nested": {"deep": [True]}}]
        for payload in payloads:
            msg = json.dumps({"group_id": "a", "payload": payload})
            self.assertEqual(decode_status(msg).payload, payload)

    def test_malformed(self) -> None:
        cases: dict[str, bytes | str] = {
            "not JSON": b"hello",
            "not UTF-8": b'{"group_id": "\xff", "payload": 1}',
            "list": b'[{"group_id": "a", "payload": 1}]',
            "string": b'"group_id"',
            "number": b"42",
            "null": b"null",
            "no group_id": b'{"payload": 1}',
            "numeric group_id": b'{"group_id": 7, "payload": 1}',
            "null group_id": b'{"group_id": null, "payload": 1}',
            "empty group_id": b'{"group_id": "", "payload": 1}',
            "no payload": b'{"group_id": "a"}',
            "numeric command_id": b'{"group_id": "a", "payload": 1, "command_id": 5}',
            "object command_id": b'{"group_id": "a", "payload": 1, "command_id": {}}',
            "NaN": b'{"group_id": "a", "payload": NaN}',
            "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        }
        for name, data in cases.items():
            with self.assertRaises(MalformedMessage, msg=name):
                decode_status(data)

    def test_reason_does_not_quote_message(self) -> None:
        with self.assertRaises(MalformedMessage) as ctx:
            decode_status(b'{"group_id": 12345678, "payload": "do-not-echo"}')
        self.assertNotIn("do-not-echo", str(ctx.exception))


class LoadSecretTests(unittest.TestCase):
    def setUp(self) -> None:
        old = os.environ.pop("BRIDGE_NODERED_SECRET", None)
        if old is not None:
            self.addCleanup(os.environ.__setitem__, "BRIDGE_NODERED_SECRET", old)
        else:
            self.addCleanup(os.environ.pop, "BRIDGE_NODERED_SECRET", None)

    def test_file_stripped(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("  abc123\n")
        os.environ["BRIDGE_NODERED_SECRET"] = "from-env"
        self.assertEqual(load_secret(path), "abc123")

    def test_env_then_none(self) -> None:
        self.assertIsNone(load_secret(None))
        os.environ["BRIDGE_NODERED_SECRET"] = " from-env \n"
        self.assertEqual(load_secret(None), "from-env")
        self.assertEqual(load_secret(None, env_var="SOMETHING_UNSET_HERE"), None)

    def test_empty_file_is_no_secret(self) -> None:
        path = self.mktemp()
        open(path, "w").close()
        self.assertIsNone(load_secret(path))


class ConfigTests(unittest.TestCase):
    def test_interface_and_description(self) -> None:
        link = NodeRedLink("ws://127.0.0.1:1880/ws/bridge?token=x", secret=SECRET)
        verifyObject(IUpstream, link)
        self.assertEqual(link.description, "Node-RED at ws://127.0.0.1:1880/ws/bridge")
        health = link.health()
        self.assertEqual(health["state"], "down")
        self.assertEqual(health["url"], "ws://127.0.0.1:1880/ws/bridge")
        self.assertIsNone(health["last_error"])
        self.assertFalse(link.available)
        for text in (repr(link), link.description, json.dumps(health)):
            self.assertNotIn(SECRET, text)
            self.assertNotIn("token", text)

    def test_default_ports(self) -> None:
        self.assertEqual(NodeRedLink("ws://nr/ws").url, "ws://nr:80/ws")
        self.assertEqual(NodeRedLink("wss://nr/ws").url, "wss://nr:443/ws")

    def test_refuses_bad_config(self) -> None:
        with self.assertRaises(ValueError):
            NodeRedLink("http://127.0.0.1:1880/ws/bridge")
        with self.assertRaises(ValueError) as ctx:
            NodeRedLink("ws://user:hunter2@127.0.0.1:1880/ws/bridge")
        self.assertNotIn("hunter2", str(ctx.exception))
        with self.assertRaises(ValueError):
            NodeRedLink("ws://127.0.0.1:1880/ws/bridge", secret="two words")
        with self.assertRaises(ValueError):
            NodeRedLink("ws://127.0.0.1:1880/ws/bridge", ca_file="/nonexistent")
        with self.assertRaises(ValueError):
            NodeRedLink("ws://127.0.0.1:1880/ws/bridge", ping_timeout=0.5)

    def test_default_backoff_grows_and_stays_under_cap(self) -> None:
        link = NodeRedLink("ws://127.0.0.1:1880/ws/bridge")
        delays = [link._retry_delay(n) for n in range(1, 40)]
        self.assertLess(delays[0], 2.0)
        self.assertTrue(all(0 < d <= MAX_RETRY_DELAY for d in delays))
        self.assertGreaterEqual(max(delays[10:]), MAX_RETRY_DELAY - 1.0)
        # Refused handshakes count: ClientService alone would restart at attempt 1.
        link._unopened = 5
        self.assertGreaterEqual(link._retry_delay(1), 16.0)


# ------------------------------------------------------ fake Node-RED


class FakeNodeRedProtocol(WebSocketServerProtocol):
    factory: FakeNodeRed

    def onConnect(self, request: ConnectionRequest) -> None:
        self.factory.auth_headers.append(request.headers.get("authorization"))
        expected = f"Bearer {self.factory.secret}"
        if self.factory.secret is not None and request.headers.get("authorization") != expected:
            raise ConnectionDeny(401, "Unauthorized")

    def onOpen(self) -> None:
        self.factory.clients.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))

    def onPing(self, payload: bytes) -> None:
        if self.factory.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self in self.factory.clients:
            self.factory.clients.remove(self)


class FakeNodeRed(WebSocketServerFactory):
    protocol = FakeNodeRedProtocol  # type: ignore[assignment]

    def __init__(self, secret: str | None = SECRET) -> None:
        super().__init__("ws://127.0.0.1/ws/bridge")
        # No server-side timers: they would outlive the test (autobahn batches them).
        self.setProtocolOptions(
            maxMessagePayloadSize=4 * MAX_MESSAGE_BYTES,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
        )
        self.secret = secret
        self.auth_headers: list[str | None] = []
        self.clients: list[FakeNodeRedProtocol] = []
        self.received: list[tuple[bytes, bool]] = []
        self.answer_pings = True

    def send(self, message: Any, binary: bool = False) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        for client in self.clients:
            client.sendMessage(data, isBinary=binary)

    def drop_all(self) -> None:
        for client in list(self.clients):
            cast(Any, client.transport).abortConnection()


class LinkTestCase(unittest.TestCase):
    timeout = 20

    def listen(
        self,
        factory: FakeNodeRed,
        port: int = 0,
        tls: ssl.CertificateOptions | None = None,
    ) -> Any:
        if tls is not None:
            p = clock.listenSSL(port, factory, tls, interface="127.0.0.1")
        else:
            p = clock.listenTCP(port, factory, interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        return p

    def start_link(self, url: str, **kwargs: Any) -> tuple[NodeRedLink, FakeListener]:
        kwargs.setdefault("retry_policy", fast_retry)
        kwargs.setdefault("handshake_timeout", 2.0)
        link = NodeRedLink(url, **kwargs)
        listener = FakeListener()
        link.attach(cast(IUpstreamListener, listener))
        link.startService()
        self.addCleanup(link.stopService)
        return link, listener


class LinkTests(LinkTestCase):
    async def connected(
        self, secret: str | None = SECRET, **kwargs: Any
    ) -> tuple[FakeNodeRed, Any, NodeRedLink, FakeListener]:
        server = FakeNodeRed(secret)
        port = self.listen(server)
        url = f"ws://127.0.0.1:{port.getHost().port}/ws/bridge"
        link, listener = self.start_link(url, secret=secret, **kwargs)
        await wait_until(lambda: server.clients and listener.states, what="link up")
        return server, port, link, listener

    async def test_connect_reports_up_once_with_bearer_secret(self) -> None:
        server, _, link, listener = await self.connected()
        self.assertEqual(listener.states, [True])
        self.assertTrue(link.available)
        self.assertEqual(server.auth_headers, [f"Bearer {SECRET}"])
        health = link.health()
        self.assertEqual(health["state"], "up")
        self.assertIsNone(health["last_error"])

    async def test_no_secret_sends_no_authorization(self) -> None:
        server, _, _link, _listener = await self.connected(secret=None)
        self.assertEqual(server.auth_headers, [None])

    async def test_send_command_wire_shape(self) -> None:
        server, _, link, _ = await self.connected()
        cmd = UpstreamCommand("demo-toggle", {"on": True}, "alice", "cmd-1", 1700000000123)
        self.assertTrue(link.send_command(cmd))
        await wait_until(lambda: server.received, what="command at the server")
        [(data, binary)] = server.received
        self.assertFalse(binary)
        self.assertEqual(
            json.loads(data),
            {
                "group_id": "demo-toggle",
                "payload": {"on": True},
                "user": "alice",
                "command_id": "cmd-1",
                "ts": 1700000000123,
            },
        )
        self.assertEqual(link.counters["commands_out"], 1)

    async def test_statuses_reach_listener(self) -> None:
        server, _, link, listener = await self.connected()
        server.send({"group_id": "demo-dimmer", "payload": {"level": 40}, "command_id": "c1"})
        server.send(
            {"group_id": "demo-sensor", "payload": {"temperature": 21.5}, "_msgid": "x", "topic": 1}
        )
        await wait_until(lambda: len(listener.statuses) == 2, what="two statuses")
        self.assertEqual(
            listener.statuses,
            [
                ("demo-dimmer", {"level": 40}, "c1"),
                ("demo-sensor", {"temperature": 21.5}, None),
            ],
        )
        self.assertEqual(link.counters["statuses_in"], 2)

    async def test_malformed_dropped_counted_and_log_rate_limited(self) -> None:
        server, _, link, listener = await self.connected()
        logs = LogCapture(self)
        for _ in range(50):
            server.send(b"not json")
        server.send({"group_id": 3, "payload": 1})
        server.send({"group_id": "a", "payload": 1, "command_id": 9})
        server.send(b'{"group_id": "a", "payload": 1}', binary=True)
        server.send({"group_id": "ok", "payload": 1})
        await wait_until(lambda: listener.statuses, what="the good status")
        self.assertEqual(listener.statuses, [("ok", 1, None)])
        self.assertEqual(link.counters["malformed"], 53)
        self.assertEqual(link.counters["statuses_in"], 1)
        self.assertEqual(len(logs.matching("malformed")), 1)
        self.assertTrue(link.available, "malformed messages do not take the link down")

    async def test_oversized_message_closes_link_which_redials(self) -> None:
        server, _, _link, listener = await self.connected()
        blob = json.dumps({"group_id": "a", "payload": "x" * (MAX_MESSAGE_BYTES + 10)})
        server.send(blob.encode())
        await wait_until(lambda: listener.states == [True, False, True], what="drop and redial")
        self.assertEqual(listener.statuses, [])

    async def test_server_gone_then_back(self) -> None:
        server, port, link, listener = await self.connected()
        number = port.getHost().port
        await port.stopListening()
        server.drop_all()
        await wait_until(lambda: listener.states == [True, False], what="link down")
        self.assertFalse(link.available)
        cmd = UpstreamCommand("demo-toggle", {"on": False}, "bob", "cmd-2", 1)
        self.assertFalse(link.send_command(cmd))
        self.assertEqual(link.health()["state"], "down")
        await wait_until(lambda: link.counters["dial_failures"] >= 2, what="refused redials")
        self.assertEqual(listener.states, [True, False], "down is reported once")
        self.assertIn("cannot reach Node-RED", link.health()["last_error"])
        again = FakeNodeRed()
        self.listen(again, number)
        await wait_until(lambda: listener.states == [True, False, True], what="link back")
        self.assertTrue(link.send_command(cmd))
        await wait_until(lambda: again.received, what="command after reconnect")

    async def test_half_open_link_noticed_by_pings(self) -> None:
        server, _, _link, listener = await self.connected(ping_interval=1.0, ping_timeout=1.0)
        logs = LogCapture(self)
        server.answer_pings = False
        took = await wait_until(lambda: False in listener.states, timeout=5, what="ping timeout")
        # ping within 1 s, no pong within 1 s (autobahn rounds both down to whole seconds)
        self.assertLess(took, 2.5)
        self.assertTrue(logs.matching("Node-RED link lost", "ping"), logs.text())

    async def test_stop_service_reports_down_once(self) -> None:
        server, _, link, listener = await self.connected()
        await link.stopService()
        await wait_until(lambda: listener.states == [True, False], what="down on stop")
        await sleep(0.2)
        self.assertEqual(listener.states, [True, False])
        self.assertEqual(server.clients, [])

    async def test_refused_handshake_is_logged_and_retried(self) -> None:
        server = FakeNodeRed(secret=SECRET)
        port = self.listen(server)
        url = f"ws://127.0.0.1:{port.getHost().port}/ws/bridge"
        logs = LogCapture(self)
        wrong = "wrong-" + SECRET
        link, listener = self.start_link(url, secret=wrong)
        nolink, nolistener = self.start_link(url)
        await wait_until(
            lambda: (
                link.counters["handshake_failures"] >= 2
                and nolink.counters["handshake_failures"] >= 2
            ),
            what="refused handshakes",
        )
        self.assertEqual(listener.states, [])
        self.assertEqual(nolistener.states, [])
        self.assertFalse(link.available)
        refused = logs.matching("Node-RED refused the link handshake: HTTP 401")
        self.assertTrue(any("link secret is wrong" in line for line in refused), logs.text())
        self.assertTrue(any("sends no link secret" in line for line in refused), logs.text())
        self.assertIn("HTTP 401", link.health()["last_error"])
        self.assertNotIn(wrong, logs.text())
        self.assertNotIn(SECRET, logs.text())


# ---------------------------------------------------------------- TLS


class TLSLinkTests(LinkTestCase):
    def setUp(self) -> None:
        self.pki = write_tls_material(self.mktemp())
        with open(self.pki["server_crt"], "rb") as f, open(self.pki["server_key"], "rb") as k:
            server_cert = ssl.PrivateCertificate.loadPEM(f.read() + k.read())
        with open(self.pki["ca_crt"], "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        self.server = FakeNodeRed(secret=None)
        self.tls_plain = server_cert.options()
        self.tls_mutual = server_cert.options(ca)  # requires a client cert signed by ca

    def url(self, port: Any, host: str = "localhost") -> str:
        return f"wss://{host}:{port.getHost().port}/ws/bridge"

    async def test_wss_with_ca_file(self) -> None:
        port = self.listen(self.server, tls=self.tls_plain)
        link, listener = self.start_link(self.url(port), ca_file=self.pki["ca_crt"])
        await wait_until(lambda: listener.states == [True], what="wss link up")
        self.assertTrue(link.send_command(UpstreamCommand("a", 1, "u", "c", 1)))
        await wait_until(lambda: self.server.received, what="command over TLS")

    async def test_wss_mutual_tls(self) -> None:
        port = self.listen(self.server, tls=self.tls_mutual)
        _link, listener = self.start_link(
            self.url(port),
            ca_file=self.pki["ca_crt"],
            client_cert=self.pki["client_crt"],
            client_key=self.pki["client_key"],
        )
        await wait_until(lambda: listener.states == [True], what="mTLS link up")

    async def test_wss_untrusted_ca_refused(self) -> None:
        port = self.listen(self.server, tls=self.tls_plain)
        logs = LogCapture(self)
        link, listener = self.start_link(self.url(port), ca_file=self.pki["other_ca_crt"])
        await wait_until(lambda: link.counters["handshake_failures"] >= 2, what="TLS refusals")
        self.assertEqual(listener.states, [])
        self.assertEqual(self.server.clients, [])
        self.assertTrue(logs.matching("TLS certificate verification failed for localhost"))

    async def test_wss_wrong_host_name_refused(self) -> None:
        port = self.listen(self.server, tls=self.tls_plain)
        logs = LogCapture(self)
        # The certificate names only "localhost"; 127.0.0.1 is the same server
        # under a name the certificate does not cover.
        link, listener = self.start_link(self.url(port, "127.0.0.1"), ca_file=self.pki["ca_crt"])
        await wait_until(lambda: link.counters["handshake_failures"] >= 2, what="TLS refusals")
        self.assertEqual(listener.states, [])
        self.assertTrue(logs.matching("TLS host name verification failed for 127.0.0.1"))
        self.assertIn("host name verification failed", link.health()["last_error"])


# ------------------------------------------------ inbound frames, fast path

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _server_frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bool = False) -> bytes:
    """A frame as Node-RED (a WebSocket server) sends it; ``mask`` makes it a violation."""
    n = len(payload)
    head = bytes((0x80 * fin | opcode,))
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes((bit | n,))
    elif n < 65536:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" + payload if mask else payload)


def _client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each frame the link sent, pings' payloads left out."""
    frames = []
    while len(data) >= 2:
        n, i = data[1] & 0x7F, 2
        if n == 126:
            n, i = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, i = int.from_bytes(data[2:10], "big"), 10
        mask, i = data[i : i + 4], i + 4
        payload = bytes(b ^ mask[k % 4] for k, b in enumerate(data[i : i + n]))
        opcode = data[0] & 0x0F
        frames.append((opcode, b"" if opcode == 9 else payload))  # a ping carries the time
        data = data[i + n :]
    return frames


class _ClockTimer:
    def __init__(self, clock: Any) -> None:
        self.clock = clock

    def call_later(self, delay: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, fn, *args, **kwargs)


class _Transport(StringTransport):
    """Real transports let a protocol unregister a producer it never registered."""

    def unregisterProducer(self) -> None:
        self.producer = None


class _Framed:
    """A link protocol past a real handshake, on an in-memory transport."""

    OPEN = WebSocketProtocol.STATE_OPEN

    def __init__(self, case: unittest.TestCase, fast: bool) -> None:
        import base64
        import hashlib

        import txaio
        from twisted.internet.task import Clock

        self.clock = Clock()
        # Autobahn's timers go to txaio's loop (the global reactor): keep them on the clock.
        case.patch(txaio, "call_later", self.clock.callLater)
        self.link = NodeRedLink("ws://127.0.0.1:1880/ws/bridge", reactor=self.clock)
        self.link._factory._batched_timer = _ClockTimer(self.clock)
        self.listener = FakeListener()
        self.link.attach(self.listener)
        self.proto: Any = self.link._factory.buildProtocol(None)
        if not fast:
            self.proto._take_text_frames = lambda: None  # Autobahn's own path only
        self.transport = _Transport()
        self.proto.makeConnection(self.transport)
        request = self.transport.value().decode()
        key = next(
            line.split(":", 1)[1].strip()
            for line in request.split("\r\n")
            if line.lower().startswith("sec-websocket-key")
        )
        accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
        self.proto.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        assert self.proto.state == self.proto.STATE_OPEN
        self.transport.clear()

    def feed(self, chunks: list[bytes], waits: list[float] | None = None) -> tuple[Any, ...]:
        for i, chunk in enumerate(chunks):
            self.proto.dataReceived(chunk)
            if waits:  # pings go out, and lapse unless traffic came back
                self.clock.advance(waits[i % len(waits)])
        return (
            [(s[0], s[1]) for s in self.listener.statuses],
            self.link.counters["malformed"],
            self.proto.state,
            _client_frames(self.transport.value()),
            self.transport.disconnecting,
        )


_STATUS = st.builds(
    lambda d, v: json.dumps({"group_id": d, "payload": v}).encode(),
    st.sampled_from(["a", "b", "dev-é"]),
    st.integers() | st.text(max_size=300),
)
_FRAMES = st.lists(
    st.one_of(
        _STATUS.map(_server_frame),
        _STATUS.map(lambda p: _server_frame(p[:3], fin=False) + _server_frame(p[3:], opcode=0)),
        st.binary(max_size=200).map(_server_frame),  # not JSON, or not even UTF-8
        st.binary(max_size=20).map(lambda p: _server_frame(p, opcode=9)),  # ping
        st.binary(max_size=20).map(lambda p: _server_frame(p, opcode=2)),  # binary
        st.just(_server_frame(b'{"group_id":"a","payload":1}', mask=True)),
        st.just(_server_frame(b"x" * 70_000)),  # a 64-bit length, under the size limit
        # A 16-bit length for a short payload: not the minimal encoding, a violation.
        _STATUS.filter(lambda p: len(p) < 126).map(
            lambda p: b"\x81\x7e" + len(p).to_bytes(2, "big") + p
        ),
    ),
    max_size=12,
)


class LinkFramingTests(unittest.TestCase):
    """Statuses taken straight from the link's bytes: exactly what Autobahn would deliver."""

    @given(
        _FRAMES,
        st.lists(st.integers(min_value=1, max_value=400), max_size=20),
        st.lists(st.sampled_from([0.0, 0.0, 1.5, 2.5]), max_size=4),
    )
    @settings(max_examples=300, deadline=None)
    def test_same_as_autobahn_for_any_frames_and_any_reads(
        self, frames: list[bytes], cuts: list[int], waits: list[float]
    ) -> None:
        stream = b"".join(frames)
        chunks, at = [], 0
        for n in cuts:
            chunks.append(stream[at : at + n])
            at += n
        chunks.append(stream[at:])
        fast, slow = _Framed(self, fast=True), _Framed(self, fast=False)
        self.assertEqual(fast.feed(chunks, waits), slow.feed(chunks, waits))

    def test_many_statuses_in_one_read_in_order(self) -> None:
        framed = _Framed(self, fast=True)
        frames = [
            _server_frame(json.dumps({"group_id": "a", "payload": i}).encode()) for i in range(50)
        ]
        statuses, malformed, state, sent, _ = framed.feed([b"".join(frames)])
        self.assertEqual(statuses, [("a", i) for i in range(50)])
        self.assertEqual((malformed, state, sent), (0, framed.proto.STATE_OPEN, []))

    def test_invalid_utf8_still_fails_the_link(self) -> None:
        framed = _Framed(self, fast=True)
        good = _server_frame(b'{"group_id":"a","payload":1}')
        statuses, malformed, state, _, dropped = framed.feed(
            [good + _server_frame(b'"\xff"') + good]
        )
        self.assertEqual((statuses, malformed), ([("a", 1)], 0))
        self.assertEqual(state, framed.proto.STATE_CLOSED)
        self.assertTrue(dropped)

    def test_a_status_answers_an_unanswered_ping_as_in_autobahn(self) -> None:
        status = _server_frame(b'{"group_id":"a","payload":1}')
        outcomes = []
        for fast in (True, False):
            framed = _Framed(self, fast=fast)
            framed.clock.advance(2.1)  # the link pings (every 2 s), the pong is due in 3 s
            outcomes.append(framed.feed([status, b""], [3.5, 0.0]))
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual(outcomes[0][2], _Framed.OPEN)
        self.assertEqual({opcode for opcode, _ in outcomes[0][3]}, {9})  # pings, no close
