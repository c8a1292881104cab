"""One upstream link per cluster: a leader lease in Redis, with fencing.

:class:`LeaderLease` holds ``prefix:leader`` = ``"<replica id> <token>"`` with
``SET NX PX ttl``; the holder renews it every ``interval`` with a Lua
check-and-``PEXPIRE`` so that it never extends a lease that is no longer its
own.  Each acquisition draws a new fencing token (``INCR``, never below the
highest token this replica has seen, so a Redis that restarted empty cannot
hand out a token older leaders already used).  Everything the leader publishes
carries its token; replicas ignore messages older than the lease they last
read, so a leader that lost its lease without knowing it cannot speak over the
new one.

:class:`ClusterUpstream` is the upstream the hub sees on every replica.  On the
leader it runs the real upstream (Node-RED link, MQTT or simulator) and
publishes what it accepts; on a follower it applies what the leader publishes,
forwards commands to the leader and returns their results to the session that
sent them.  A Redis outage leaves the leader's link alone (its local viewers go
on being served) and takes followers' Node-RED-backed devices offline.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from bridge.hub import ORDINAL_TERM_BITS, HistoryEntry, Hub
from bridge.redisbus import RedisBus, messages
from bridge.upstream import IUpstream, IUpstreamListener, UpstreamCommand

log = Logger(namespace="bridge.leader")

#: KEYS: lease, token counter.  ARGV: replica id, ttl ms, token floor, our lease or "".
#: Returns {1, value} renewed, {2, value} acquired with a new token, {0, holder's value}.
CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and current == ARGV[4] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, current}
end
if current then return {0, current} end
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
local value = ARGV[1] .. ' ' .. token
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {2, value}
"""

