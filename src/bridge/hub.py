"""Devices, subscriptions, history, commands: the live state of one bridge.

The hub is plain Python driven by the reactor's clock.  A status is encoded
once into a :class:`~bridge.protocol.Dispatch` and handed to every
subscribed session; each session only appends its own sequence number.
Persistence and audit go through an :class:`IRecorder` so that the hub never
waits on a database.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from bridge import protocol
from bridge.metrics import LATENCY_BUCKETS, Histogram
from bridge.session import Session, State
from bridge.upstream import IUpstream, IUpstreamListener, UpstreamCommand

log = Logger()

#: A leader's (or a device client holder's) statuses take ordinals from
#: ``fencing token << ORDINAL_TERM_BITS`` on, above every earlier term's.
ORDINAL_TERM_BITS = 32


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    name: str
    kind: str
    history_size: int = 50
    command_timeout: float = 5.0
    public: bool = False
    # Driven by its own device client (a key), not by the upstream.
    client: bool = False


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    payload: Any
    ts: int
    by: str | None
    command_id: str | None = None
    # The status's ordinal in its device's history: increasing by at least one
    # per status, the same on every replica, kept in the database. Snapshots
    # of sessions record the last one a session got (see bridge.snapshots).
    n: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"payload": self.payload, "ts": self.ts, "by": self.by}


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command's life for the audit log: written at ``sent``, then finished."""

    command_id: str
    client_id: str
    device_id: str
    user_id: int | None
    username: str | None
    payload: Any
    result: str
    detail: str = ""
    remote_addr: str | None = None


class IRecorder(Interface):
    """Where the hub leaves what must outlive the process."""

    def status(device_id: str, entry: HistoryEntry, payload_json: bytes) -> None:
        """Keep a status in the device's persisted history (payload already JSON)."""

    def command(record: CommandRecord) -> None:
        """Write (result ``sent``) or finish (any other result) a command's audit entry."""


@implementer(IRecorder)
class NullRecorder:
    def status(self, device_id: str, entry: HistoryEntry, payload_json: bytes) -> None:
        pass

    def command(self, record: CommandRecord) -> None:
        pass


class Bus(Protocol):
    """What the hub tells the other replicas (``bridge.leader.ClusterUpstream``).

    Without a bus the hub is a whole bridge on its own; with one, statuses it
    accepted reach the other replicas' viewers and commands that other
    replicas forwarded get their results sent back.
    """

    @property
    def command_grace(self) -> float:
        """Extra seconds a forwarded command waits for the leader's answer."""
        ...

    def publish_status(self, device_id: str, entry: HistoryEntry, payload_json: bytes) -> None:
        """A status this replica accepted, for the other replicas' viewers."""

    def command_result(self, origin: str, command_id: str, result: str, detail: str) -> None:
        """The end of a command that the replica ``origin`` forwarded here."""


class Presence(Protocol):
    """Where the device clients of other replicas are (``bridge.presence``)."""

    @property
    def command_grace(self) -> float:
        """Extra seconds a command sent to another replica's client waits for its answer."""
        ...

    def claim(self, device_id: str) -> None:
        """A client for the device identified here."""

    def release(self, device_id: str) -> None:
        """This replica's client for the device went away."""

    def holder(self, device_id: str) -> str | None:
        """The other replica whose client drives the device, while it is alive."""

    def forward(self, command: UpstreamCommand) -> str | None:
        """Send a command to the holder's client: the replica it went to, or None."""

    def accepts_status(self, device_id: str, replica: str) -> bool:
        """Whether a status for the device from ``replica`` is from its current client."""


@dataclass(eq=False)
class _Pending:
    record: CommandRecord
    # None: another replica's command; its results go back to ``origin``.
    session: Session | None
    started: float = 0.0
    timer: IDelayedCall | None = None
    origin: str | None = None
    # The replica whose device client it was forwarded to (None: sent from here).
    via: str | None = None


