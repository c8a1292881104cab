"""Device clients across replicas: fakes for two replicas' glue, a real Redis for the claim."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bridge.hub import DeviceConfig, Hub
from bridge.leader import ClusterUpstream
from bridge.presence import CLAIM, DevicePresence
from bridge.protocol import Command
from bridge.redisbus import RedisBus
from bridge.session import Close, DeviceView, Identity, Limits, Permission, Role, Session, State
from tests.support import redis_listening, require, wait_for
from tests.test_hub import FakeRecorder
from tests.test_leader import FakeLease, FakeLink
from tests.test_session import Link

ROBOT = "r" * 22


class FakeRedis:
    """One Redis for several fake buses: PUBLISH in order to every subscriber, and CLAIM."""

    def __init__(self) -> None:
        self.buses: list[FakeBus] = []
        self.queue: deque[tuple[str, str]] = deque()
        self.tokens: Counter[str] = Counter()
        # While set, EVAL replies wait for release(): claims whose answers cross.
        self.hold = False
        self.held: list[tuple[defer.Deferred[Any], int]] = []

    def publish(self, channel: str, message: str) -> None:
        self.queue.append((channel, message))

    def flush(self) -> None:
        while self.queue:
            channel, message = self.queue.popleft()
            for bus in list(self.buses):
                handler = bus.handlers.get(channel)
                if handler is not None and bus.up and not bus.deaf:
                    handler(message)

    def eval(self, script: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        assert script == CLAIM
        _, key, device, floor, replica, channel = args
        token = self.tokens[f"{key}/{device}"] + 1
        token = max(token, int(floor) + 1)
        self.tokens[f"{key}/{device}"] = token
        self.publish(channel, json.dumps({"k": "claim", "o": replica, "d": device, "t": token}))
        d: defer.Deferred[Any] = defer.Deferred()
        if self.hold:
            self.held.append((d, token))
        else:
            d.callback(token)
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, token in held:
            d.callback(token)


class FakeBus:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.up = True
        self.deaf = False
        self.listeners: list[Callable[[bool], None]] = []
        self.handlers: dict[str, Callable[[str], None]] = {}
        self.target = type("T", (), {"display": "redis://fake:6379/0"})()
        redis.buses.append(self)

    def key(self, name: str) -> str:
        return f"p:{name}"

    def batch(self, channel: str) -> None:
        pass

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        self.handlers[self.key(channel)] = handler

    def publish(self, channel: str, message: str) -> None:
        if self.up and self in self.redis.buses:
            self.redis.publish(self.key(channel), message)

    def kill(self) -> None:
        """The process is gone: no goodbye, nothing more published or heard."""
        self.redis.buses.remove(self)

    def execute(self, command: str, script: str, *args: Any) -> defer.Deferred[Any]:
        assert command == "EVAL"
        if not self.up:
            return defer.fail(ConnectionError("Redis is not connected"))
        return self.redis.eval(script, args)

    def set_up(self, up: bool) -> None:
        self.up = up
        for listener in list(self.listeners):
            listener(up)


class Replica:
    """A hub with its cluster upstream and device presence, as service.py wires them."""

    def __init__(self, name: str, redis: FakeRedis, clock: task.Clock) -> None:
        self.name = name
        self.clock = clock
        self.bus = FakeBus(redis)
        lease = FakeLease()
        lease.replica_id = name
        self.recorder = FakeRecorder()
        self.hub = Hub(clock, None, self.recorder)
        self.cluster = ClusterUpstream(FakeLink(), self.bus, lease, clock)  # type: ignore[arg-type]
        self.hub.upstream = self.cluster
        self.cluster.attach(self.hub)
        self.presence = DevicePresence(self.bus, clock, name)  # type: ignore[arg-type]
        self.presence.attach(self.hub)
        self.hub.set_device(
            DeviceConfig(ROBOT, "robot", "toggle", command_timeout=5.0, client=True)
        )
        self.cluster.startService()
        self.presence.startService()

    def stop(self) -> None:
        self.presence.stopService()
        self.cluster.stopService()

    def viewer(self, name: str = "op") -> tuple[Session, Link]:
        s = Session(secrets.token_hex(8), Limits(), self.clock.seconds())
        s.state = State.READY
        s.identity = Identity(Role.OPERATOR, user_id=1, username=name)
        s.grants = {ROBOT: DeviceView(ROBOT, "robot", "toggle", 50, Permission.CHANGE)}
        link = Link()
        s.attach(link, self.clock.seconds())
        self.hub.register(s)
        self.hub.subscribe(s, [ROBOT], history=False)
        link.frames.clear()
        return s, link

    def device_client(self) -> tuple[Session, Link]:
        s = Session(secrets.token_hex(8), Limits(), self.clock.seconds())
        s.state = State.READY
        s.identity = Identity(Role.DEVICE, device_id=ROBOT)
        s.grants = {ROBOT: DeviceView(ROBOT, "robot", "toggle", 50, Permission.CHANGE)}
        link = Link()
        s.attach(link, self.clock.seconds())
        self.hub.register(s)
        self.hub.device_client_attached(s)
        return s, link

    def connection_closed(self, session: Session) -> None:
        """What the edge does when a connection ends and the session cannot resume."""
        session.detach(self.clock.seconds())
        session.resumable = False
        self.hub.forget(session)


def states(link: Link) -> list[bool]:
    return [e["online"] for e in link.events("DEVICE_STATE")]


def results(link: Link) -> list[str]:
    return [e["result"] for e in link.events("COMMAND_RESULT")]


def commands(link: Link) -> list[dict[str, Any]]:
    return [f["d"] for f in link.frames if f["op"] == 4]


def closes(link: Link) -> list[int]:
    return [a.code for a in link.executed if isinstance(a, Close)]


class PresenceTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.redis = FakeRedis()
        self.a = Replica("A", self.redis, self.clock)
        self.b = Replica("B", self.redis, self.clock)
        self.addCleanup(self.b.stop)
        self.addCleanup(self.a.stop)

    def advance(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.redis.flush()

    def test_client_on_a_is_online_on_b_and_a_command_round_trips_once(self) -> None:
        op, op_link = self.b.viewer()
        watcher, watcher_link = self.a.viewer("watcher")
        dev, dev_link = self.a.device_client()
        self.redis.flush()
        self.assertEqual(states(op_link), [True])
        self.assertTrue(self.b.hub.is_online(ROBOT))

        self.b.hub.submit_command(op, Command(ROBOT, {"pos": 3}, "m1"), "10.0.0.9")
        self.redis.flush()
        [command] = commands(dev_link)
        self.assertEqual((command["device"], command["payload"]), (ROBOT, {"pos": 3}))
        self.a.hub.upstream_status(ROBOT, {"pos": 3}, command["id"])
        self.redis.flush()
        self.assertEqual(results(op_link), ["sent", "confirmed"])
        [status] = [f["d"] for f in op_link.frames if f["op"] == 5]
        self.assertEqual((status["by"], status["command_id"]), ("op", command["id"]))
        self.assertEqual(len([f for f in watcher_link.frames if f["op"] == 5]), 1)
        # Audited once, by the replica the viewer is on.
        self.assertEqual([r.result for r in self.b.recorder.commands], ["sent", "confirmed"])
        self.assertEqual(self.b.recorder.commands[0].remote_addr, "10.0.0.9")
        self.assertEqual(self.a.recorder.commands, [])
        # Persisted once, by the replica that accepted it.
        self.assertEqual(len(self.a.recorder.statuses), 1)
        self.assertEqual(self.b.recorder.statuses, [])
        self.advance(10)
        self.assertEqual(results(op_link), ["sent", "confirmed"], "no late second result")
        self.assertEqual(len(commands(dev_link)), 1, "delivered exactly once")

    def test_beats_keep_it_online_and_a_silent_holder_expires_with_its_commands(self) -> None:
        op, op_link = self.b.viewer()
        self.a.device_client()
        self.advance(10)
        self.assertEqual(states(op_link), [True], "beats keep it online")
        self.b.hub.submit_command(op, Command(ROBOT, 1, "m1"))
        self.redis.flush()
        # Replica A is killed: no goodbye, no more beats.
        self.a.bus.kill()
        self.advance(2.5)
        self.assertEqual(states(op_link), [True])
        self.advance(2.0)
        self.assertEqual(states(op_link), [True, False])
        self.assertEqual(results(op_link), ["sent", "upstream_unavailable"])
        self.b.hub.submit_command(op, Command(ROBOT, 1, "m2"))
        self.assertEqual(results(op_link)[-1], "upstream_unavailable")

    def test_client_leaving_ends_commands_once_and_takes_the_device_offline_at_once(self) -> None:
        op, op_link = self.b.viewer()
        dev, dev_link = self.a.device_client()
        self.redis.flush()
        self.b.hub.submit_command(op, Command(ROBOT, 1, "m1"))
        self.redis.flush()
        self.assertEqual(len(commands(dev_link)), 1)
        self.a.connection_closed(dev)
        self.redis.flush()
        self.assertEqual(states(op_link), [True, False])
        self.assertEqual(results(op_link), ["sent", "upstream_unavailable"])
        self.advance(10)
        self.assertEqual(results(op_link), ["sent", "upstream_unavailable"])
        self.assertEqual(
            [r.result for r in self.b.recorder.commands], ["sent", "upstream_unavailable"]
        )

    def test_forwarded_command_that_finds_no_client_is_answered_unavailable(self) -> None:
        op, op_link = self.b.viewer()
        dev, _ = self.a.device_client()
        self.redis.flush()
        self.b.hub.submit_command(op, Command(ROBOT, 1, "m1"))
        # The client leaves while the command is on its way to A.
        dev.detach(self.clock.seconds())
        self.a.hub.device_client_detached(dev)
        self.redis.flush()
        self.assertEqual(results(op_link), ["sent", "upstream_unavailable"])
        self.assertEqual(self.a.hub.counters["commands_forwarded_upstream_unavailable"], 1)

    def test_a_second_client_elsewhere_takes_over_and_the_first_is_closed_4011(self) -> None:
        on_a, on_a_link = self.a.viewer("watcher")
        on_b, on_b_link = self.b.viewer()
        first, first_link = self.a.device_client()
        self.redis.flush()
        self.a.hub.submit_command(on_a, Command(ROBOT, 1, "pending-on-first"))
        second, second_link = self.b.device_client()
        self.redis.flush()
        self.assertEqual(closes(first_link), [4011])
        self.assertEqual(closes(second_link), [])
        # What the first client was sent ends; the device never looked offline.
        self.assertEqual(results(on_a_link), ["sent", "upstream_unavailable"])
        self.a.connection_closed(first)
        self.redis.flush()
        self.assertEqual(states(on_a_link), [True])
        self.assertEqual(states(on_b_link), [True])
        # Commands from A now reach the new client on B.
        self.a.hub.submit_command(on_a, Command(ROBOT, 2, "m2"))
        self.redis.flush()
        self.assertEqual([c["payload"] for c in commands(second_link)], [2])
        self.assertEqual(len(commands(first_link)), 1)
        self.advance(5)
        self.assertEqual(states(on_a_link), [True])

    def test_a_new_holder_numbers_statuses_above_every_earlier_holder(self) -> None:
        """Ordinals, which session snapshots rely on, never repeat across holders."""
        first, _ = self.a.device_client()
        self.redis.flush()
        self.a.hub.upstream_status(ROBOT, "from a", None)
        self.redis.flush()
        second, _ = self.b.device_client()
        self.redis.flush()
        self.b.hub.upstream_status(ROBOT, "from b", None)
        self.redis.flush()
        [n_a] = [e.n for e in self.a.hub.devices[ROBOT].history if e.payload == "from a"]
        [n_b] = [e.n for e in self.b.hub.devices[ROBOT].history if e.payload == "from b"]
        self.assertGreater(n_b, n_a)
        self.assertGreaterEqual(n_b, 2 << 32, "the second claim's token sets the floor")

    def test_crossing_claims_the_newest_token_wins_on_both_replicas(self) -> None:
        self.redis.hold = True
        first, first_link = self.a.device_client()
        second, second_link = self.b.device_client()
        # Both claims are published (A's first) before either replica has its reply.
        self.redis.flush()
        self.redis.release()
        self.redis.flush()
        self.assertEqual(closes(first_link), [4011])
        self.assertEqual(closes(second_link), [])
        self.assertEqual(self.a.presence.holder(ROBOT), "B")
        self.assertIsNone(self.b.presence.holder(ROBOT))

    def test_a_holder_that_missed_the_claim_learns_from_the_next_beat(self) -> None:
        first, first_link = self.a.device_client()
        self.redis.flush()
        self.a.bus.deaf = True
        self.b.device_client()
        self.redis.flush()
        self.assertEqual(closes(first_link), [])
        self.a.bus.deaf = False
        self.advance(1.0)
        self.assertEqual(closes(first_link), [4011])

    def test_statuses_from_a_client_that_lost_its_claim_are_dropped(self) -> None:
        on_b, on_b_link = self.b.viewer()
        first, _ = self.a.device_client()
        self.redis.flush()
        self.a.hub.upstream_status(ROBOT, {"n": 1}, None)
        self.redis.flush()
        self.b.device_client()
        # A's client speaks once more before A hears of the takeover.
        self.a.hub.upstream_status(ROBOT, {"n": "stale"}, None)
        self.redis.flush()
        self.b.hub.upstream_status(ROBOT, {"n": 2}, None)
        self.redis.flush()
        payloads = [f["d"]["payload"] for f in on_b_link.frames if f["op"] == 5]
        self.assertEqual(payloads, [{"n": 1}, {"n": 2}])
        self.assertEqual(self.b.cluster.counters["remote_stale"], 1)

    def test_statuses_cross_exactly_once_and_carry_no_leader_token(self) -> None:
        self.a.cluster.lease.become(True, token=9)  # type: ignore[attr-defined]
        on_b, on_b_link = self.b.viewer()
        self.b.device_client()
        self.redis.flush()
        for n in range(5):
            self.b.hub.upstream_status(ROBOT, {"n": n}, None)
        self.redis.flush()
        on_a, on_a_link = self.a.viewer()
        self.b.hub.upstream_status(ROBOT, {"n": 5}, None)
        self.redis.flush()
        self.assertEqual(
            [f["d"]["payload"]["n"] for f in on_b_link.frames if f["op"] == 5], list(range(6))
        )
        self.assertEqual([f["d"]["payload"]["n"] for f in on_a_link.frames if f["op"] == 5], [5])
        # Even the leader, which fences Node-RED statuses, takes them.
        self.assertEqual([h["payload"]["n"] for h in self.a.hub.history(ROBOT)], list(range(6)))

    def test_redis_outage_offline_elsewhere_then_claimed_again(self) -> None:
        on_b, on_b_link = self.b.viewer()
        self.b.bus.set_up(False)
        self.assertEqual(self.redis.buses[0], self.a.bus)
        # A client identifies on A while A cannot reach Redis: served locally.
        self.a.bus.set_up(False)
        dev, dev_link = self.a.device_client()
        self.assertTrue(self.a.hub.is_online(ROBOT))
        self.assertEqual(self.a.presence.counters["claim_failures"], 0)
        self.assertFalse(self.b.hub.is_online(ROBOT))
        self.a.bus.set_up(True)
        self.b.bus.set_up(True)
        self.redis.flush()
        self.assertEqual(states(on_b_link), [True])
        self.b.hub.submit_command(on_b, Command(ROBOT, 1, "m1"))
        self.redis.flush()
        self.assertEqual(len(commands(dev_link)), 1)
        self.b.bus.set_up(False)
        self.assertEqual(states(on_b_link), [True, False])
        self.assertEqual(results(on_b_link), ["sent", "upstream_unavailable"])

    def test_a_stopping_replica_says_goodbye(self) -> None:
        on_b, on_b_link = self.b.viewer()
        self.a.device_client()
        self.redis.flush()
        self.a.presence.stopService()
        self.redis.flush()
        self.assertEqual(states(on_b_link), [True, False])


class HubStub:
    """What the presence calls on a hub, recorded."""

    def __init__(self) -> None:
        self.changed: list[str] = []
        self.superseded: list[str] = []
        self.presence: Any = None

    def device_presence_changed(self, device_id: str) -> None:
        self.changed.append(device_id)

    def device_client_superseded(self, device_id: str) -> None:
        self.superseded.append(device_id)


class RealRedisTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_claims_in_token_order_beats_expiry_and_floor_on_a_real_redis(self) -> Any:
        require(redis_listening(), "Redis at 127.0.0.1:6379")
        prefix = f"bridge-unit-{secrets.token_hex(4)}"
        buses = [RedisBus("redis://127.0.0.1:6379/0", reactor, prefix=prefix) for _ in range(2)]
        presences = [
            DevicePresence(bus, reactor, name, ttl=1.0, interval=0.2)
            for bus, name in zip(buses, ("A", "B"), strict=True)
        ]
        hubs = [HubStub(), HubStub()]
        for presence, hub in zip(presences, hubs, strict=True):
            presence.attach(hub)  # type: ignore[arg-type]
        for bus in buses:
            bus.startService()
        self.addCleanup(lambda: defer.gatherResults([b.stopService() for b in buses if b.running]))
        yield wait_for(lambda: all(b.up for b in buses))
        for presence in presences:
            presence.startService()
            self.addCleanup(lambda p=presence: p.running and p.stopService())
        a, b = presences
        a.claim(ROBOT)
        yield wait_for(lambda: b.holder(ROBOT) == "A")
        token = a._local[ROBOT].token
        assert token is not None
        # Beats keep A alive past the TTL.
        yield task.deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(b.holder(ROBOT), "A")
        # B takes over: A hears the newer claim and lets its client go.
        b.claim(ROBOT)
        yield wait_for(lambda: hubs[0].superseded == [ROBOT])
        self.assertEqual(a.holder(ROBOT), "B")
        self.assertGreater(b._local[ROBOT].token or 0, token)
        # Redis "restarted" empty: the next claim still beats every token seen.
        yield buses[0].execute("DEL", buses[0].key("device-tokens"))
        seen = b._local[ROBOT].token or 0
        a.claim(ROBOT)
        yield wait_for(lambda: hubs[1].superseded == [ROBOT])
        self.assertGreater(a._local[ROBOT].token or 0, seen)
        # A dies without a word (its Redis connections go): B sees it expire.
        a.stopService = lambda: None  # type: ignore[method-assign]
        a._loop.stop()
        yield buses[0].stopService()
        started = time.monotonic()
        yield wait_for(lambda: b.holder(ROBOT) is None, timeout=5)
        self.assertLess(time.monotonic() - started, 2.0)
