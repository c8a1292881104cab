"""The per-connection state machine of protocol v1, with no I/O.

A :class:`Session` takes what the peer sent (and what the edge learned on its
behalf: who the peer is, what it may read) and returns :class:`Action` values
for the edge to carry out.  Every permission decision is made here, against a
cache of the identity's grants that the edge refreshes when grants change, so
a forbidden request is refused without touching the database.

A session outlives its connection for ``resume_window`` seconds; dispatches
keep being numbered and kept, so a RESUME replays exactly what was missed.
"""

from __future__ import annotations

import enum
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from bridge import protocol
from bridge.protocol import CloseCode, Dispatch, Op, ProtocolError


class Permission(enum.IntEnum):
    READ = 1
    CHANGE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Role(enum.Enum):
    OPERATOR = "operator"
    DEVICE = "device"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Identity:
    """Who is behind a connection, as established at IDENTIFY or handshake."""

    role: Role
    user_id: int | None = None
    username: str | None = None
    is_superuser: bool = False
    # Django's session auth hash when identified: a password change alters it.
    auth_hash: str | None = None
    # The Django session the credential came from: a logout revokes it.
    session_key: str | None = None
    device_id: str | None = None

    def same_principal(self, other: Identity) -> bool:
        return (self.role, self.user_id, self.device_id) == (
            other.role,
            other.user_id,
            other.device_id,
        )

    def user_json(self) -> dict[str, Any] | None:
        if self.user_id is None:
            return None
        return {"id": self.user_id, "username": self.username}


# One Identity object per distinct identity while any session holds it.
_identities: weakref.WeakValueDictionary[tuple[Any, ...], Identity] = weakref.WeakValueDictionary()