@dataclass(eq=False)
class DeviceState:
    config: DeviceConfig
    history: deque[HistoryEntry]
    online: bool = False
    subscribers: set[Session] = field(default_factory=set)
    pending: deque[_Pending] = field(default_factory=deque)
    # The highest ordinal this device's statuses reached, and the lowest the
    # next one this replica accepts may take (set by a device client's claim).
    last_n: int = 0
    ordinal_floor: int = 0
    # Restored sessions that already have this device's statuses up to an
    # ordinal this replica has not reached yet: they join ``subscribers``
    # with the first newer status (see Hub.restore).
    ahead: dict[Session, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.last_n = max((e.n for e in self.history), default=0)

    def resize(self, size: int) -> None:
        if size != self.history.maxlen:
            self.history = deque(self.history, maxlen=size)


def now_ms(clock: IReactorTime) -> int:
    return int(clock.seconds() * 1000)


@implementer(IUpstreamListener)
class Hub:
    def __init__(
        self,
        clock: IReactorTime,
        upstream: IUpstream | None = None,
        recorder: IRecorder | None = None,
    ) -> None:
        self.clock = clock
        self.upstream = upstream
        self.recorder: IRecorder = recorder or NullRecorder()
        self.devices: dict[str, DeviceState] = {}
        self.sessions: dict[str, Session] = {}
        self.counters: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        # Device clients by the device they drive (spec role "device").
        self.device_clients: dict[str, Session] = {}
        # Registered sessions by user, for per-user limits.
        self._by_user: dict[int, set[Session]] = {}
        # Seconds from COMMAND to its confirmation, for /metrics.
        self.confirm_seconds = Histogram(LATENCY_BUCKETS)
        # The other replicas, when there are any (``--redis``).
        self.bus: Bus | None = None
        # The lowest ordinal the next accepted status may take: a new leader
        # sets it from its fencing token, so its statuses number above any
        # that an older leader gave out, even ones this replica never saw.
        self.ordinal_floor = 0
        # Commands of restored sessions, which this replica never sent: a
        # status carrying their command_id confirms them (see adopt_commands).
        self._adopted: dict[str, _Pending] = {}
        # Device clients connected to other replicas (``--redis``).
        self.presence: Presence | None = None
        if upstream is not None:
            upstream.attach(self)

    # ------------------------------------------------------------ devices

    def _upstream_online(self) -> bool:
        return bool(self.upstream is not None and self.upstream.available)

    def _local_client(self, device_id: str) -> Session | None:
        """The device's client on this replica, while it is connected and identified."""
        client = self.device_clients.get(device_id)
        if client is None or client.link is None or client.state is not State.READY:
            return None
        return client

    def _backed_online(self, config: DeviceConfig) -> bool:
        if config.client:
            if self._local_client(config.id) is not None:
                return True
            return self.presence is not None and self.presence.holder(config.id) is not None
        return self._upstream_online()

    def set_device(self, config: DeviceConfig, history: Iterable[HistoryEntry] = ()) -> None:
        """Add a device or apply a changed configuration, keeping its history."""
        state = self.devices.get(config.id)
        if state is None:
            self.devices[config.id] = DeviceState(
                config, deque(history, maxlen=config.history_size), self._backed_online(config)
            )
            return
        state.config = config
        state.resize(config.history_size)
        self._set_online(config.id, state, self._backed_online(config))

    def device_disabled(self, device_id: str) -> None:
        """Disabled at runtime: subscribers see it go offline before it leaves (spec §4)."""
        state = self.devices.get(device_id)
        if state is not None:
            self._set_online(device_id, state, False)

    def remove_device(self, device_id: str) -> None:
        """Deleted or disabled: subscribers have been told by their grants."""
        state = self.devices.pop(device_id, None)
        if state is None:
            return
        for session in [*state.subscribers, *state.ahead]:
            session.subscriptions.discard(device_id)
        for pending in list(state.pending):
            self._finish(pending, "rejected", "device removed")

    def is_online(self, device_id: str) -> bool:
        state = self.devices.get(device_id)
        return state is not None and state.online

    def history(self, device_id: str) -> list[dict[str, Any]]:
        state = self.devices.get(device_id)
        return [entry.to_json() for entry in state.history] if state else []

    # ------------------------------------------------------ subscriptions

    def subscribe(self, session: Session, devices: Iterable[str], history: bool) -> None:
        for device_id in devices:
            state = self.devices.get(device_id)
            if state is not None:
                state.ahead.pop(session, None)
                state.subscribers.add(session)
            session.subscribed(device_id, self.history(device_id) if history else None)

    def unsubscribe(self, session: Session, devices: Iterable[str]) -> None:
        for device_id in devices:
            state = self.devices.get(device_id)
            if state is not None:
                state.subscribers.discard(session)
                state.ahead.pop(session, None)
            session.unsubscribed(device_id)

    def drop_subscriptions(self, session: Session, devices: Iterable[str]) -> None:
        """Take a session out of the hub without telling it (it was told already)."""
        for device_id in devices:
            state = self.devices.get(device_id)
            if state is not None:
                state.subscribers.discard(session)
                state.ahead.pop(session, None)

    def forget(self, session: Session) -> None:
        """The session is gone for good."""
        self.drop_subscriptions(session, session.subscriptions)
        identity = session.identity
        if identity is not None and identity.device_id is not None:
            self.device_client_detached(session)
            if self.device_clients.get(identity.device_id) is session:
                del self.device_clients[identity.device_id]
        if identity is not None and identity.user_id is not None:
            mine = self._by_user.get(identity.user_id)
            if mine is not None:
                mine.discard(session)
                if not mine:
                    del self._by_user[identity.user_id]
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    def register(self, session: Session) -> None:
        self.sessions[session.session_id] = session
        if session.identity is not None and session.identity.user_id is not None:
            self._by_user.setdefault(session.identity.user_id, set()).add(session)

    def sessions_of_user(self, user_id: int) -> set[Session]:
        """A user's registered sessions, without scanning everyone's."""
        return self._by_user.get(user_id, set())

    def expire_sessions(self, now: float) -> None:
        for session in [s for s in self.sessions.values() if s.expired(now)]:
            self.forget(session)

    # ----------------------------------------------------------- statuses

    def publish_status(
        self,
        device_id: str,
        payload: Any,
        by: str | None = None,
        command_id: str | None = None,
    ) -> bool:
        """Record a device's new state and send it to its subscribers."""
        state = self.devices.get(device_id)
        if state is None:
            self.counters["statuses_unknown_device"] += 1
            return False
        try:
            # Encoded once: for every viewer's frame, the database row and the
            # bus. Strict JSON: NaN and Infinity are refused here, not sent.
            payload_json = protocol.dumps(payload)
        except (TypeError, ValueError):
            self.counters["statuses_invalid"] += 1
            return False
        n = max(state.last_n + 1, self.ordinal_floor, state.ordinal_floor)
        entry = HistoryEntry(payload, now_ms(self.clock), by, command_id, n)
        self.recorder.status(device_id, entry, payload_json)
        if self.bus is not None:
            self.bus.publish_status(device_id, entry, payload_json)
        self._fan_out(device_id, state, entry, payload_json)
        self.counters["statuses"] += 1
        return True

    def apply_remote_status(
        self, device_id: str, entry: HistoryEntry, payload_json: bytes | None = None
    ) -> bool:
        """A status another replica accepted (and persists): history and viewers only.

        ``payload_json``: the payload as the other replica encoded it, if at hand.
        """
        state = self.devices.get(device_id)
        if state is None:
            self.counters["statuses_unknown_device"] += 1
            return False
        if entry.n <= 0:
            # From a replica that numbers nothing (an older version): number it here.
            entry = dataclasses.replace(entry, n=state.last_n + 1)
        if payload_json is None:
            payload_json = protocol.dumps(entry.payload)
        self._fan_out(device_id, state, entry, payload_json)
        self.counters["statuses_remote"] += 1
        return True

    def _fan_out(
        self, device_id: str, state: DeviceState, entry: HistoryEntry, payload_json: bytes
    ) -> None:
        state.history.append(entry)
        if entry.n > state.last_n:
            state.last_n = entry.n
        dispatch = protocol.status_dispatch(
            device_id,
            protocol.status_body_json(
                device_id, payload_json, entry.ts, entry.by, entry.command_id
            ),
            entry.n,
        )
        if state.ahead:
            self._catch_up(state, entry.n)
        for session in state.subscribers:
            session.push(dispatch)
        self.counters["deliveries"] += len(state.subscribers)
        if self._adopted and entry.command_id in self._adopted:
            adopted = self._adopted[entry.command_id]
            if adopted.record.device_id == device_id:
                self._finish(adopted, "confirmed", "")

    def _catch_up(self, state: DeviceState, n: int) -> None:
        """Restored sessions whose last status of this device is older than ``n`` join."""
        for session, have in list(state.ahead.items()):
            if session.state is State.CLOSED:
                del state.ahead[session]
            elif have < n:
                del state.ahead[session]
                state.subscribers.add(session)

    def upstream_status(self, device_id: str, payload: Any, command_id: str | None) -> None:
        state = self.devices.get(device_id)
        if state is None:
            self.counters["statuses_unknown_device"] += 1
            return
        pending = self._pending.get(command_id) if command_id else None
        if pending is not None and pending.record.device_id != device_id:
            pending = None
        if pending is None and command_id is None and state.pending:
            # The flow dropped command_id: the first status confirms the oldest.
            pending = state.pending[0]
        if pending is None:
            self.publish_status(device_id, payload)
            return
        record = pending.record
        if self.publish_status(device_id, payload, record.username, record.command_id):
            self._finish(pending, "confirmed", "")

    def upstream_state(self, online: bool) -> None:
        for device_id, state in self.devices.items():
            if state.config.client:
                continue
            self._set_online(device_id, state, online)
            if not online:
                for pending in list(state.pending):
                    self._finish(pending, "upstream_unavailable", "link to the upstream lost")

    def _set_online(self, device_id: str, state: DeviceState, online: bool) -> None:
        if state.online == online:
            return
        state.online = online
        dispatch = protocol.event_dispatch(
            "DEVICE_STATE", {"device": device_id, "online": online}, device_id
        )
        for session in [*state.subscribers, *state.ahead]:
            session.push(dispatch)

    # ----------------------------------------------------------- commands

    def submit_command(
        self, session: Session, command: protocol.Command, remote_addr: str | None = None
    ) -> str:
        """Send a permitted command on; its results go to ``session``."""
        identity = session.identity
        assert identity is not None
        command_id = str(uuid.uuid4())
        record = CommandRecord(
            command_id=command_id,
            client_id=command.id,
            device_id=command.device,
            user_id=identity.user_id,
            username=identity.username,
            payload=command.payload,
            result="sent",
            remote_addr=remote_addr,
        )
        pending = _Pending(record, session, self.clock.seconds())
        self._result(pending, "sent", "")
        self.recorder.command(record)
        self.counters["commands"] += 1
        state = self.devices.get(command.device)
        if state is None:
            self._finish(pending, "rejected", "unknown device")
            return command_id
        if not protocol.is_json_safe(command.payload):
            self._finish(pending, "rejected", "payload is not strict JSON")
            return command_id
        upstream_command = UpstreamCommand(
            command.device, command.payload, identity.username, command_id, now_ms(self.clock)
        )
        if not state.online or not self._deliver(state.config, upstream_command, pending):
            self._finish(pending, "upstream_unavailable", "the device is offline")
            return command_id
        timeout = state.config.command_timeout
        # Forwarded to the leader or to the replica of the device's client,
        # which times it out and answers; this timer only covers a replica
        # that dies with the command.
        if pending.via is not None and self.presence is not None:
            timeout += self.presence.command_grace
        elif self.bus is not None and not state.config.client:
            timeout += self.bus.command_grace
        self._track(state, pending, timeout)
        return command_id

    def _track(self, state: DeviceState, pending: _Pending, timeout: float) -> None:
        command_id = pending.record.command_id
        state.pending.append(pending)
        self._pending[command_id] = pending
        pending.timer = self.clock.callLater(timeout, self._timeout, command_id)

    def submit_remote_command(self, origin: str, command: UpstreamCommand) -> None:
        """Another replica's command, here because this replica holds the upstream.

        The origin replica audits it and tells its session; this side sends it
        on, confirms or times it out, and sends the result back to ``origin``.
        """
        record = CommandRecord(
            command_id=command.command_id,
            client_id="",
            device_id=command.device_id,
            user_id=None,
            username=command.user,
            payload=command.payload,
            result="sent",
        )
        pending = _Pending(record, None, self.clock.seconds(), origin=origin)
        self.counters["commands_forwarded"] += 1
        state = self.devices.get(command.device_id)
        if state is None:
            self._finish(pending, "rejected", "unknown device")
        elif not state.online or not self._deliver(state.config, command, pending, forward=False):
            self._finish(pending, "upstream_unavailable", "the device is offline")
        else:
            self._track(state, pending, state.config.command_timeout)

    def remote_command_result(self, command_id: str, result: str, detail: str) -> None:
        """The leader's answer to a command this replica forwarded.

        If the command's session has since moved to another replica, the
        answer is passed on there (``origin``).
        """
        pending = self._pending.get(command_id)
        if pending is not None and (pending.session is not None or pending.origin is not None):
            self._finish(pending, result, detail)

    def _deliver(
        self,
        config: DeviceConfig,
        command: UpstreamCommand,
        pending: _Pending,
        forward: bool = True,
    ) -> bool:
        if not config.client:
            return self.upstream is not None and self.upstream.send_command(command)
        client = self._local_client(config.id)
        if client is not None and client.link is not None:
            client.link.write(
                protocol.command_frame(command.device_id, command.payload, command.command_id)
            )
            return True
        if not forward or self.presence is None:
            # A command forwarded here goes no further: one hop, exactly once.
            return False
        pending.via = self.presence.forward(command)
        return pending.via is not None

    # ------------------------------------------------------ device clients

    def device_client_attached(self, session: Session) -> None:
        """A device client identified or resumed: its device is online."""
        identity = session.identity
        assert identity is not None and identity.device_id is not None
        previous = self.device_clients.get(identity.device_id)
        self.device_clients[identity.device_id] = session
        if self.presence is not None:
            self.presence.claim(identity.device_id)
        state = self.devices.get(identity.device_id)
        if state is not None and state.config.client:
            self._set_online(identity.device_id, state, True)
        if previous is not None and previous is not session and previous.link is not None:
            previous.link.execute(previous.revoke("another client took over this device"))

    def device_client_detached(self, session: Session) -> None:
        """Its connection dropped: its commands end; offline unless held elsewhere."""
        identity = session.identity
        if identity is None or identity.device_id is None:
            return
        device_id = identity.device_id
        if self.device_clients.get(device_id) is not session:
            return
        if self.presence is not None:
            self.presence.release(device_id)
        state = self.devices.get(device_id)
        if state is not None and state.config.client:
            self._set_online(device_id, state, self._backed_online(state.config))
            for pending in list(state.pending):
                if pending.via is None or not state.online:
                    self._finish(pending, "upstream_unavailable", "the device client went away")

    def device_client_superseded(self, device_id: str) -> None:
        """A newer client for the device identified on another replica: close ours (4011)."""
        client = self._local_client(device_id)
        if client is None or client.link is None:
            return
        client.link.execute(client.revoke("another client took over this device"))
        state = self.devices.get(device_id)
        if state is not None and state.config.client:
            self._set_online(device_id, state, self._backed_online(state.config))
            # What it was sent will never be confirmed: the new client never saw it.
            for pending in list(state.pending):
                if pending.via is None:
                    self._finish(pending, "upstream_unavailable", "another client took over")

    def device_presence_changed(self, device_id: str) -> None:
        """Another replica's client for the device came, moved or went."""
        state = self.devices.get(device_id)
        if state is None or not state.config.client:
            return
        self._set_online(device_id, state, self._backed_online(state.config))
        holder = self.presence.holder(device_id) if self.presence is not None else None
        for pending in list(state.pending):
            if not state.online or (pending.via is not None and pending.via != holder):
                self._finish(pending, "upstream_unavailable", "the device client went away")

    def _timeout(self, command_id: str) -> None:
        pending = self._pending.get(command_id)
        if pending is not None:
            pending.timer = None
            self._finish(pending, "timeout", "no confirmation from the device in time")

    def _result(self, pending: _Pending, result: str, detail: str) -> None:
        record = pending.record
        if pending.origin is not None and self.bus is not None:
            self.bus.command_result(pending.origin, record.command_id, result, detail)
        if pending.session is None or pending.session.state is State.CLOSED:
            return
        pending.session.event(
            "COMMAND_RESULT",
            {
                "id": record.client_id,
                "command_id": record.command_id,
                "device": record.device_id,
                "result": result,
                "detail": detail,
            },
            record.device_id,
        )

    def _finish(self, pending: _Pending, result: str, detail: str) -> None:
        record = pending.record
        self._pending.pop(record.command_id, None)
        if self._adopted.get(record.command_id) is pending:
            del self._adopted[record.command_id]
        state = self.devices.get(record.device_id)
        if state is not None and pending in state.pending:
            state.pending.remove(pending)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        self._result(pending, result, detail)
        if pending.session is None:
            # Counted, timed and audited by the replica it came from.
            self.counters[f"commands_forwarded_{result}"] += 1
            return
        self.counters[f"commands_{result}"] += 1
        if result == "confirmed":
            self.confirm_seconds.observe(self.clock.seconds() - pending.started)
        self.recorder.command(dataclasses.replace(record, result=result, detail=detail))

    # ------------------------------------------- sessions moving between processes

    def commands_of(self, session: Session) -> list[tuple[CommandRecord, float]]:
        """The session's commands still waiting for a result, with seconds left."""
        return self.commands_by_session().get(session, [])

    def commands_by_session(self) -> dict[Session, list[tuple[CommandRecord, float]]]:
        """Every session's waiting commands at once (checkpoints need them all)."""
        now = self.clock.seconds()
        result: dict[Session, list[tuple[CommandRecord, float]]] = {}
        for p in self._pending.values():
            if p.session is not None:
                left = max(0.0, p.timer.getTime() - now) if p.timer is not None else 0.0
                result.setdefault(p.session, []).append((p.record, left))
        return result

    def hand_over(self, session: Session, origin: str | None) -> None:
        """The session moves to the replica ``origin``: its commands' results follow it."""
        for pending in list(self._pending.values()):
            if pending.session is session:
                pending.session = None
                pending.origin = origin
                if origin is None:
                    # Nowhere to send the result: the adopter times it out itself.
                    self._finish(pending, "timeout", "the session moved away")
        self.forget(session)

    def adopt_commands(
        self, session: Session, commands: Iterable[tuple[CommandRecord, float]]
    ) -> None:
        """Wait for the results of commands a restored session sent elsewhere.

        Either the replica that sent one passes its result on
        (``remote_command_result``), or a status carrying its command_id
        confirms it; with neither in time (plus the bus's grace) it times out.
        """
        grace = self.bus.command_grace if self.bus is not None else 0.0
        for record, remaining in commands:
            upstream_side = self._pending.get(record.command_id)
            if upstream_side is not None:
                # This replica sent it upstream for the session's old replica:
                # its result now goes to the session here too.
                if upstream_side.session is None:
                    upstream_side.session = session
                    upstream_side.record = record
                continue
            if any(e.command_id == record.command_id for e in self._history_of(record.device_id)):
                # Confirmed while the session was in transit: the status is in its replay.
                self._result(_Pending(record, session), "confirmed", "")
                self.recorder.command(dataclasses.replace(record, result="confirmed"))
                continue
            pending = _Pending(record, session, self.clock.seconds())
            self._pending[record.command_id] = pending
            self._adopted[record.command_id] = pending
            pending.timer = self.clock.callLater(
                remaining + grace, self._timeout, record.command_id
            )

    def _history_of(self, device_id: str) -> Iterable[HistoryEntry]:
        state = self.devices.get(device_id)
        return state.history if state is not None else ()

    def restore(
        self,
        session: Session,
        cursors: dict[str, int],
        online: dict[str, bool] | None,
    ) -> None:
        """Register a session taken over from a snapshot, and bring it up to date.

        ``cursors`` holds, per subscribed device, the ordinal of the last
        status the session had; every newer status this replica holds is
        pushed to it now, oldest first across devices, so that nothing
        history still holds is missed. Where the snapshot was taken ahead of
        this replica, the session waits (``DeviceState.ahead``) instead of
        getting statuses twice. ``online`` is what the session was last told
        of each device (None: not known, so every state is told again).
        """
        self.register(session)
        missed: list[tuple[int, int, str, HistoryEntry]] = []
        for device_id in sorted(session.subscriptions):
            state = self.devices.get(device_id)
            if state is None:
                continue
            have = cursors.get(device_id, 0)
            if have > state.last_n:
                state.ahead[session] = have
            else:
                state.subscribers.add(session)
                missed.extend((e.ts, e.n, device_id, e) for e in state.history if e.n > have)
        for _, _, device_id, entry in sorted(missed, key=lambda m: (m[0], m[1])):
            body = protocol.status_body(
                device_id, entry.payload, entry.ts, entry.by, entry.command_id
            )
            session.push(protocol.status_dispatch(device_id, body, entry.n))
        # Then each device's state now, where it differs from what the session was told.
        for device_id in sorted(session.subscriptions):
            state = self.devices.get(device_id)
            if state is not None and (online is None or online.get(device_id) != state.online):
                session.event(
                    "DEVICE_STATE", {"device": device_id, "online": state.online}, device_id
                )

    # ------------------------------------------------------------- notify

    def notify(self, sessions: Iterable[Session], event: str, data: Any) -> None:
        dispatch = protocol.event_dispatch("NOTIFY", {"event": event, "data": data})
        for session in sessions:
            if session.state is State.READY:
                session.push(dispatch)
