"""The WebSocket edge: Autobahn moves bytes, the Session decides.

Each connection owns a :class:`~bridge.session.Session` and carries out the
actions it returns: writing frames, closing, and the calls into identity,
permissions and the hub that need a Deferred or the hub's state.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from bridge import identity as identities
from bridge import permissions, protocol
from bridge.grants import GrantsCache
from bridge.hub import Hub
from bridge.metrics import LATENCY_BUCKETS, Histogram
from bridge.protocol import CloseCode
from bridge.session import (
    Action,
    AuditDenied,
    Authenticate,
    Close,
    Identity,
    Limits,
    ReportStatus,
    ResumeRequested,
    Role,
    Send,
    Session,
    State,
    SubmitCommand,
    SubscribeDevices,
    UnsubscribeDevices,
)
from bridge.store import AuditRecord, Store
from bridge.threads import PoolService, database_unavailable
from bridge.throttle import RateLimit, address_key, logins
from bridge.transport import Coalescer, Output, set_nodelay, text_frame
from bridge.vault import Vault

log = Logger()

DEVICE_KEY_PREFIX = "bdk_"


@dataclass(frozen=True)
class EdgeConfig:
    limits: Limits = field(default_factory=Limits)
    max_message_size: int = 64 * 1024
    allowed_origins: frozenset[str] = frozenset()
    secure: bool = False
    # Past this many open connections a handshake gets HTTP 503.
    max_connections: int = 20_000
    # Past this many live sessions of one user, IDENTIFY is refused with 4008.
    max_per_user: int = 100
    # New WebSocket and SSE connections per client address: a token bucket.
    connect_rate: float = 50.0
    connect_burst: int = 500
    # Seconds for the opening handshake (HTTP upgrade), then for the closing one.
    handshake_timeout: float = 10.0


def parse_path(path: str) -> tuple[bool, str | None]:
    """``/ws/`` or ``/ws/devices/<id>/``: (valid, device id)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts == ["ws"]:
        return True, None
    if len(parts) == 3 and parts[:2] == ["ws", "devices"] and protocol.is_device_id(parts[2]):
        return True, parts[2]
    return False, None


