"""The Redis bus: URL parsing, and commands and channels against a real Redis."""

from __future__ import annotations

import secrets
import socket
import time
from typing import Any

import txredisapi
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bridge.redisbus import RedisBus, messages, parse_redis_url
from tests.support import redis_listening, require, wait_for


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class ParseTests(unittest.TestCase):
    def test_defaults(self) -> None:
        t = parse_redis_url("redis://cache.internal")
        self.assertEqual(
            (t.host, t.port, t.db, t.tls, t.password), ("cache.internal", 6379, 0, False, None)
        )

    def test_tls_db_and_credentials(self) -> None:
        t = parse_redis_url("rediss://app:s%40cret@10.0.0.5:6380/3", password="env")
        self.assertEqual(
            (t.port, t.db, t.tls, t.username, t.password), (6380, 3, True, "app", "s@cret")
        )
        self.assertEqual(t.display, "rediss://10.0.0.5:6380/3")

    def test_password_from_environment_when_not_in_url(self) -> None:
        self.assertEqual(parse_redis_url("redis://h/", password="env").password, "env")

    def test_refusals(self) -> None:
        for url in ("http://h", "redis://", "redis://h/x"):
            with self.assertRaises(ValueError):
                parse_redis_url(url)


class ParserTests(unittest.SynchronousTestCase):
    def test_a_burst_in_one_read_is_handled_in_that_read(self) -> None:
        """Every message of a TCP read reaches its handler before the read returns.

        txredisapi's pure-Python parser handles one bulk string per reactor
        turn (it pauses the transport and reschedules the rest), so a follower
        under load fell seconds behind and wrote each status to its viewers in
        separate sends; hiredis parses the whole read at once.
        """
        from twisted.internet.testing import StringTransport

        from bridge.redisbus import _Factory, _Subscriber

        bus = RedisBus("redis://127.0.0.1:6379/0", reactor, prefix="p")
        got: list[str] = []
        bus.on("status", got.append)
        proto = _Factory(bus, _Subscriber).buildProtocol(None)
        proto.makeConnection(StringTransport())
        messages = [f'{{"n":{i},"p":"{"x" * 200}"}}' for i in range(200)]
        chunk = b"".join(
            b"*3\r\n$7\r\nmessage\r\n$8\r\np:status\r\n$%d\r\n%s\r\n" % (len(m), m.encode())
            for m in messages
        )
        proto.dataReceived(chunk[:70_000])
        proto.dataReceived(chunk[70_000:])
        self.assertEqual(got, messages)


class LiveBusTests(unittest.TestCase):
    timeout = 30

    def make_bus(self, url: str = "redis://127.0.0.1:6379/0", **kwargs: Any) -> RedisBus:
        bus = RedisBus(url, reactor, prefix=f"bridge-unit-{secrets.token_hex(4)}", **kwargs)
        return bus

    @defer.inlineCallbacks
    def test_publish_reaches_a_subscriber_in_order(self) -> Any:
        require(redis_listening(), "Redis at 127.0.0.1:6379")
        a = self.make_bus()
        b = RedisBus("redis://127.0.0.1:6379/0", reactor, prefix=a.prefix)
        got: list[str] = []
        b.on("news", got.append)
        for bus in (a, b):
            bus.startService()
            self.addCleanup(bus.stopService)
        yield wait_for(lambda: a.up and b.up)
        for i in range(100):
            a.publish("news", f"m{i}")
        yield wait_for(lambda: len(got) == 100)
        self.assertEqual(got, [f"m{i}" for i in range(100)])
        self.assertEqual(b.health()["state"], "up")
        value = yield a.execute("SET", a.key("k"), "v", "PX", 1000)
        self.assertEqual(value, "OK")

    @defer.inlineCallbacks
    def test_one_turn_of_a_batched_channel_is_one_publish_in_order(self) -> Any:
        require(redis_listening(), "Redis at 127.0.0.1:6379")
        a = self.make_bus()
        b = RedisBus("redis://127.0.0.1:6379/0", reactor, prefix=a.prefix)
        got: list[tuple[str, str]] = []
        b.on("status", lambda text: got.append(("status", text)))
        b.on("other", lambda text: got.append(("other", text)))
        a.batch("status")
        for bus in (a, b):
            bus.startService()
            self.addCleanup(bus.stopService)
        yield wait_for(lambda: a.up and b.up)
        for message in ("s1", "s2"):
            a.publish("status", message)
        a.publish("other", "o1")
        a.publish("status", "s3")
        a.publish("other", "o2")
        a.publish("other", "o3")
        self.assertEqual(got, [], "sent at the end of the turn")
        yield wait_for(lambda: len(got) == 5)
        self.assertEqual(
            got,
            [
                ("status", "s1\ns2"),
                ("other", "o1"),
                ("status", "s3"),
                ("other", "o2"),
                ("other", "o3"),
            ],
        )
        self.assertEqual(a.counters["published"], 6)
        self.assertEqual(a.counters["batched"], 2)
        # A burst larger than a batch goes in several, still in order.
        got.clear()
        for i in range(450):
            a.publish("status", f"m{i}")
        yield wait_for(lambda: sum(len(messages(t)) for _, t in got) == 450)
        self.assertEqual(len(got), 3)
        self.assertEqual([m for _, t in got for m in messages(t)], [f"m{i}" for i in range(450)])
        # Large messages: about 64 KB per PUBLISH at most, one alone if larger.
        got.clear()
        big = ["a" * 30_000, "b" * 30_000, "c" * 30_000, "d" * 100_000, "e"]
        for message in big:
            a.publish("status", message)
        yield wait_for(lambda: sum(len(messages(t)) for _, t in got) == 5)
        self.assertEqual([len(messages(t)) for _, t in got], [2, 1, 1, 1])
        # What is published as the bus stops still leaves.
        got.clear()
        a.publish("other", "goodbye")
        yield a.stopService()
        yield wait_for(lambda: got == [("other", "goodbye")])

    @defer.inlineCallbacks
    def test_down_fails_commands_at_once(self) -> Any:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        bus = self.make_bus(f"redis://127.0.0.1:{port}/0")
        bus.startService()
        self.addCleanup(bus.stopService)
        self.assertFalse(bus.up)
        started = time.monotonic()
        with self.assertRaises(txredisapi.ConnectionError):
            yield bus.execute("PING")
        self.assertLess(time.monotonic() - started, 0.5)
        bus.publish("x", "lost")
        self.assertEqual(bus.counters["publish_dropped"], 1)
        self.assertEqual(bus.health()["state"], "down")