def interned(identity: Identity) -> Identity:
    """The Identity equal to ``identity`` that sessions already hold, if any.

    Every IDENTIFY loads a new one (with its own username and auth hash
    strings); the 50 sessions of a user need only one.
    """
    key = (
        identity.role,
        identity.user_id,
        identity.username,
        identity.is_superuser,
        identity.auth_hash,
        identity.session_key,
        identity.device_id,
    )
    found = _identities.get(key)
    if found is None:
        _identities[key] = found = identity
    return found


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One readable device as this identity sees it (READY and DEVICE_CHANGED)."""

    id: str
    name: str
    kind: str
    history_size: int
    permission: Permission

    def changed_json(self) -> dict[str, Any]:
        return {
            "device": self.id,
            "name": self.name,
            "kind": self.kind,
            "history_size": self.history_size,
            "permission": self.permission.label,
        }


Grants = Mapping[str, DeviceView]

_NO_GRANTS: Grants = MappingProxyType({})


def shared_grants(grants: Grants) -> Grants:
    """A read-only mapping of ``grants`` that sessions may hold without copying.

    The grants cache hands out ``MappingProxyType`` views of dicts nobody
    changes any more, so every session of a user holds the same one; anything
    else (a caller's own dict, which it may go on changing) is copied once.
    """
    if type(grants) is MappingProxyType:
        return grants
    return MappingProxyType(dict(grants))


class State(enum.Enum):
    AWAITING_IDENTITY = "awaiting identity"
    IDENTIFYING = "identifying"
    READY = "ready"
    CLOSED = "closed"


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    request: protocol.Identify


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    request: protocol.Resume


@dataclass(frozen=True, slots=True)
class SubscribeDevices:
    devices: tuple[str, ...]
    history: bool


@dataclass(frozen=True, slots=True)
class UnsubscribeDevices:
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    command: protocol.Command


@dataclass(frozen=True, slots=True)
class ReportStatus:
    status: protocol.Status


@dataclass(frozen=True, slots=True)
class AuditDenied:
    """A refused request, for the audit log."""

    action: str
    device: str | None
    detail: str
    payload: Any = None


Action = (
    Send
    | Close
    | Authenticate
    | ResumeRequested
    | SubscribeDevices
    | UnsubscribeDevices
    | SubmitCommand
    | ReportStatus
    | AuditDenied
)


class Link(Protocol):
    """The connection a session is attached to, as the session sees it."""

    def write(self, data: bytes) -> None: ...

    def execute(self, actions: list[Action]) -> None: ...

    def replaced(self) -> None:
        """The session moved to another connection: drop this one."""


@dataclass(frozen=True, slots=True)
class Limits:
    heartbeat_interval: float = 30.0
    identify_timeout: float = 10.0
    # Dispatches kept for RESUME: while attached, and while detached.
    replay_size: int = 1000
    resume_window: float = 60.0
    # Inbound frames: a token bucket; past it the connection is closed (4008).
    frames_per_second: float = 50.0
    frames_burst: int = 200
    # Slow viewers (spec §5a): while the connection cannot take more, at most
    # this many frames wait (one status per device, every event), for at most
    # this long; past either bound the connection is closed (4008).
    max_pending: int = 1000
    max_behind_seconds: float = 30.0


def _ready_device(v: DeviceView, online: bool) -> dict[str, Any]:
    return {
        "id": v.id,
        "name": v.name,
        "kind": v.kind,
        "permission": v.permission.label,
        "online": online,
        "history_size": v.history_size,
    }


# READY's start (everything before ``session_id``) per user, device list and
# online flags, most recent last: the sessions of one user hold one copy.
READY_STARTS_KEPT = 1024
_ready_starts: dict[tuple[Any, ...], bytes] = {}
# A replay buffer this short is a list, longer a deque (Session._kept).
SHORT_KEPT = 16
# SUBSCRIBED without history, per device and permission.
SUBSCRIBED_KEPT = 10_000
_subscribed: dict[tuple[str, Permission], Dispatch] = {}


@dataclass(eq=False)
class Session:
    """One protocol v1 session: auth state, grants, subscriptions and numbering."""

    session_id: str
    limits: Limits
    now: float
    state: State = State.AWAITING_IDENTITY
    identity: Identity | None = None
    # Read-only, and shared with the other sessions that got the same grants
    # (bridge.grants); update_grants() replaces it rather than change it.
    grants: Grants = field(default_factory=lambda: _NO_GRANTS)
    subscriptions: set[str] = field(default_factory=set)
    seq: int = 0
    # The connection, while one is attached.
    link: Link | None = None
    detached_at: float | None = None
    resumable: bool = True
    resume_refused: bool = False
    # READY came from the handshake's session cookie, and the client has sent
    # nothing but heartbeats since: a RESUME may still replace this session.
    cookie_ready: bool = False
    last_received: float = 0.0
    # Since when the connection has been unable to take more (None: it can).
    congested_since: float | None = None
    # Shared counters (slow_drops, slow_closes, rate_limited), if the edge keeps them.
    counters: Counter[str] | None = None
    # Whether a snapshot of this session may be taken over by another process
    # (WebSocket sessions; SSE streams resume by their own rules).
    portable: bool = True
    # Rebuilt from a checkpoint after its process died: what the client had
    # is known only roughly, so the replay may repeat statuses (RESUMED says so).
    recovered: bool = False
    # Bumped whenever identity or grants change, so a checkpoint writer can
    # tell when the rarely changing part of a snapshot must be written again.
    grants_version: int = 0
    _pending: dict[object, Dispatch] = field(default_factory=dict)
    _held: int = 0
    _tokens: float = 0.0
    _tokens_at: float = 0.0
    # The last dispatches, shared with every other session that got them; the
    # newest has number ``seq``, so numbers need not be stored. A list while
    # short (an idle session keeps READY and its SUBSCRIBEDs; an empty deque
    # alone costs 600 bytes), a deque of ``replay_size`` past SHORT_KEPT.
    _kept: list[Dispatch] | deque[Dispatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last_received = self.now
        self._tokens = float(self.limits.frames_burst)
        self._tokens_at = self.now

    # -------------------------------------------------------------- output

    def hello(self) -> bytes:
        return protocol.hello(int(self.limits.heartbeat_interval * 1000), self.session_id)

    def push(self, dispatch: Dispatch) -> None:
        """Number a STATUS or EVENT for this session and write or keep it."""
        if self.state is State.CLOSED:
            return
        if self.congested_since is not None and self.link is not None:
            self._hold(dispatch)
            return
        self.seq += 1
        kept = self._kept
        kept.append(dispatch)
        if type(kept) is list and len(kept) > min(SHORT_KEPT, self.limits.replay_size):
            self._keep_only(kept)  # past a short list's size: a bounded deque
        if self.link is not None:
            self.link.write(protocol.frame(dispatch, self.seq))

    # ------------------------------------------------------- slow viewers

    def _count(self, name: str) -> None:
        if self.counters is not None:
            self.counters[name] += 1

    def _hold(self, dispatch: Dispatch) -> None:
        """Keep a frame unnumbered until the connection drains (spec §5a).

        A STATUS replaces the older pending STATUS of its device (the newest
        is never dropped); events all wait, in order. Numbers are given when
        frames are written, so ``s`` stays gap-free.
        """
        key: object
        if dispatch[1] is not None and protocol.is_status(dispatch):
            key = dispatch[1]
            if self._pending.pop(key, None) is not None:
                self._count("slow_drops")
        else:
            self._held += 1
            key = self._held
        self._pending[key] = dispatch
        if len(self._pending) > self.limits.max_pending and self.link is not None:
            self._count("slow_closes")
            self.link.execute(self._fail(CloseCode.RATE_LIMITED, "too far behind"))

    def pause_output(self, now: float) -> None:
        """The connection's buffer is full: hold frames from now on."""
        if self.congested_since is None:
            self.congested_since = now

    def resume_output(self) -> None:
        """The connection drained: write what waited, in order, numbered now."""
        self.congested_since = None
        pending, self._pending = self._pending, {}
        for dispatch in pending.values():
            self.push(dispatch)

    def event(self, name: str, d: Any, device: str | None = None) -> None:
        self.push(protocol.event_dispatch(name, d, device))

    def _fail(self, code: CloseCode, message: str) -> list[Action]:
        """ERROR then close: the spec's answer to every refused frame."""
        if self.state is State.CLOSED:
            return []
        actions: list[Action] = []
        if self.link is not None:
            self.seq += 1
            error = protocol.event_dispatch("ERROR", {"code": int(code), "message": message})
            actions.append(Send(protocol.frame(error, self.seq)))
        actions.append(Close(int(code), message))
        self.state = State.CLOSED
        self.resumable = False
        return actions

    def fail(self, code: CloseCode, message: str) -> list[Action]:
        return self._fail(code, message)

    def _deny(
        self, action: str, device: str | None, detail: str, code: CloseCode, payload: Any = None
    ) -> list[Action]:
        audit: list[Action] = [AuditDenied(action, device, detail, payload)]
        return audit + self._fail(code, detail)

    # --------------------------------------------------------------- input

    def receive(self, data: bytes | str, now: float) -> list[Action]:
        """One text message from the peer."""
        if self.state is State.CLOSED:
            return []
        self.last_received = now
        self._tokens = min(
            float(self.limits.frames_burst),
            self._tokens + (now - self._tokens_at) * self.limits.frames_per_second,
        )
        self._tokens_at = now
        if self._tokens < 1.0:
            self._count("rate_limited")
            return self._deny("flood", None, "too many frames", CloseCode.RATE_LIMITED)
        self._tokens -= 1.0
        try:
            op, frame = protocol.decode_frame(data)
            refused = self._refused_in_this_state(op)
            if refused is not None:
                return refused
            message = protocol.decode_payload(op, frame)
        except ProtocolError as e:
            return self._fail(e.code, e.message)

        match message:
            case protocol.Heartbeat():
                return [Send(protocol.heartbeat_ack())]
            case protocol.HeartbeatAck():
                return []
            case protocol.ServerOnly(op=op):
                if self.state is not State.READY:
                    return self._not_ready(op)
                return self._fail(CloseCode.UNKNOWN_OP, f"op {int(op)} is sent by the server only")
            case protocol.Resume() if self.state is State.READY and self.cookie_ready:
                self.cookie_ready = False
                return [ResumeRequested(message)]
            case protocol.Identify():
                self.state = State.IDENTIFYING
                return [Authenticate(message)]
            case protocol.Resume():
                if self.resume_refused:
                    self.event("INVALID_SESSION", {})
                    return []
                self.state = State.IDENTIFYING
                return [ResumeRequested(message)]

        assert self.state is State.READY and self.identity is not None
        self.cookie_ready = False
        match message:
            case protocol.Subscribe(devices=devices, history=history):
                for device in devices:
                    if device not in self.grants:
                        return self._deny(
                            "subscribe",
                            device,
                            "no read permission for this device",
                            CloseCode.FORBIDDEN,
                        )
                # The device ids of the shared grants, not the ones just
                # decoded: every session's subscriptions hold the same strings.
                devices = tuple(self._device_id(device) for device in devices)
                self.subscriptions.update(devices)
                return [SubscribeDevices(devices, history)]
            case protocol.Unsubscribe(devices=devices):
                self.subscriptions.difference_update(devices)
                return [UnsubscribeDevices(devices)]
            case protocol.Command(device=device):
                if self.identity.role is Role.DEVICE:
                    return self._deny(
                        "command",
                        device,
                        "device clients do not send commands",
                        CloseCode.FORBIDDEN,
                        message.payload,
                    )
                view = self.grants.get(device)
                if view is None or view.permission < Permission.CHANGE:
                    return self._deny(
                        "command",
                        device,
                        "no change permission for this device",
                        CloseCode.FORBIDDEN,
                        message.payload,
                    )
                return [SubmitCommand(message)]
            case protocol.Status(device=device):
                if self.identity.role is not Role.DEVICE:
                    return self._deny(
                        "status",
                        device,
                        "only device clients send STATUS",
                        CloseCode.FORBIDDEN,
                        message.payload,
                    )
                if device != self.identity.device_id:
                    return self._deny(
                        "status",
                        device,
                        "a device client reports for its own device only",
                        CloseCode.FORBIDDEN,
                        message.payload,
                    )
                return [ReportStatus(message)]
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def _device_id(self, device: str) -> str:
        own = self.grants[device].id
        return own if own == device else device

    def _refused_in_this_state(self, op: Op) -> list[Action] | None:
        """The state check, made before the payload's shape is (docs/protocol.md).

        A SUBSCRIBE before READY is 4006 and a second IDENTIFY 4005 whatever
        they carry: a client learns what it did wrong first.
        """
        if op in (Op.HEARTBEAT, Op.HEARTBEAT_ACK, Op.HELLO, Op.EVENT):
            return None
        if op is Op.RESUME and self.state is State.READY and self.cookie_ready:
            return None
        if op in (Op.IDENTIFY, Op.RESUME):
            if self.state is not State.AWAITING_IDENTITY:
                return self._fail(CloseCode.ALREADY_AUTHENTICATED, "already identified")
            return None
        if self.state is not State.READY:
            return self._not_ready(op)
        return None

    def _not_ready(self, op: Op) -> list[Action]:
        return self._deny(
            "before_ready", None, f"op {int(op)} before READY", CloseCode.NOT_AUTHENTICATED
        )

    def too_large(self, size: int, limit: int) -> list[Action]:
        return self._fail(CloseCode.FRAME_TOO_LARGE, f"message of {size} bytes exceeds {limit}")

    def binary(self) -> list[Action]:
        return self._fail(CloseCode.DECODE_ERROR, "frames are UTF-8 JSON text messages")

    # ----------------------------------------------------- edge's answers

    def identified(
        self,
        identity: Identity,
        grants: Grants,
        online: Callable[[str], bool],
        by_cookie: bool = False,
    ) -> list[Action]:
        """The credential checked out: send READY."""
        if self.state is State.CLOSED:
            return []
        self.cookie_ready = by_cookie
        self.identity = interned(identity)
        self.grants = shared_grants(grants)
        self.grants_version += 1
        self.state = State.READY
        self.push(self._ready(online))
        return []

    def identify_failed(self, message: str) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._deny("identify", None, message, CloseCode.AUTHENTICATION_FAILED)

    def resume_failed(self) -> list[Action]:
        """Unknown, expired or foreign session: the client must IDENTIFY.

        A connection already READY through its session cookie stays READY:
        the client SUBSCRIBEs again on it.
        """
        if self.state is State.CLOSED:
            return []
        if self.state is State.READY:
            self.event("INVALID_SESSION", {})
            return []
        self.state = State.AWAITING_IDENTITY
        self.resume_refused = True
        self.event("INVALID_SESSION", {})
        return []

    def subscribed(self, device: str, history: list[dict[str, Any]] | None) -> None:
        view = self.grants[device]
        if history:
            self.event(
                "SUBSCRIBED",
                {"device": device, "permission": view.permission.label, "history": history},
                device,
            )
            return
        # Without history it is the same frame for every session: one tuple.
        key = (device, view.permission)
        dispatch = _subscribed.get(key)
        if dispatch is None:
            if len(_subscribed) >= SUBSCRIBED_KEPT:
                _subscribed.clear()
            dispatch = _subscribed[key] = protocol.event_dispatch(
                "SUBSCRIBED",
                {"device": device, "permission": view.permission.label, "history": []},
                device,
            )
        self.push(dispatch)

    def unsubscribed(self, device: str) -> None:
        self.event("UNSUBSCRIBED", {"device": device}, device)

    def _ready(self, online: Callable[[str], bool]) -> Dispatch:
        """READY, its long start shared with the other sessions that got the same one."""
        assert self.identity is not None
        views = tuple(self.grants.values())
        flags = tuple(online(v.id) for v in views)
        key = (self.identity.user_id, self.identity.username, self.identity.role, views, flags)
        start = _ready_starts.get(key)
        if start is None:
            devices = [_ready_device(v, up) for v, up in zip(views, flags, strict=True)]
            start = protocol.ready_start(
                self.identity.user_json(), self.identity.role.value, devices
            )
            if len(_ready_starts) >= READY_STARTS_KEPT:
                del _ready_starts[next(iter(_ready_starts))]
            _ready_starts[key] = start
        return protocol.ready_dispatch(start, self.session_id)

    # ---------------------------------------------------- grants at runtime

    def update_grants(self, grants: Grants) -> list[str]:
        """New grants for a live (or detached) session.

        Pushes DEVICE_CHANGED for new or altered devices and DEVICE_REMOVED for
        devices no longer readable; returns the subscriptions dropped, which
        the edge takes out of the hub.
        """
        if self.state is not State.READY:
            return []
        dropped: list[str] = []
        self.grants_version += 1
        # Built as the old dict was changed in place (same order), then shared
        # again when it ends up equal, in order, to the new grants.
        mine = dict(self.grants)
        for device_id in list(mine):
            if device_id not in grants:
                del mine[device_id]
                if device_id in self.subscriptions:
                    self.subscriptions.discard(device_id)
                    dropped.append(device_id)
                self.event("DEVICE_REMOVED", {"device": device_id}, device_id)
        for device_id, view in grants.items():
            if mine.get(device_id) != view:
                mine[device_id] = view
                self.event("DEVICE_CHANGED", view.changed_json(), device_id)
        if list(mine.items()) == list(grants.items()):
            self.grants = shared_grants(grants)
        else:
            self.grants = MappingProxyType(mine)
        return dropped

    def revoke(self, message: str) -> list[Action]:
        """The identity itself is no longer valid (4011)."""
        if self.state is State.CLOSED:
            return []
        if self.link is None:
            self.state = State.CLOSED
            self.resumable = False
            return []
        return self._fail(CloseCode.IDENTITY_REVOKED, message)

    # ------------------------------------------------------ timeouts, resume

    def check_timeouts(self, now: float) -> list[Action]:
        """Heartbeat and IDENTIFY deadlines for an attached session."""
        if self.state is State.CLOSED or self.link is None:
            return []
        if (
            self.congested_since is not None
            and now - self.congested_since > self.limits.max_behind_seconds
        ):
            self._count("slow_closes")
            return self._fail(CloseCode.RATE_LIMITED, "too far behind")
        silent = now - self.last_received
        if silent > 2 * self.limits.heartbeat_interval:
            return self._fail(CloseCode.HEARTBEAT_TIMEOUT, "no heartbeat")
        if self.state is not State.READY and silent > self.limits.identify_timeout:
            return self._fail(CloseCode.NOT_AUTHENTICATED, "no IDENTIFY in time")
        return []

    def attach(self, link: Link, now: float) -> None:
        self.link = link
        self.detached_at = None
        self.last_received = now

    def detach(self, now: float) -> None:
        self.link = None
        self.detached_at = now
        # What waited for the old connection is kept for RESUME like the rest.
        self.congested_since = None
        pending, self._pending = self._pending, {}
        for dispatch in pending.values():
            self.push(dispatch)
        if self.state is not State.READY:
            self.state = State.CLOSED
            self.resumable = False

    def expired(self, now: float) -> bool:
        if self.state is State.CLOSED or not self.resumable:
            return self.link is None
        return self.detached_at is not None and now - self.detached_at > self.limits.resume_window

    def held_ordinals(self) -> dict[str, int]:
        """Per device, the ordinal of the STATUS held back for a slow connection."""
        return {
            key: dispatch[2]
            for key, dispatch in self._pending.items()
            if isinstance(key, str) and dispatch[2]
        }

    def kept(self) -> list[Dispatch]:
        """The dispatches held for RESUME, oldest first; the last one is number ``seq``."""
        return list(self._kept)

    @classmethod
    def restored(
        cls,
        session_id: str,
        limits: Limits,
        now: float,
        identity: Identity,
        grants: Grants,
        subscriptions: set[str],
        seq: int,
        kept: list[Dispatch],
        detached_for: float,
        recovered: bool = False,
    ) -> Session:
        """A session taken over from a snapshot: READY, detached, waiting for RESUME.

        ``kept`` ends with dispatch number ``seq``; a recovered session keeps
        nothing and starts numbering after the client's own last ``s``.
        """
        session = cls(session_id, limits, now, identity=interned(identity), recovered=recovered)
        session.state = State.READY
        session.grants = shared_grants(grants)
        session.subscriptions = set(subscriptions)
        session.seq = seq
        session._keep_only(kept)
        session.link = None
        session.detached_at = now - detached_for
        return session

    def _keep_only(self, dispatches: list[Dispatch]) -> None:
        """Replace the replay buffer (the last ``replay_size`` of ``dispatches``)."""
        size = self.limits.replay_size
        if len(dispatches) > min(SHORT_KEPT, size):
            self._kept = deque(dispatches, maxlen=size)
        else:
            self._kept = list(dispatches)

    def can_replay_from(self, seq: int) -> bool:
        """Whether every dispatch after ``seq`` is still held."""
        return seq + 1 >= self.seq - len(self._kept) + 1

    def resume(
        self,
        seq: int,
        identity: Identity,
        grants: Grants,
        link: Link,
        now: float,
    ) -> tuple[list[bytes], list[str]]:
        """Take over a new connection and replay what it missed.

        The caller has checked the identity and that ``seq`` is in range.
        Returns the frames to write, in order (ending with RESUMED), and the
        subscriptions dropped because their device is no longer readable.
        """
        self.identity = interned(identity)
        first = self.seq - len(self._kept) + 1
        had = [dispatch for n, dispatch in enumerate(self._kept, first) if n <= seq]
        # A device no longer readable is not replayed, except for its
        # DEVICE_REMOVED. What is withheld leaves the buffer, and the numbers
        # after it close up, so ``s`` still goes up by one (spec §2).
        shown = [
            dispatch
            for n, dispatch in enumerate(self._kept, first)
            if n > seq
            and (
                dispatch[1] is None
                or dispatch[1] in grants
                or protocol.is_event(dispatch, "DEVICE_REMOVED")
            )
        ]
        self._keep_only(had + shown)
        self.seq = seq + len(shown)
        replay = [protocol.frame(dispatch, n) for n, dispatch in enumerate(shown, seq + 1)]
        collector = _Collector()
        self.link = collector
        dropped = self.update_grants(grants)
        resumed: dict[str, Any] = {"session_id": self.session_id, "replayed": len(replay)}
        if self.recovered:
            resumed["recovered"] = True
            self.recovered = False
        self.event("RESUMED", resumed)
        self.attach(link, now)
        collected = collector.frames
        return replay + collected, dropped


class _Collector:
    """Gathers the frames a resume produces, to write them after the replay."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def execute(self, actions: list[Action]) -> None:  # pragma: no cover - not used
        raise AssertionError(actions)

    def replaced(self) -> None:  # pragma: no cover - not used
        raise AssertionError("a resume's collector is never replaced")