def origin_allowed(
    origin: str | None, host: str | None, secure: bool, allowed: frozenset[str]
) -> bool:
    """Same origin as the Host header, or listed; no Origin means no browser."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme != ("https" if secure else "http") or not host:
        return False
    default = "443" if secure else "80"
    want = host.lower() if ":" in host.rsplit("]", 1)[-1] else f"{host.lower()}:{default}"
    got = parts.netloc if parts.port else f"{parts.netloc}:{default}"
    return got == want


# What Autobahn's opening handshake leaves on a connection and never reads
# again once it is open: dropped at onOpen (the class's None stands in).
HANDSHAKE_ATTRS = (
    "http_request_data",
    "http_response_data",
    "http_headers",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
)
_NO_QUEUE: tuple[()] = ()


class BridgeServerProtocol(WebSocketServerProtocol):
    factory: BridgeWebSocketFactory
    session: Session
    # This connection's frames of the current turn (set at onOpen).
    _out: Output
    _oversize = False
    _replaced = False
    _by_cookie = False
    # Autobahn queues only chopped or synchronous sends (never ours): the
    # queue is made by sendData when one is first needed (see _connectionMade).
    send_queue: Any = _NO_QUEUE

    # ------------------------------------------------------------- memory

    def _connectionMade(self) -> None:
        super()._connectionMade()
        # The empty deque Autobahn made goes: the class's empty tuple reads as
        # an empty queue (len 0) until sendData makes a real one.
        if not self.__dict__.get("send_queue", True):
            del self.send_queue
        # Autobahn makes a UTF-8 validator for every connection; with
        # utf8validateIncoming off (EdgeConfig) it never uses it.
        if getattr(self, "utf8validateIncoming", True) is False:
            self.__dict__.pop("utf8validator", None)

    def onFrameEnd(self) -> bool | None:
        # The frame's unmasker stays until the next frame makes its own.
        result = super().onFrameEnd()
        if self.current_frame is None:
            self.__dict__.pop("current_frame_masker", None)
        return result

    def _forget_handshake(self) -> None:
        """Drop what only the opening handshake needed (request bytes, headers ...)."""
        attrs = self.__dict__
        for name in HANDSHAKE_ATTRS:
            attrs.pop(name, None)
        # Autobahn's description of the transport (peer, TLS channel id, the
        # peer's certificate) is for WAMP; nothing here reads it.
        if "_transport_details" in attrs:
            attrs["_transport_details"] = None

    # ------------------------------------------------------------ handshake

    def onConnect(self, request: ConnectionRequest) -> None:
        config = self.factory.config
        headers = request.headers
        if len(self.factory.connections) >= config.max_connections:
            raise ConnectionDeny(503, "the server is at its connection limit")
        peer = getattr(self.transport.getPeer(), "host", None) if self.transport else None
        wait = self.factory.connects.take(peer)
        if wait:
            self.factory.counters["connect_rate_limited"] += 1
            raise ConnectionDeny(
                429, f"too many new connections from this address; retry in {wait:.1f} s"
            )
        if not origin_allowed(
            headers.get("origin"), headers.get("host"), config.secure, config.allowed_origins
        ):
            log.warn("refused a WebSocket from origin {origin}", origin=headers.get("origin"))
            raise ConnectionDeny(403, "origin not allowed")
        valid, device = parse_path(request.path)
        if not valid:
            raise ConnectionDeny(404, "no such WebSocket endpoint")
        self.device_path = device
        self.remote = request.peer
        self.remote_host = peer
        self.cookie_key = identities.session_key_from_cookie_header(headers.get("cookie"))

    def onOpen(self) -> None:
        self._forget_handshake()
        set_nodelay(self.transport)
        self._out = self.factory.coalescer.output(self.transport)
        factory = self.factory
        self.opened_at = factory.now()
        self.session = Session(
            factory.vault.new_session_id(),
            factory.config.limits,
            factory.now(),
            counters=factory.counters,
        )
        self.session.attach(self, factory.now())
        # Back-pressure (spec §5a): the transport tells us when its buffer is
        # full. twisted.web's channel, whose transport this was, is still
        # registered there; it no longer reads from it.
        transport: Any = self.transport
        if transport is not None:
            transport.unregisterProducer()
            transport.registerProducer(self, True)
        factory.connections.add(self)
        self.write(self.session.hello())
        if self.cookie_key:
            self._by_cookie = True
            self.session.state = State.IDENTIFYING
            self._authenticate(
                self.factory.db.orm(identities.identity_from_session, self.cookie_key)
            )

    # ------------------------------------------------------------- messages

    def onMessageFrameBegin(self, length: int) -> None:
        limit = self.factory.config.max_message_size
        if self._oversize or self.message_data_total_length + length > limit:
            if not self._oversize:
                self._oversize = True
                self.execute(self.session.too_large(self.message_data_total_length + length, limit))
            return
        super().onMessageFrameBegin(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        if not self._oversize:
            super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if not self._oversize:
            super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        if not self._oversize:
            super().onMessageEnd()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.frames_in += 1
        if isBinary:
            self.execute(self.session.binary())
        else:
            self.execute(self.session.receive(payload, self.factory.now()))

    # ------------------------------------------------- IPushProducer

    def pauseProducing(self) -> None:
        self.session.pause_output(self.factory.now())

    def resumeProducing(self) -> None:
        if self.session.link is self:
            self.session.resume_output()

    def stopProducing(self) -> None:
        pass

    # ------------------------------------------------------------- Link

    def write(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN and self.transport is not None:
            self._out.write(text_frame(data))
            self.factory.frames_out += 1

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own frames (close, ping, pong) go behind this turn's frames.
        out: Output | None = getattr(self, "_out", None)  # None during the handshake
        if out is not None:
            out.flush()
        if (sync or chopsize) and self.send_queue is _NO_QUEUE:
            self.send_queue = deque()  # Autobahn queues only these
        super().sendData(data, sync, chopsize)

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Send(data=data):
                    self.write(data)
                case Close(code=code, reason=reason):
                    self.sendClose(int(code), reason)
                case AuditDenied():
                    self._audit(action)
                case Authenticate(request=request):
                    self._identify(request)
                case ResumeRequested(request=request):
                    self._resume(request)
                case SubscribeDevices(devices=devices, history=history):
                    self.factory.hub.subscribe(self.session, devices, history)
                case UnsubscribeDevices(devices=devices):
                    self.factory.hub.unsubscribe(self.session, devices)
                case SubmitCommand(command=command):
                    self.factory.hub.submit_command(self.session, command, self.remote)
                case ReportStatus(status=status):
                    self.factory.hub.upstream_status(
                        status.device, status.payload, status.command_id
                    )

    def _audit(self, denied: AuditDenied) -> None:
        who = self.session.identity
        self.factory.counters[f"denied_{denied.action}"] += 1
        log.warn(
            "denied {action} on {device} for {user} from {peer}: {detail}",
            action=denied.action,
            device=denied.device,
            user=who.username if who else None,
            peer=self.remote,
            detail=denied.detail,
        )
        self.factory.audit(
            AuditRecord(
                action=denied.action,
                user_id=who.user_id if who else None,
                username=who.username if who else None,
                device_id=denied.device,
                detail=denied.detail,
                payload=denied.payload,
                remote_addr=self.remote,
            )
        )

    # ------------------------------------------------------- identification

    def _identify(self, request: protocol.Identify) -> None:
        self._by_cookie = False
        if (request.token is not None or request.device_key is not None) and logins().retry_after(
            address_key(self.remote_host)
        ):
            self.execute(
                self.session.fail(CloseCode.RATE_LIMITED, "too many failed attempts; wait")
            )
            return
        if request.device_key is not None:
            self._authenticate(
                self.factory.db.orm(identities.identity_from_device_key, request.device_key)
            )
            return
        if request.anonymous:
            if not self.factory.anonymous():
                self.execute(self.session.identify_failed("anonymous access is disabled"))
                return
            self._authenticate_identity(Identity(Role.ANONYMOUS))
            return
        assert request.token is not None
        self._authenticate(self.factory.db.orm(identities.identity_from_token, request.token))

    def _authenticate(self, d: Any) -> None:
        d.addCallback(self._got_identity)
        d.addErrback(self._auth_error)

    def _authenticate_identity(self, identity: Identity) -> None:
        from twisted.internet.defer import succeed

        self._authenticate(succeed(identity))

    @inlineCallbacks
    def _got_identity(self, identity: Identity | None) -> Any:
        if identity is None:
            # A stale cookie: the client may still IDENTIFY.
            if self.session.state is State.IDENTIFYING:
                self.session.state = State.AWAITING_IDENTITY
            return
        grants = yield self.factory.grants.get(identity)
        if self.session.state is not State.IDENTIFYING:
            return
        if identity.user_id is not None and self._sessions_of(identity) >= (
            self.factory.config.max_per_user
        ):
            self.execute(
                self.session.fail(CloseCode.RATE_LIMITED, "too many connections for this user")
            )
            return
        self.execute(
            self.session.identified(
                identity, grants, self.factory.hub.is_online, by_cookie=self._by_cookie
            )
        )
        self.factory.identify_seconds.observe(self.factory.now() - self.opened_at)
        self.factory.hub.register(self.session)
        if identity.role is Role.DEVICE:
            self.factory.hub.device_client_attached(self.session)
        log.info(
            "{role} {user} identified from {peer}",
            role=identity.role.value,
            user=identity.username,
            peer=self.remote,
        )
        if self.device_path is not None:
            subscribe = protocol.dumps(
                {"op": protocol.Op.SUBSCRIBE, "d": {"devices": [self.device_path]}}
            )
            # The server's own SUBSCRIBE is not the client's first request: a
            # RESUME may still replace this cookie session.
            cookie_ready = self.session.cookie_ready
            self.execute(self.session.receive(subscribe, self.factory.now()))
            self.session.cookie_ready = cookie_ready and self.session.state is State.READY

    def _sessions_of(self, identity: Identity) -> int:
        assert identity.user_id is not None
        return sum(1 for s in self.factory.hub.sessions_of_user(identity.user_id) if s.link)

    def _auth_error(self, failure: Any) -> None:
        if failure.check(identities.AuthenticationFailed):
            logins().failed(address_key(self.remote_host))
            self.execute(self.session.identify_failed(str(failure.value)))
            return
        if not database_unavailable(failure):  # that, the pool logs once
            log.failure("authentication could not be checked", failure)
        self.execute(
            self.session.fail(CloseCode.UNKNOWN_ERROR, "authentication unavailable, try again")
        )

    # --------------------------------------------------------------- resume

    @inlineCallbacks
    def _resume(self, request: protocol.Resume) -> Any:
        hub, db = self.factory.hub, self.factory.db
        try:
            if request.token is not None and request.token.startswith(DEVICE_KEY_PREFIX):
                # Device clients have no tokens: their key stands in RESUME's token.
                identity = yield db.orm(identities.identity_from_device_key, request.token)
            elif request.token is not None:
                identity = yield db.orm(identities.identity_from_token, request.token)
            elif self.cookie_key:
                identity = yield db.orm(identities.identity_from_session, self.cookie_key)
            else:
                identity = None
        except identities.AuthenticationFailed as e:
            self.execute(self.session.identify_failed(str(e)))
            return
        except Exception as e:
            if not database_unavailable(e):  # that, the pool logs once
                log.failure("resume could not be checked")
            self.execute(self.session.fail(CloseCode.UNKNOWN_ERROR, "authentication unavailable"))
            return
        old = hub.sessions.get(request.session_id)
        if old is None and identity is not None:
            # Held by another process (a replica, or this one before a restart).
            old = yield self.factory.vault.claim(request.session_id, identity, request.seq)
            if self.session.state is State.CLOSED:
                return
        if (
            identity is None
            or old is None
            or old.identity is None
            or not old.identity.same_principal(identity)
            or old.state is not State.READY
        ):
            self.execute(self.session.resume_failed())
            return
        if request.seq > old.seq:
            self.execute(
                self.session.fail(CloseCode.INVALID_SEQUENCE, f"seq {request.seq} was never sent")
            )
            return
        if not old.can_replay_from(request.seq):
            self.execute(self.session.resume_failed())
            return
        grants = yield self.factory.grants.get(identity)
        fresh = self.session
        cookie_switch = fresh.state is State.READY and fresh is not old
        if not (fresh.state is State.IDENTIFYING or cookie_switch) or old.state is not State.READY:
            if fresh.state is State.IDENTIFYING:
                self.execute(fresh.resume_failed())
            return
        if cookie_switch:
            # The cookie's fresh session is replaced before it was ever used.
            hub.forget(fresh)
        previous = old.link
        if isinstance(previous, BridgeServerProtocol) and previous is not self:
            previous.replaced()
        frames, dropped = old.resume(request.seq, identity, grants, self, self.factory.now())
        hub.drop_subscriptions(old, dropped)
        self.session = old
        if identity.role is Role.DEVICE:
            hub.device_client_attached(old)
        for frame in frames:
            self.write(frame)
        log.info("session {sid} resumed from seq {seq}", sid=old.session_id, seq=request.seq)

    def replaced(self) -> None:
        """A RESUME elsewhere took this session over; drop this connection."""
        self._replaced = True
        self.session.detach(self.factory.now())
        self.dropConnection(abort=True)

    # ---------------------------------------------------------------- close

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        factory = self.factory
        factory.connections.discard(self)
        out: Output | None = getattr(self, "_out", None)
        if out is not None:
            out.discard()
        session = getattr(self, "session", None)
        if session is None or self._replaced or session.link is not self:
            return
        session.detach(factory.now())
        if session.state is not State.READY or not session.resumable:
            factory.hub.forget(session)
        elif session.identity is not None and session.identity.role is Role.DEVICE:
            factory.hub.device_client_detached(session)

    def check(self, now: float) -> None:
        if self.session.link is self:
            self.execute(self.session.check_timeouts(now))


for _name in (*HANDSHAKE_ATTRS, "utf8validator", "current_frame_masker"):
    setattr(BridgeServerProtocol, _name, None)


def _as_class_attr(value: Any) -> Any:
    """``value`` as a class attribute reads it on an instance (functions stay unbound)."""
    return staticmethod(value) if hasattr(type(value), "__get__") else value


class BridgeWebSocketResource(WebSocketResource):
    """Autobahn's resource, leaving no garbage cycle behind each upgrade.

    The upgraded request never finishes: twisted.web's channel keeps it in
    ``requests`` and it keeps the channel, a cycle (with the request's
    headers and the channel's buffer, ~1.5 KB) that only a full collection
    frees, and full collections are rare here (bridge.watchdog). Neither is
    used again once Autobahn has the transport, so the cycle is cut and both
    go at once.
    """

    def render(self, request: Any) -> Any:
        result = super().render(request)
        channel = getattr(request, "channel", None)
        requests = getattr(channel, "requests", None)
        if (
            result is NOT_DONE_YET
            and isinstance(requests, list)
            and getattr(channel, "transport", None) is None  # taken over
        ):
            requests.clear()
        return result


class BridgeWebSocketFactory(WebSocketServerFactory):
    protocol = BridgeServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: Hub,
        db: PoolService,
        store: Store | None,
        config: EdgeConfig,
        clock: IReactorTime,
        anonymous: Callable[[], bool] = permissions.anonymous_enabled,
        vault: Vault | None = None,
        grants: GrantsCache | None = None,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.vault = vault or Vault()
        self.db = db
        self.grants = grants if grants is not None else GrantsCache(db, clock)
        self.store = store
        self.config = config
        self.clock = clock
        self.anonymous = anonymous
        self.connections: set[BridgeServerProtocol] = set()
        self.frames_in = 0
        self.frames_out = 0
        self.counters: Counter[str] = Counter()
        self.identify_seconds = Histogram(LATENCY_BUCKETS)
        self.connects = RateLimit(config.connect_rate, config.connect_burst, clock.seconds)
        self.coalescer = Coalescer(clock)
        self.setProtocolOptions(
            maxMessagePayloadSize=4 * config.max_message_size,
            maxFramePayloadSize=4 * config.max_message_size,
            utf8validateIncoming=False,
            # Autobahn's timers count whole seconds.
            openHandshakeTimeout=max(1, round(config.handshake_timeout)),
            closeHandshakeTimeout=2,
            tcpNoDelay=True,
            failByDrop=False,
            # Let "null" and file:// origins reach origin_allowed(), which
            # refuses them with the spec's 403 (Autobahn would answer 400).
            allowNullOrigin=True,
        )
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        super().setProtocolOptions(*args, **kwargs)
        self._options_on_protocol_class()

    def _options_on_protocol_class(self) -> None:
        """Give the connections this factory's options as class attributes.

        Autobahn copies every option (about fifty) from the factory onto each
        new connection, but only those the connection does not already have
        (``WebSocketProtocol._connectionMade``): as class attributes of a
        protocol class of this factory's own, they are there for every
        connection once and no instance dict holds them (a function, such as
        ``perMessageCompressionAccept``, as a static method, so that it is not
        bound to the connection). Set again whenever
        the options change, so a new connection sees the factory's current
        options as before. Without ``CONFIG_ATTRS`` (another Autobahn), the
        connections copy them as they always did.
        """
        names = getattr(BridgeServerProtocol, "CONFIG_ATTRS", None)
        if not names:
            return
        options = {
            name: _as_class_attr(getattr(self, name)) for name in names if hasattr(self, name)
        }
        self.protocol = type(  # type: ignore[assignment]
            BridgeServerProtocol.__name__,
            (BridgeServerProtocol,),
            {"__module__": BridgeServerProtocol.__module__, **options},
        )

    def now(self) -> float:
        return self.clock.seconds()

    def audit(self, record: AuditRecord) -> None:
        if self.store is not None:
            self.store.audit(record)

    def start(self) -> None:
        self._sweeper.start(1.0, now=False)

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    def sweep(self) -> None:
        now = self.now()
        for conn in list(self.connections):
            conn.check(now)
        self.hub.expire_sessions(now)

    def going_away(self, grace: float = 2.0) -> Deferred[None]:
        """Shutdown: tell every client to RESUME elsewhere (1001).

        Fires once every connection has closed, or after ``grace`` seconds
        (Autobahn's close handshake timeout drops the silent ones): the
        reactor stops by cutting connections without flushing them, and over
        TLS that lost the close frame, so clients saw 1006 instead.
        """
        for conn in list(self.connections):
            # sendClose() refuses 1001, which the spec gives this meaning.
            conn.sendCloseFrame(code=int(CloseCode.GOING_AWAY), reasonUtf8=b"server going away")
        done: Deferred[None] = Deferred()
        deadline = self.now() + grace

        def check() -> None:
            if not self.connections or self.now() >= deadline:
                done.callback(None)
            else:
                self.clock.callLater(0.05, check)

        check()
        return done