#: Give the lease up at shutdown, only if it is still ours: handover without waiting.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def new_replica_id() -> str:
    """Unique per process start: a restarted replica is a new candidate."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _parse_lease(value: Any) -> tuple[str, int]:
    holder, _, token = str(value).rpartition(" ")
    return holder, int(token)


class LeaderLease(Service):
    """Campaign for, renew and give up ``prefix:leader``."""

    name = "leader-lease"

    def __init__(
        self,
        bus: RedisBus,
        clock: Any,
        replica_id: str | None = None,
        ttl: float = 3.0,
        interval: float = 1.0,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.replica_id = replica_id or new_replica_id()
        self.ttl = ttl
        self.interval = interval
        self.leader = False
        # Our lease value while we hold it; the fencing token with it.
        self.lease: str | None = None
        self.token = 0
        # The lease as last read from Redis (or announced with a newer token).
        self.holder: str | None = None
        self.holder_token = 0
        # The highest token this replica ever saw: the floor of the next one.
        self.highest = 0
        self.listeners: list[Callable[[bool], None]] = []
        self.counters: Counter[str] = Counter()
        self._busy = False
        self._quiet_until = 0.0
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        bus.listeners.append(self._bus_changed)

    @property
    def role(self) -> str:
        return "leader" if self.leader else "follower"

    def accepts(self, token: int) -> bool:
        """Fencing: is a message with this token from the current leader or a newer one?"""
        return token >= self.holder_token

    def observe(self, holder: str, token: int) -> None:
        """A leader announced itself with a token at least as new as the lease we read."""
        if token >= self.holder_token:
            self.holder, self.holder_token = holder, token
            self.highest = max(self.highest, token)

    # -------------------------------------------------------------- campaign

    def _bus_changed(self, up: bool) -> None:
        if up and not self.leader:
            # Let a leader that survived the outage renew first: one handover fewer.
            self._quiet_until = self.clock.seconds() + self.interval * 1.5
        if up and self.running:
            self.tick()

    def tick(self) -> Deferred[None] | None:
        if self._busy or not self.bus.up:
            return None
        if not self.leader and self.clock.seconds() < self._quiet_until:
            return None
        self._busy = True
        d = self.bus.execute(
            "EVAL",
            CLAIM,
            2,
            self.bus.key("leader"),
            self.bus.key("leader-token"),
            self.replica_id,
            int(self.ttl * 1000),
            self.highest,
            self.lease or "",
        )
        d.addCallbacks(self._claimed, self._claim_failed)

        def done(_: Any) -> None:
            self._busy = False

        return d.addBoth(done)

    def _claimed(self, reply: Any) -> None:
        code, value = int(reply[0]), str(reply[1])
        holder, token = _parse_lease(value)
        self.holder, self.holder_token = holder, token
        self.highest = max(self.highest, token)
        if code == 1:
            self.counters["renewals"] += 1
            return
        if code == 2:
            self.counters["acquisitions"] += 1
            was_leader = self.leader
            self.lease, self.token, self.leader = value, token, True
            log.info(
                "{what} the upstream lease as {me} (fencing token {token})",
                what="re-acquired" if was_leader else "acquired",
                me=self.replica_id,
                token=token,
            )
            if not was_leader:
                self._notify(True)
            return
        if self.leader:
            self.counters["losses"] += 1
            self.lease, self.leader = None, False
            log.emit(
                LogLevel.warn,
                "lost the upstream lease to {holder} (token {token}): stopping the link",
                holder=holder,
                token=token,
            )
            self._notify(False)

    def _claim_failed(self, failure: Failure) -> None:
        self.counters["claim_failures"] += 1
        if self.leader:
            # Keep the link: local viewers are served; Redis decides when it returns.
            log.emit(
                LogLevel.warn,
                "could not renew the upstream lease ({error}); keeping the link meanwhile",
                error=failure.getErrorMessage(),
            )

    def _notify(self, leader: bool) -> None:
        for listener in list(self.listeners):
            listener(leader)

    # --------------------------------------------------------------- service

    def startService(self) -> None:
        super().startService()
        log.info("replica {me} campaigning for the upstream lease", me=self.replica_id)
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if not self.leader or self.lease is None:
            return succeed(None)
        lease = self.lease
        self.lease, self.leader = None, False
        self._notify(False)
        d = self.bus.execute("EVAL", RELEASE, 1, self.bus.key("leader"), lease)
        d.addCallback(lambda _: log.info("released the upstream lease"))
        d.addErrback(lambda f: log.warn("could not release the lease: {e}", e=f.getErrorMessage()))
        return d


@implementer(IUpstream, IUpstreamListener)
class ClusterUpstream(Service):
    """The hub's upstream when replicas share a Redis: local link or the leader's."""

    name = "cluster-upstream"

    def __init__(
        self,
        inner: Any,
        bus: RedisBus,
        lease: LeaderLease,
        clock: Any,
        command_grace: float = 2.0,
    ) -> None:
        self.inner = inner
        self.bus = bus
        self.lease = lease
        self.clock = clock
        self._grace = command_grace
        self.me = lease.replica_id
        self.hub: Hub | None = None
        self.remote_online = False
        self._heard_at = 0.0
        self._reported: bool | None = None
        self._counters: Counter[str] = Counter()
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._stopping: Deferred[Any] | None = None
        bus.on("status", self._on_status)
        bus.batch("status")
        self._own_status = '{"o":' + json.dumps(self.me, separators=(",", ":")) + ","
        bus.on("state", self._on_state)
        bus.on(f"to:{self.me}", self._on_direct)
        bus.listeners.append(self._bus_changed)
        lease.listeners.append(self._leadership)

    # ------------------------------------------------------------ IUpstream

    @property
    def available(self) -> bool:
        if self.lease.leader:
            return bool(self.inner.available)
        return self.bus.up and self.remote_online

    @property
    def description(self) -> str:
        return f"{self.inner.description}, one link per cluster (Redis {self.bus.target.display})"

    @property
    def counters(self) -> Counter[str]:
        merged = Counter(getattr(self.inner, "counters", {}))
        merged.update(self._counters)
        return merged

    @property
    def command_grace(self) -> float:
        return 0.0 if self.lease.leader else self._grace

    def attach(self, listener: IUpstreamListener) -> None:
        assert isinstance(listener, Hub)
        self.hub = listener
        listener.bus = self
        self.inner.attach(self)

    def send_command(self, command: UpstreamCommand) -> bool:
        if self.lease.leader:
            return bool(self.inner.send_command(command))
        holder = self.lease.holder
        if not self.available or holder is None:
            return False
        message = {
            "k": "cmd",
            "o": self.me,
            "d": command.device_id,
            "p": command.payload,
            "u": command.user,
            "id": command.command_id,
            "ts": command.ts,
        }
        self.bus.publish(f"to:{holder}", json.dumps(message, separators=(",", ":")))
        self._counters["commands_forwarded"] += 1
        return True

    def health(self) -> dict[str, Any]:
        if self.lease.leader:
            health = dict(self.inner.health())
        else:
            health = {
                "state": "up" if self.available else "down",
                "via": self.lease.holder,
            }
        health["role"] = self.lease.role
        return health

    # ------------------------------------------- IUpstreamListener (inner)

    def upstream_status(self, device_id: str, payload: Any, command_id: str | None) -> None:
        if self.hub is not None and self.lease.leader:
            self.hub.upstream_status(device_id, payload, command_id)

    def upstream_state(self, online: bool) -> None:
        self._sync()
        if self.lease.leader:
            self._publish_state()

    # ------------------------------------------------------ Bus (for the hub)

    def publish_status(self, device_id: str, entry: HistoryEntry, payload_json: bytes) -> None:
        token = self.lease.token if self.lease.leader else None
        head = json.dumps(
            {
                "o": self.me,
                "f": token,
                "d": device_id,
                "ts": entry.ts,
                "by": entry.by,
                "c": entry.command_id,
                "n": entry.n,
            },
            separators=(",", ":"),
        )
        # The payload is already JSON: spliced in, not encoded again, and last,
        # so that receivers take it out as it is (_on_status).
        self.bus.publish("status", head[:-1] + ',"p":' + payload_json.decode() + "}")

    def command_result(self, origin: str, command_id: str, result: str, detail: str) -> None:
        message = {"k": "result", "id": command_id, "result": result, "detail": detail}
        self.bus.publish(f"to:{origin}", json.dumps(message, separators=(",", ":")))

    # ------------------------------------------------------- bus messages

    def _on_status(self, text: str) -> None:
        for item in messages(text):
            # Our own statuses come back too: skipped before any parsing.
            if not item.startswith(self._own_status):
                self._apply_status(item)

    def _apply_status(self, item: str) -> None:
        if self.hub is None:
            return
        # "p" comes last (publish_status), and the text ',"p":' cannot occur
        # inside a JSON string before it: the payload's JSON is cut out as
        # it came and goes to viewers without being encoded again.
        cut = item.find(',"p":')
        payload_json: str | None = item[cut + 5 : -1]
        try:
            message = json.loads(item[:cut] + "}")
            payload = json.loads(payload_json)  # type: ignore[arg-type]
        except ValueError:
            # Not in that order (another writer): whole, and encoded again.
            message = json.loads(item)
            payload, payload_json = message["p"], None
        if message["o"] == self.me:
            return
        device_id = message["d"]
        state = self.hub.devices.get(device_id)
        if state is None:
            self._counters["remote_unknown_device"] += 1
            return
        if not state.config.client:
            token = message.get("f")
            if token is None or not self.lease.accepts(token) or self.lease.leader:
                # A deposed leader's late words, or a second link: not ours to show.
                self._counters["remote_stale"] += 1
                return
        elif self.hub.presence is not None and not self.hub.presence.accepts_status(
            device_id, message["o"]
        ):
            # A device client's statuses carry no leader token: they are fenced
            # by the device's newest claim (a client taken over says no more).
            self._counters["remote_stale"] += 1
            return
        entry = HistoryEntry(
            payload, message["ts"], message["by"], message["c"], int(message.get("n", 0))
        )
        self.hub.apply_remote_status(
            device_id, entry, payload_json.encode() if payload_json is not None else None
        )

    def _on_state(self, text: str) -> None:
        message = json.loads(text)
        if message["o"] == self.me:
            return
        token = int(message["f"])
        if not self.lease.accepts(token):
            self._counters["remote_stale"] += 1
            return
        self.lease.observe(message["o"], token)
        self.remote_online = bool(message["online"])
        self._heard_at = self.clock.seconds()
        self._sync()

    def _on_direct(self, text: str) -> None:
        message = json.loads(text)
        hub = self.hub
        if hub is None:
            return
        if message["k"] == "result":
            hub.remote_command_result(message["id"], message["result"], message["detail"])
            return
        if message["k"] != "cmd":
            return
        command = UpstreamCommand(
            message["d"], message["p"], message["u"], message["id"], message["ts"]
        )
        if not self.lease.leader:
            # Leadership moved while the command was on its way.
            self.command_result(
                message["o"], command.command_id, "upstream_unavailable", "leader changed"
            )
            return
        hub.submit_remote_command(message["o"], command)

    # ------------------------------------------------------- state changes

    def _publish_state(self) -> None:
        if not self.bus.up or not self.lease.leader:
            return
        message = {"o": self.me, "f": self.lease.token, "online": bool(self.inner.available)}
        self.bus.publish("state", json.dumps(message, separators=(",", ":")))

    def _beat(self) -> None:
        """Leader: say we are alive.  Follower: notice a leader that went silent."""
        if self.lease.leader:
            self._publish_state()
            return
        if self.remote_online and self.clock.seconds() - self._heard_at > self.lease.ttl:
            log.emit(
                LogLevel.warn,
                "no word from the upstream leader {holder} for {s:g} s: devices offline",
                holder=self.lease.holder,
                s=self.lease.ttl,
            )
            self.remote_online = False
        self._sync()

    def _sync(self) -> None:
        """Tell the hub when what it should see changed (DEVICE_STATE to viewers)."""
        online = self.available
        if online != self._reported and self.hub is not None:
            self._reported = online
            self.hub.upstream_state(online)

    def _bus_changed(self, up: bool) -> None:
        if not up and not self.lease.leader:
            self.remote_online = False
        self._sync()
        if up:
            self._publish_state()

    def _leadership(self, leader: bool) -> None:
        if leader:
            self.remote_online = False
            if self.hub is not None:
                # Ordinals of this term number above every earlier term's.
                self.hub.ordinal_floor = self.lease.token << ORDINAL_TERM_BITS
            if self._stopping is not None:
                # Still closing the previous term's link: start once it is down.
                self._stopping.addCallback(lambda _: self._start_inner())
            else:
                self._start_inner()
        elif self.inner.running:
            self._stopping = maybeDeferred(self.inner.stopService)

            def stopped(_: Any) -> None:
                self._stopping = None

            self._stopping.addBoth(stopped)
        self._sync()

    def _start_inner(self) -> None:
        if self.lease.leader and not self.inner.running:
            self.inner.startService()
            self._sync()
            self._publish_state()

    # --------------------------------------------------------------- service

    def startService(self) -> None:
        super().startService()
        self._sync()
        self._heartbeat.start(self.lease.interval, now=False)
        self.lease.startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        d = self.lease.stopService()  # stops the inner upstream through _leadership
        if self._stopping is not None:
            stopping = self._stopping
            d.addCallback(lambda _: stopping)
        return d
