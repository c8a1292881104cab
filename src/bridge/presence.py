"""Device clients across replicas: which replica holds each device's client.

A device with a key is driven by one client, connected to one replica.  That
replica *claims* the device: a Lua script draws the device's next token
(``HINCRBY prefix:device-tokens``, never below the highest token the replica
has seen, so a Redis that restarted empty cannot hand out an old one) and
publishes the claim on ``prefix:devices`` in the same step, so every replica
sees claims in token order.  The newest claim wins: a replica whose client
holds an older one closes it with 4011, as a second client on one replica
would.

The holder then says it still holds its devices every ``interval`` (one beat
listing devices and tokens) and says so at once when its client goes
(``gone``).  Other replicas show a device online while its holder's beats
keep coming within ``ttl``: a replica killed with SIGKILL leaves its devices
"online" elsewhere for ``ttl`` + ``interval`` at most, and the commands sent
to it end ``upstream_unavailable`` then.  A command from a viewer on another
replica is published once to the holder's ``prefix:dev:<replica>``; the
holder hands it to its client and sends the result back like the leader
does for Node-RED commands (``bridge.leader.ClusterUpstream``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.hub import ORDINAL_TERM_BITS, Hub
from bridge.redisbus import RedisBus
from bridge.upstream import UpstreamCommand

log = Logger(namespace="bridge.presence")

#: KEYS: the token hash.  ARGV: device id, token floor, replica id, channel.
#: Draws the device's next token and publishes the claim in one step.
CLAIM = """
local token = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local floor = tonumber(ARGV[2])
if token <= floor then
  token = floor + 1
  redis.call('HSET', KEYS[1], ARGV[1], token)
