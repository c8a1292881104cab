"""Server-Sent Events: the read-only twin of the WebSocket (spec §1).

``GET /events/?devices=<id>,<id>`` streams the same STATUS and EVENT frames a
WebSocket session would get, one per ``data:`` line with ``id:`` set to its
sequence number. The stream is a :class:`~bridge.session.Session` like any
other, so numbering, permissions, grant changes and RESUME (here through
``Last-Event-ID``) behave exactly as on the WebSocket.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource, server

from bridge import identity as identities
from bridge import permissions, protocol
from bridge.grants import GrantsCache
from bridge.hub import Hub
from bridge.session import Action, Close, Identity, Limits, Role, Send, Session, State
from bridge.store import AuditRecord, Store
from bridge.threads import PoolService, database_unavailable
from bridge.throttle import RateLimit

log = Logger()

_SEQ = re.compile(rb',"s":(\d+)}$')
COOKIE = b"bridge_sse"


def event_text(frame: bytes) -> bytes:
    """One SSE event for a numbered frame: ``id:`` is its ``s``."""
    match = _SEQ.search(frame)
    head = b"id: " + match.group(1) + b"\n" if match else b""
    return head + b"data: " + frame + b"\n\n"


class StreamLink:
    """A Session's link onto one open HTTP response; a push producer for it."""

    def __init__(self, request: server.Request, clock: IReactorTime) -> None:
        self.request = request
        self.clock = clock
        self.open = True
        self.session: Session | None = None

    # IPushProducer: a reader that cannot keep up gets spec §5a's treatment.
    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pause_output(self.clock.seconds())

    def resumeProducing(self) -> None:
        if self.session is not None and self.session.link is self:
            self.session.resume_output()

    def stopProducing(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self.open:
            self.request.write(event_text(data))

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.write(action.data)
            elif isinstance(action, Close):
                self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.request.unregisterProducer()
            self.request.finish()

    def replaced(self) -> None:
        self.close()


class EventStream(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        hub: Hub,
        db: PoolService,
        store: Store | None,
        limits: Limits,
        clock: IReactorTime,
        anonymous: Callable[[], bool] = permissions.anonymous_enabled,
        heartbeat: float = 15.0,
        connects: RateLimit | None = None,
        grants: GrantsCache | None = None,
    ) -> None:
        super().__init__()
        self.hub = hub
        # Shared with the WebSocket edge: one budget of new connections per address.
        self.connects = connects
        self.db = db
        self.grants = grants if grants is not None else GrantsCache(db, clock)
        self.store = store
        self.limits = limits
        self.clock = clock
        self.anonymous = anonymous
        self.streams: set[StreamLink] = set()
        # Which principal and query each SSE session belongs to, for resuming.
        self._keys: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self.heartbeat_interval = heartbeat

    def start(self) -> None:
        self._heartbeat.start(self.heartbeat_interval, now=False)

    def stop(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        for link in list(self.streams):
            link.close()

    def _beat(self) -> None:
        for link in list(self.streams):
            link.request.write(b": heartbeat\n\n")

    # ---------------------------------------------------------------- GET

    def render_GET(self, request: server.Request) -> Any:
        query = parse_qs(request.uri.split(b"?", 1)[1].decode() if b"?" in request.uri else "")
        raw = ",".join(query.get("devices", []))
        devices = tuple(dict.fromkeys(d for d in raw.split(",") if d))
        if not devices or not all(protocol.is_device_id(d) for d in devices):
            return self._error(request, 400, "give ?devices=<id>,<id> with valid device ids")
        if len(devices) > protocol.MAX_DEVICES_PER_REQUEST:
            return self._error(request, 400, "too many devices")
        if self.connects is not None:
            wait = self.connects.take(getattr(request.getClientAddress(), "host", None))
            if wait:
                request.setHeader(b"retry-after", str(int(wait) + 1).encode())
                return self._error(request, 429, "too many new connections from this address")
        self._serve(request, devices)
        return server.NOT_DONE_YET

    def _error(self, request: server.Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        if code == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="bridge"')
        return protocol.dumps({"error": message})

    def _finish_error(self, request: server.Request, code: int, message: str) -> None:
        if not request.finished and not request._disconnected:
            request.write(self._error(request, code, message))
            request.finish()

    @inlineCallbacks
    def _serve(self, request: server.Request, devices: tuple[str, ...]) -> Any:
        peer = request.getClientAddress()
        remote = getattr(peer, "host", None)
        try:
            who: Identity | None = yield self._identify(request)
        except identities.AuthenticationFailed as e:
            self._audit(None, "identify", None, str(e), remote)
            self._finish_error(request, 401, str(e))
            return
        except Exception as e:
            if not database_unavailable(e):  # that, the pool logs once
                log.failure("SSE authentication could not be checked")
            self._finish_error(request, 503, "authentication unavailable, try again")
            return
        if who is None:
            self._finish_error(request, 401, "log in, or send Authorization: Bearer <token>")
            return
        grants = yield self.grants.get(who)
        for device in devices:
            if device not in grants:
                self._audit(who, "subscribe", device, "no read permission for this device", remote)
                self._finish_error(request, 403, "no read permission for a requested device")
                return
        if request.finished or request._disconnected:
            return
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        link = StreamLink(request, self.clock)
        self.streams.add(link)
        session = self._resume(request, who, devices, grants, link)
        if session is None:
            session = Session(
                secrets.token_urlsafe(18), self.limits, self.clock.seconds(), portable=False
            )
            session.attach(link, self.clock.seconds())
            self._keys[session.session_id] = (_principal(who), devices)
            request.addCookie(
                COOKIE,
                session.session_id.encode(),
                path=b"/events/",
                httpOnly=True,
                secure=request.isSecure(),
                sameSite="strict",
            )
            request.write(b": stream open\n\n")
            session.identified(who, grants, self.hub.is_online)
            self.hub.register(session)
            session.subscriptions.update(devices)
            self.hub.subscribe(session, devices, history=True)
        link.session = session
        request.registerProducer(link, True)
        request.notifyFinish().addBoth(lambda _: self._closed(link, session))

    def _identify(self, request: server.Request) -> Any:
        header = _header(request, b"authorization")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise identities.AuthenticationFailed("use Authorization: Bearer <token>")
            return self.db.orm(identities.identity_from_token, token.strip())
        key = identities.session_key_from_cookie_header(_header(request, b"cookie"))
        if key:
            d = self.db.orm(identities.identity_from_session, key)
            return d.addCallback(lambda who: who or self._anonymous())
        from twisted.internet.defer import succeed

        return succeed(self._anonymous())

    def _anonymous(self) -> Identity | None:
        return Identity(Role.ANONYMOUS) if self.anonymous() else None

    def _resume(
        self,
        request: server.Request,
        who: Identity,
        devices: tuple[str, ...],
        grants: dict[str, Any],
        link: StreamLink,
    ) -> Session | None:
        """``Last-Event-ID``: the detached stream of this principal and query, if held."""
        last = _header(request, b"last-event-id")
        if last is None or not last.strip().isdigit():
            return None
        seq = int(last.strip())
        key = (_principal(who), devices)
        wanted = request.getCookie(COOKIE)
        candidates = [
            s
            for sid, k in self._keys.items()
            if k == key
            and (s := self.hub.sessions.get(sid)) is not None
            and s.link is None
            and s.state is State.READY
            and s.seq >= seq
            and s.can_replay_from(seq)
        ]
        if wanted is not None:
            chosen = [s for s in candidates if s.session_id == wanted.decode(errors="replace")]
            candidates = chosen or candidates
        if not candidates:
            return None
        session = max(candidates, key=lambda s: s.detached_at or 0.0)
        frames, dropped = session.resume(seq, who, grants, link, self.clock.seconds())
        self.hub.drop_subscriptions(session, dropped)
        request.write(b": stream resumed\n\n")
        for frame in frames:
            link.write(frame)
        return session

    def _closed(self, link: StreamLink, session: Session) -> None:
        link.open = False
        self.streams.discard(link)
        if session.link is link:
            session.detach(self.clock.seconds())
        if link.request.channel is not None:  # gone once the connection is lost
            link.request.unregisterProducer()
        for sid in [sid for sid in self._keys if sid not in self.hub.sessions]:
            del self._keys[sid]

    def _audit(
        self, who: Identity | None, action: str, device: str | None, detail: str, remote: Any
    ) -> None:
        log.warn(
            "SSE denied {action} on {device} for {user}: {detail}",
            action=action,
            device=device,
            user=who.username if who else None,
            detail=detail,
        )
        if self.store is not None:
            self.store.audit(
                AuditRecord(
                    action=action,
                    user_id=who.user_id if who else None,
                    username=who.username if who else None,
                    device_id=device,
                    detail=detail,
                    remote_addr=remote,
                )
            )


def _header(request: server.Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _principal(who: Identity) -> tuple[Any, ...]:
    return (who.role, who.user_id, who.device_id)
