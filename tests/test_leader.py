"""Leadership and the cluster upstream: fakes for the glue, a real Redis for the lease."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bridge.hub import DeviceConfig, Hub
from bridge.leader import ClusterUpstream, LeaderLease
from bridge.protocol import Command
from bridge.redisbus import RedisBus
from bridge.session import DeviceView, Identity, Limits, Permission, Role, Session, State
from bridge.upstream import UpstreamCommand
from tests.support import redis_listening, require, wait_for

DEVICE = "d" * 22


class FakeBus:
    def __init__(self) -> None:
        self.up = True
        self.listeners: list[Callable[[bool], None]] = []
        self.handlers: dict[str, Callable[[str], None]] = {}
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.target = type("T", (), {"display": "redis://fake:6379/0"})()

    def key(self, name: str) -> str:
        return f"p:{name}"

    def batch(self, channel: str) -> None:
        pass

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        self.handlers[channel] = handler

    def publish(self, channel: str, message: str) -> None:
        self.published.append((channel, json.loads(message)))

    def deliver(self, channel: str, message: dict[str, Any]) -> None:
        self.handlers[channel](json.dumps(message))

    def set_up(self, up: bool) -> None:
        self.up = up
        for listener in self.listeners:
            listener(up)


class FakeLease:
    def __init__(self) -> None:
        self.replica_id = "me"
        self.leader = False
        self.token = 0
        self.holder: str | None = "boss"
        self.holder_token = 5
        self.ttl = 3.0
        self.interval = 1.0
        self.listeners: list[Callable[[bool], None]] = []

    role = property(lambda self: "leader" if self.leader else "follower")

    def accepts(self, token: int) -> bool:
        return token >= self.holder_token

    def observe(self, holder: str, token: int) -> None:
        if token >= self.holder_token:
            self.holder, self.holder_token = holder, token

    def become(self, leader: bool, token: int = 0) -> None:
        self.leader, self.token = leader, token
        for listener in self.listeners:
            listener(leader)

    def startService(self) -> None:
        pass

    def stopService(self) -> Any:
        return defer.succeed(None)


class FakeLink:
    description = "fake link"

    def __init__(self) -> None:
        self.available = False
        self.running = False
        self.sent: list[UpstreamCommand] = []
        self.counters: Counter[str] = Counter()
        self.listener: Any = None

    def attach(self, listener: Any) -> None:
        self.listener = listener

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False
        self.available = False
        self.listener.upstream_state(False)

    def send_command(self, command: UpstreamCommand) -> bool:
        self.sent.append(command)
        return self.available

    def health(self) -> dict[str, Any]:
        return {"state": "up" if self.available else "down"}


class Link:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.raw: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.raw.append(data)
        self.frames.append(json.loads(data))

    def execute(self, actions: list[Any]) -> None:
        pass


class ClusterUpstreamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.bus = FakeBus()
        self.lease = FakeLease()
        self.link = FakeLink()
        self.hub = Hub(self.clock)
        self.cluster = ClusterUpstream(self.link, self.bus, self.lease, self.clock)  # type: ignore[arg-type]
        self.hub.upstream = self.cluster
        self.cluster.attach(self.hub)
        self.hub.set_device(DeviceConfig(DEVICE, "lamp", "toggle", command_timeout=5.0))
        self.cluster.startService()
        self.addCleanup(self.cluster.stopService)
        self.viewer, self.frames = self.session("viewer")
        self.viewer_link = self.viewer.link

    def session(self, name: str) -> tuple[Session, list[dict[str, Any]]]:
        s = Session(secrets.token_hex(8), Limits(), 0.0)
        s.state = State.READY
        s.identity = Identity(Role.OPERATOR, user_id=1, username=name)
        s.grants = {DEVICE: DeviceView(DEVICE, "lamp", "toggle", 50, Permission.CHANGE)}
        link = Link()
        s.link = link
        self.hub.register(s)
        self.hub.subscribe(s, [DEVICE], history=False)
        link.frames.clear()
        return s, link.frames

    def leader_online(self, token: int = 7) -> None:
        self.bus.deliver("to:me", {"k": "noop"})
        self.bus.deliver("state", {"o": "boss", "f": token, "online": True})

    def test_follower_shows_remote_statuses_once_and_fences_stale_ones(self) -> None:
        self.leader_online()
        self.assertTrue(self.hub.is_online(DEVICE))
        status = {"o": "boss", "d": DEVICE, "ts": 1, "by": None, "c": None, "p": {"n": 1}}
        self.bus.deliver("status", {**status, "f": 7})
        self.bus.deliver("status", {**status, "f": 6, "p": {"n": "stale"}})
        self.bus.deliver("status", {**status, "o": "me", "f": 7, "p": {"n": "mine"}})
        statuses = [f for f in self.frames if f["op"] == 5]
        self.assertEqual([f["d"]["payload"] for f in statuses], [{"n": 1}])
        self.assertEqual(self.hub.history(DEVICE)[-1]["payload"], {"n": 1})
        self.assertEqual(self.bus.published, [], "a follower does not republish")

    def test_a_batch_is_applied_in_order_with_payloads_passed_on_as_they_came(self) -> None:
        self.leader_online()

        def status(origin: str, n: int, payload: str) -> str:
            head = {"o": origin, "f": 7, "d": DEVICE, "ts": n, "by": None, "c": None, "n": n}
            return json.dumps(head, separators=(",", ":"))[:-1] + ',"p":' + payload + "}"

        batch = "\n".join(
            [
                status("boss", 1, '{"t":21.50,"u":"\u00b0C"}'),
                status("me", 2, '"an echo of our own"'),
                status("boss", 3, '[1,{"z":true,"a":null}]'),
            ]
        )
        self.bus.handlers["status"](batch)
        statuses = [f for f in self.frames if f["op"] == 5]
        self.assertEqual(
            [f["d"]["payload"] for f in statuses],
            [{"t": 21.5, "u": "°C"}, [1, {"z": True, "a": None}]],
        )
        self.assertEqual(statuses[1]["s"], statuses[0]["s"] + 1)
        self.assertEqual([e["ts"] for e in self.hub.history(DEVICE)], [1, 3])
        # Not decoded and encoded again on the way: 21.50 stays as it was written.
        self.assertIn(b'"payload":{"t":21.50,', self.viewer_link.raw[-2])

    def test_follower_forwards_commands_and_relays_the_result(self) -> None:
        self.leader_online()
        op, frames = self.session("op")
        self.hub.submit_command(op, Command(DEVICE, {"on": 1}, "c1"))
        channel, message = self.bus.published[-1]
        self.assertEqual((channel, message["k"], message["o"]), ("to:boss", "cmd", "me"))
        self.assertEqual(message["u"], "op")
        self.bus.deliver(
            "to:me", {"k": "result", "id": message["id"], "result": "confirmed", "detail": ""}
        )
        results = [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual(results, ["sent", "confirmed"])

    def test_forwarded_command_unanswered_times_out_after_the_grace(self) -> None:
        self.leader_online()
        op, frames = self.session("op")
        self.hub.submit_command(op, Command(DEVICE, 1, "c1"))

        def results() -> list[str]:
            return [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"]

        for _ in range(13):  # the leader is alive (heartbeats) but never answers
            self.clock.advance(0.5)
            self.leader_online()
        self.assertEqual(results(), ["sent"])
        self.clock.advance(1.0)
        self.assertEqual(results(), ["sent", "timeout"])

    def test_forwarded_command_ends_when_the_leader_goes_silent(self) -> None:
        self.leader_online()
        op, frames = self.session("op")
        self.hub.submit_command(op, Command(DEVICE, 1, "c1"))
        self.clock.advance(4.5)
        results = [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual(results, ["sent", "upstream_unavailable"])

    def test_silent_leader_and_redis_outage_take_devices_offline(self) -> None:
        self.leader_online()
        self.clock.advance(4.5)
        self.assertFalse(self.hub.is_online(DEVICE))
        self.leader_online(8)
        self.assertTrue(self.hub.is_online(DEVICE))
        self.bus.set_up(False)
        self.assertFalse(self.hub.is_online(DEVICE))
        states = [f["d"]["online"] for f in self.frames if f.get("t") == "DEVICE_STATE"]
        self.assertEqual(states, [True, False, True, False])

    def test_leader_runs_the_link_confirms_forwarded_commands_and_publishes(self) -> None:
        self.lease.become(True, token=9)
        self.assertTrue(self.link.running)
        self.link.available = True
        self.link.listener.upstream_state(True)
        self.assertEqual(self.bus.published[-1], ("state", {"o": "me", "f": 9, "online": True}))
        self.bus.deliver(
            "to:me",
            {"k": "cmd", "o": "other", "d": DEVICE, "p": 1, "u": "op", "id": "cid", "ts": 0},
        )
        self.assertEqual([c.command_id for c in self.link.sent], ["cid"])
        self.bus.published.clear()
        self.link.listener.upstream_status(DEVICE, {"on": True}, "cid")
        (ch1, status), (ch2, result) = self.bus.published
        self.assertEqual((ch1, status["f"], status["by"], status["c"]), ("status", 9, "op", "cid"))
        self.assertEqual((ch2, result["result"]), ("to:other", "confirmed"))
        # The viewer on the leader saw the status once.
        self.assertEqual(len([f for f in self.frames if f["op"] == 5]), 1)

    def test_losing_the_lease_stops_the_link(self) -> None:
        self.lease.become(True, token=9)
        self.link.available = True
        self.link.listener.upstream_state(True)
        self.lease.become(False)
        self.assertFalse(self.link.running)
        self.assertFalse(self.hub.is_online(DEVICE))


class LeaseTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_one_leader_handover_on_release_and_tokens_only_grow(self) -> Any:
        require(redis_listening(), "Redis at 127.0.0.1:6379")
        prefix = f"bridge-unit-{secrets.token_hex(4)}"
        buses = [RedisBus("redis://127.0.0.1:6379/0", reactor, prefix=prefix) for _ in range(2)]
        leases = [LeaderLease(b, reactor, ttl=1.0, interval=0.2) for b in buses]
        for bus in buses:
            bus.startService()
            self.addCleanup(bus.stopService)
        yield wait_for(lambda: all(b.up for b in buses))
        for lease in leases:
            lease.startService()
        yield wait_for(lambda: sum(x.leader for x in leases) == 1)
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(sum(x.leader for x in leases), 1, "still exactly one")
        first = next(x for x in leases if x.leader)
        second = next(x for x in leases if not x.leader)
        self.assertEqual(second.holder, first.replica_id)
        token = first.token
        yield first.stopService()
        yield wait_for(lambda: second.leader)
        self.assertGreater(second.token, token)
        # Redis "restarted" empty: the next token still exceeds every one seen.
        yield buses[0].execute("DEL", buses[0].key("leader"), buses[0].key("leader-token"))
        yield wait_for(lambda: second.counters["acquisitions"] == 2)
        self.assertGreater(second.token, token + 1)
        yield second.stopService()