end
redis.call('PUBLISH', ARGV[4], cjson.encode({k = 'claim', o = ARGV[3], d = ARGV[1], t = token}))
return token
"""


@dataclass(slots=True)
class _Holder:
    """The newest claim this replica knows of for one device."""

    replica: str
    token: int
    heard_at: float
    live: bool = True


@dataclass(eq=False, slots=True)
class _Claim:
    """A local client's claim: its token once Redis drew one."""

    token: int | None = None
    asking: bool = False


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class DevicePresence(Service):
    """Claims, beats and forwarded commands for the device clients of a cluster."""

    name = "device-presence"

    def __init__(
        self,
        bus: RedisBus,
        clock: Any,
        replica_id: str,
        ttl: float = 3.0,
        interval: float = 1.0,
        command_grace: float = 2.0,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.me = replica_id
        self.ttl = ttl
        self.interval = interval
        self.command_grace = command_grace
        self.hub: Hub | None = None
        self.counters: Counter[str] = Counter()
        self._local: dict[str, _Claim] = {}
        self._holders: dict[str, _Holder] = {}
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        bus.on("devices", self._on_devices)
        bus.on(f"dev:{self.me}", self._on_command)
        bus.listeners.append(self._bus_changed)

    def attach(self, hub: Hub) -> None:
        self.hub = hub
        hub.presence = self

    # ------------------------------------------------------ for the hub

    def claim(self, device_id: str) -> None:
        """A client for ``device_id`` identified here: make it the cluster's."""
        claim = _Claim()
        self._local[device_id] = claim
        self._ask(device_id, claim)

    def release(self, device_id: str) -> None:
        """This replica's client for ``device_id`` went away."""
        claim = self._local.pop(device_id, None)
        if claim is None or claim.token is None:
            return
        holder = self._holders.get(device_id)
        if holder is not None and (holder.replica, holder.token) == (self.me, claim.token):
            holder.live = False
        self._gone(device_id, claim.token)

    def holder(self, device_id: str) -> str | None:
        """The other replica whose client drives ``device_id``, while it is alive."""
        holder = self._holders.get(device_id)
        if holder is None or not holder.live or holder.replica == self.me or not self.bus.up:
            return None
        if self.clock.seconds() - holder.heard_at > self.ttl:
            return None
        return holder.replica

    def forward(self, command: UpstreamCommand) -> str | None:
        """Send a command to the holder's client; the replica it went to, or None."""
        holder = self.holder(command.device_id)
        if holder is None:
            return None
        message = {
            "o": self.me,
            "d": command.device_id,
            "p": command.payload,
            "u": command.user,
            "id": command.command_id,
            "ts": command.ts,
        }
        self.bus.publish(f"dev:{holder}", _dumps(message))
        self.counters["commands_forwarded"] += 1
        return holder

    def accepts_status(self, device_id: str, replica: str) -> bool:
        """Fencing for client statuses: only from the replica of the newest claim."""
        holder = self._holders.get(device_id)
        return holder is None or holder.replica == replica

    def health(self) -> dict[str, Any]:
        return {
            "local": sum(1 for c in self._local.values() if c.token is not None),
            "remote": sum(1 for d in self._holders if self.holder(d) is not None),
            "counters": dict(self.counters),
        }

    # -------------------------------------------------------- claiming

    def _ask(self, device_id: str, claim: _Claim) -> None:
        if not self.bus.up or claim.asking:
            return
        claim.asking = True
        known = self._holders.get(device_id)
        d = self.bus.execute(
            "EVAL",
            CLAIM,
            1,
            self.bus.key("device-tokens"),
            device_id,
            known.token if known is not None else 0,
            self.me,
            self.bus.key("devices"),
        )
        d.addCallback(self._claimed, device_id, claim)
        d.addErrback(self._claim_failed, claim)

    def _claimed(self, token: Any, device_id: str, claim: _Claim) -> None:
        claim.asking = False
        token = int(token)
        self.counters["claims"] += 1
        self._seen(device_id, self.me, token)
        if self._local.get(device_id) is not claim:
            # Released (or replaced) while the claim was on its way.
            self._gone(device_id, token)
            return
        claim.token = token
        if self.hub is not None and (state := self.hub.devices.get(device_id)) is not None:
            # As for a new leader: this holder's statuses number above every earlier one's.
            state.ordinal_floor = token << ORDINAL_TERM_BITS
        holder = self._holders[device_id]
        if holder.token > token:
            # A newer claim from elsewhere overtook ours on the way.
            self._superseded(device_id)

    def _claim_failed(self, failure: Failure, claim: _Claim) -> None:
        # Asked again on the next beat once Redis answers.
        claim.asking = False
        self.counters["claim_failures"] += 1
        log.warn("could not claim a device client: {e}", e=failure.getErrorMessage())

    def _gone(self, device_id: str, token: int) -> None:
        message = {"k": "gone", "o": self.me, "d": device_id, "t": token}
        self.bus.publish("devices", _dumps(message))

    def _superseded(self, device_id: str) -> None:
        self._local.pop(device_id, None)
        self.counters["taken_over"] += 1
        if self.hub is not None:
            self.hub.device_client_superseded(device_id)

    # ----------------------------------------------------- what we hear

    def _seen(self, device_id: str, replica: str, token: int) -> None:
        """A claim or beat: the newest token wins; a beat of the holder refreshes it."""
        holder = self._holders.get(device_id)
        if holder is not None and token < holder.token:
            self.counters["stale"] += 1
            return
        before = self.holder(device_id)
        if holder is not None and (holder.replica, holder.token) == (replica, token):
            holder.heard_at = self.clock.seconds()
            holder.live = True
        else:
            self._holders[device_id] = _Holder(replica, token, self.clock.seconds())
        self._changed(device_id, before)

    def _changed(self, device_id: str, before: str | None) -> None:
        if self.hub is not None and self.holder(device_id) != before:
            self.hub.device_presence_changed(device_id)

    def _on_devices(self, text: str) -> None:
        message = json.loads(text)
        kind, replica = message["k"], message["o"]
        if replica == self.me:
            return
        if kind == "claim":
            self._heard(message["d"], replica, int(message["t"]))
        elif kind == "beat":
            for device_id, token in message["d"].items():
                self._heard(device_id, replica, int(token))
        elif kind == "gone":
            device_id = message["d"]
            holder = self._holders.get(device_id)
            if holder is not None and (holder.replica, holder.token) == (replica, message["t"]):
                before = self.holder(device_id)
                holder.live = False
                self._changed(device_id, before)

    def _heard(self, device_id: str, replica: str, token: int) -> None:
        self._seen(device_id, replica, token)
        claim = self._local.get(device_id)
        if claim is not None and claim.token is not None and token > claim.token:
            self._superseded(device_id)

    def _on_command(self, text: str) -> None:
        message = json.loads(text)
        if self.hub is None:
            return
        command = UpstreamCommand(
            message["d"], message["p"], message["u"], message["id"], message["ts"]
        )
        self.hub.submit_remote_command(message["o"], command)

    # --------------------------------------------------------- liveness

    def tick(self) -> None:
        """Beat for our devices, claim what is unclaimed, expire silent holders."""
        if self.bus.up:
            for device_id, claim in list(self._local.items()):
                if claim.token is None:
                    self._ask(device_id, claim)
            mine = {d: c.token for d, c in self._local.items() if c.token is not None}
            if mine:
                self.bus.publish("devices", _dumps({"k": "beat", "o": self.me, "d": mine}))
        now = self.clock.seconds()
        for device_id, holder in list(self._holders.items()):
            if holder.live and holder.replica != self.me and now - holder.heard_at > self.ttl:
                holder.live = False
                self.counters["expired"] += 1
                log.warn(
                    "no word from replica {r} for {s:g} s: its device client is offline here",
                    r=holder.replica,
                    s=self.ttl,
                )
                if self.hub is not None:
                    self.hub.device_presence_changed(device_id)

    def _bus_changed(self, up: bool) -> None:
        # Down: holders elsewhere can no longer be reached (holder() says None).
        # Up: claim what waited and beat at once, so others see us within a round trip.
        if self.hub is not None:
            for device_id in list(self._holders):
                if self._holders[device_id].replica != self.me:
                    self.hub.device_presence_changed(device_id)
        if up and self.running:
            self.tick()

    # --------------------------------------------------------- service

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        # Say goodbye, so other replicas need not wait for the TTL.
        for device_id in list(self._local):
            self.release(device_id)
