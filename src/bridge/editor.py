"""The Node-RED editor behind Django auth: a reverse proxy at ``/nodered/``.

Node-RED listens on localhost only; the bridge is the one way in.  Every
request (asset, admin API call, or the editor's WebSocket ``/nodered/comms``)
is checked against the Django session cookie on the ORM thread pool:

* no valid session: a redirect to the login page (401 for a WebSocket);
* a user without the ``bridge.use_nodered`` permission: 403;
* otherwise the request goes to Node-RED, and the answer streams back.

Paths map one to one below the mount point: ``/nodered/<rest>`` becomes
``<admin_url><rest>``.  Node-RED's editor uses relative URLs, so any
``httpAdminRoot`` works, but configure ``httpAdminRoot: "/nodered/"`` and
``--nodered-admin http://127.0.0.1:1880/nodered/``: then the paths are the same
on both sides and redirects and logs need no translation (the proxy rewrites
``Location`` headers either way).

The editor's WebSocket is spliced at the TCP level after the check: the
handshake is replayed to Node-RED and bytes flow both ways unchanged.  The
session is checked again every few seconds while the socket is open, so a
logout or a withdrawn permission closes it.

Responses carry ``X-Frame-Options: SAMEORIGIN`` (the dashboard's Flows tab
frames the editor; the bridge's default is DENY).  Requests that change
state (not GET, HEAD or OPTIONS) and WebSocket handshakes must come from the
bridge's own origin.  The Django session and CSRF cookies are never passed to
Node-RED.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from bridge.threads import PoolService

log = Logger()

NODERED_PERMISSION = "bridge.use_nodered"

# Hop-by-hop headers (RFC 9110 section 7.6.1) are never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the proxy (or by Agent, from the body) rather than copied.
OWN_HEADERS = frozenset({b"host", b"content-length", b"expect"})
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
FRAME_OPTIONS = b"SAMEORIGIN"
# Node-RED's editor needs its inline scripts; only framing is restricted
# (the dashboard's Flows tab, same origin), instead of the site-wide policy.
EDITOR_CSP = b"frame-ancestors 'self'"


class Access(enum.Enum):
    ALLOWED = "allowed"
    ANONYMOUS = "anonymous"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class Decision:
    access: Access
    username: str | None = None
    login_url: str = "/accounts/login/"


def check_access(session_key: str | None) -> Decision:
    """Who holds this session and whether they may use the editor (ORM: run on a pool)."""
    from django.conf import settings
    from django.shortcuts import resolve_url

    from bridge.identity import user_from_session

    login_url = str(resolve_url(settings.LOGIN_URL))
    user = user_from_session(session_key) if session_key else None
    if user is None or not user.is_active:
        return Decision(Access.ANONYMOUS, login_url=login_url)
    username = user.get_username()
    if not user.has_perm(NODERED_PERMISSION):
        return Decision(Access.FORBIDDEN, username, login_url)
    return Decision(Access.ALLOWED, username, login_url)


def _django_cookie_names() -> frozenset[bytes]:
    from django.conf import settings

    return frozenset(
        name.encode()
        for name in (settings.SESSION_COOKIE_NAME, getattr(settings, "CSRF_COOKIE_NAME", ""))
        if name
    )


def strip_cookies(header: bytes, names: frozenset[bytes]) -> bytes:
    """A Cookie header without the named cookies."""
    kept = [
        part.strip()
        for part in header.split(b";")
        if part.strip() and part.strip().split(b"=", 1)[0].strip() not in names
    ]
    return b"; ".join(kept)


def same_origin(request: server.Request, allowed: frozenset[str]) -> bool:
    """Whether the request's Origin (or, lacking one, Referer) is the bridge itself."""
    from bridge.websocket import origin_allowed

    host = request.getHeader(b"host")
    origin = request.getHeader(b"origin")
    if origin is None:
        referer = request.getHeader(b"referer")
        if referer is None:
            return False
        parts = urlsplit(referer.decode("latin-1"))
        origin_text = f"{parts.scheme}://{parts.netloc}"
    else:
        origin_text = origin.decode("latin-1")
    if origin_text == "null":
        return False
    return origin_allowed(
        origin_text,
        host.decode("latin-1") if host else None,
        request.isSecure(),
        allowed,
    )


def _is_websocket(request: server.Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return request.method == b"GET" and upgrade.strip().lower() == b"websocket"


class EditorResource(resource.Resource):
    """The reverse proxy; see the module docstring."""

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        db_pool: PoolService,
        admin_url: str,
        *,
        allowed_origins: frozenset[str] = frozenset(),
        recheck_interval: float = 5.0,
        connect_timeout: float = 10.0,
        access: Callable[[str | None], Decision] = check_access,
    ) -> None:
        super().__init__()
        parts = urlsplit(admin_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the Node-RED admin URL must be http(s)://...: {admin_url}")
        self.reactor = reactor
        self.db_pool = db_pool
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc.encode("ascii")
        path = parts.path or "/"
        self.base_path = (path if path.endswith("/") else path + "/").encode("ascii")
        self.origin = f"{parts.scheme}://{parts.netloc}".encode("ascii")
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.recheck_interval = recheck_interval
        self.connect_timeout = connect_timeout
        self.access = access
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.agent = Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)
        self._cookie_names: frozenset[bytes] | None = None

    # ----------------------------------------------------------------- paths

    def _mount(self, request: server.Request) -> bytes:
        return b"/" + b"/".join(request.prepath or []) + b"/"

    def upstream_target(self, request: server.Request) -> bytes:
        """Node-RED's path and query for this request (raw bytes, not unquoted)."""
        mount = self._mount(request)
        uri = request.uri
        rest = uri[len(mount) :] if uri.startswith(mount) else uri.lstrip(b"/")
        return self.base_path + rest

    def rewrite_location(self, location: bytes, mount: bytes) -> bytes:
        """Node-RED's redirects, pointed back at the mount point."""
        if location.startswith(self.origin + b"/"):
            location = location[len(self.origin) :]
        if location.startswith(self.base_path):
            return mount + location[len(self.base_path) :]
        if location + b"/" == self.base_path:
            return mount
        return location

    def forward_headers(self, request: server.Request, username: str | None) -> Headers:
        if self._cookie_names is None:
            self._cookie_names = _django_cookie_names()
        connection_tokens = {
            token.strip().lower()
            for value in request.requestHeaders.getRawHeaders(b"connection", [])
            for token in value.split(b",")
        }
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection_tokens or lower in OWN_HEADERS:
                continue
            if lower.startswith(b"x-forwarded-") or lower == b"x-bridge-user":
                continue  # only this proxy says these
            if lower == b"cookie":
                values = [strip_cookies(v, self._cookie_names) for v in values]
                values = [v for v in values if v]
                if not values:
                    continue
            headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"host", [self.netloc])
        peer = request.getClientAddress()
        client_ip = getattr(peer, "host", None)
        if client_ip:
            headers.setRawHeaders(b"x-forwarded-for", [client_ip.encode()])
        headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
        host = request.getHeader(b"host")
        if host:
            headers.setRawHeaders(b"x-forwarded-host", [host])
        headers.setRawHeaders(b"x-forwarded-prefix", [self._mount(request).rstrip(b"/")])
        if username:
            headers.setRawHeaders(b"x-bridge-user", [username.encode("utf-8")])
        return headers

    # ---------------------------------------------------------------- render

    def render(self, request: server.Request) -> Any:
        if not request.postpath:
            # "/nodered" without the slash: the editor's relative URLs need it.
            query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
            request.redirect(self._mount(request) + (b"?" + query if query else b""))
            return b""
        if request.method not in SAFE_METHODS or _is_websocket(request):
            if not same_origin(request, self.allowed_origins):
                return self._error(request, 403, "Cross-origin request refused.")
        from bridge.identity import session_key_from_cookie_header

        cookie = request.getHeader(b"cookie")
        key = session_key_from_cookie_header(cookie.decode("latin-1") if cookie else None)
        d = self.db_pool.orm(self.access, key)
        d.addCallback(self._decided, request, key)
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _decided(self, decision: Decision, request: server.Request, key: str | None) -> None:
        if request._disconnected:
            return
        if decision.access is Access.ANONYMOUS:
            if _is_websocket(request) or request.method not in SAFE_METHODS:
                self._finish_error(request, 401, "Log in first.")
                return
            from urllib.parse import urlencode

            target = (
                decision.login_url
                + "?"
                + urlencode({"next": request.uri.decode("latin-1")}, safe="/")
            )
            request.redirect(target.encode("latin-1"))
            request.setHeader(b"cache-control", b"no-store")
            request.finish()
            return
        if decision.access is Access.FORBIDDEN:
            log.info(
                "Node-RED editor refused to {user}: no use_nodered permission",
                user=decision.username,
            )
            self._finish_error(
                request, 403, "You do not have permission to use the Node-RED editor."
            )
            return
        if _is_websocket(request):
            self._splice(request, key, decision)
        else:
            self._proxy(request, decision)

    def _failed(self, failure: Failure, request: server.Request) -> None:
        log.failure("Node-RED editor: access check failed", failure)
        if not request._disconnected and not request.finished:
            self._finish_error(request, 503, "The access check is unavailable; try again.")

    def _error(self, request: server.Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", FRAME_OPTIONS)
        request.setHeader(b"content-security-policy", EDITOR_CSP)
        titles = {400: "Bad request", 401: "Log in first", 403: "Forbidden"}
        title = titles.get(code, "Node-RED unreachable" if code == 502 else "Unavailable")
        body = (
            "<!doctype html><html lang=en><meta charset=utf-8>"
            f"<title>{title}</title><h1>{title}</h1><p>{message}</p></html>"
        )
        return body.encode()

    def _finish_error(self, request: server.Request, code: int, message: str) -> None:
        body = self._error(request, code, message)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    # ----------------------------------------------------------------- HTTP

    def _proxy(self, request: server.Request, decision: Decision) -> None:
        url = self.scheme.encode() + b"://" + self.netloc + self.upstream_target(request)
        headers = self.forward_headers(request, decision.username)
        body = None
        content = request.content
        if content is not None:
            content.seek(0, 2)
            if content.tell() > 0 or request.method not in SAFE_METHODS:
                content.seek(0)
                body = FileBodyProducer(content)
        d = self.agent.request(request.method, url, headers, body)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallback(self._respond, request)
        d.addErrback(self._upstream_failed, request)

    def _respond(self, response: IResponse, request: server.Request) -> None:
        if request._disconnected:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        mount = self._mount(request)
        connection_tokens = {
            token.strip().lower()
            for value in response.headers.getRawHeaders(b"connection", [])
            for token in value.split(b",")
        }
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection_tokens:
                continue
            if lower == b"location":
                values = [self.rewrite_location(v, mount) for v in values]
            request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"x-frame-options", [FRAME_OPTIONS])
        request.responseHeaders.setRawHeaders(b"content-security-policy", [EDITOR_CSP])
        if request.method == b"HEAD" or response.code in (204, 304):
            response.deliverBody(_Discard())
            request.finish()
            return
        response.deliverBody(_Relay(request))

    def _upstream_failed(self, failure: Failure, request: server.Request) -> None:
        if request._disconnected:
            return
        if request.startedWriting:
            log.warn("Node-RED editor: response broke off: {f}", f=failure.getErrorMessage())
            request.loseConnection()
            return
        log.warn(
            "Node-RED editor at {url} unreachable: {f}",
            url=self.origin.decode(),
            f=failure.getErrorMessage(),
        )
        self._finish_error(request, 502, "The Node-RED editor is not reachable right now.")

    # ------------------------------------------------------------ WebSocket

    def _splice(self, request: server.Request, key: str | None, decision: Decision) -> None:
        channel = request.channel
        if channel is None or channel.transport is None:
            self._finish_error(request, 400, "Not an HTTP/1.1 connection.")
            return
        headers = self.forward_headers(request, decision.username)
        head = [b"GET " + self.upstream_target(request) + b" HTTP/1.1"]
        for name, values in headers.getAllRawHeaders():
            head.extend(name + b": " + v for v in values)
        for name in (b"upgrade", b"connection"):
            head.append(name + b": " + (request.getHeader(name) or b""))
        handshake = b"\r\n".join(head) + b"\r\n\r\n"

        endpoint: Any = endpoints.HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.connect_timeout
        )
        if self.scheme == "https":
            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        splice = _Splice(self, request, key)
        d: Deferred[Any] = endpoint.connect(_UpstreamFactory(splice))

        def connected(upstream: _UpstreamSide) -> None:
            if request._disconnected:
                upstream.raw.loseConnection()
                return
            upstream.raw.write(handshake)
            splice.start(upstream)

        d.addCallbacks(connected, lambda f: self._upstream_failed(f, request))


# ------------------------------------------------------------- HTTP helpers


class _Discard(protocol.Protocol):
    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        pass


class _Relay(protocol.Protocol):
    """Streams a response body into the browser's request, with backpressure."""

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.done = False
        request.notifyFinish().addErrback(self._client_gone)

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)  # a push producer, in fact

    def dataReceived(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)

    def _client_gone(self, failure: Failure) -> None:
        self.done = True
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done:
            return
        self.done = True
        self.request.unregisterProducer()
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss):
            self.request.finish()
        else:
            log.warn("Node-RED editor: body broke off: {f}", f=reason.getErrorMessage())
            self.request.loseConnection()


# ------------------------------------------------------------- TCP splice


class _Splice:
    """Two connections joined: the browser's (taken from twisted.web) and Node-RED's."""

    def __init__(self, owner: EditorResource, request: server.Request, key: str | None) -> None:
        self.owner = owner
        self.request = request
        self.key = key
        self.client: _ClientSide | None = None
        self.upstream: _UpstreamSide | None = None
        self.check = LoopingCall(self._recheck)
        self.check.clock = owner.reactor
        self.closed = False

    def start(self, upstream: _UpstreamSide) -> None:
        """Node-RED is connected: take the browser's connection over."""
        self.upstream = upstream
        request = self.request
        channel = request.channel
        transport: Any = channel.transport
        buffered = b"".join(getattr(channel, "_dataBuffer", []))
        channel.transport = None
        # twisted.web registered the HTTP channel as the transport's producer.
        transport.unregisterProducer()
        client = _ClientSide(self)
        # twisted.web owns the protocol of this transport; hand it to the splice.
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = client
        elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
            transport.protocol.wrappedProtocol = client
        else:
            transport.protocol = client
        client.makeConnection(transport)
        network = getattr(transport, "_networkProducer", None)
        if network is not None:
            network.resumeProducing()
        elif hasattr(transport, "resumeProducing"):
            transport.resumeProducing()
        self.client = client
        transport.registerProducer(upstream.raw, True)
        upstream.raw.registerProducer(transport, True)
        if buffered:
            upstream.raw.write(buffered)
        if upstream.pending:
            transport.write(b"".join(upstream.pending))
            upstream.pending.clear()
        if self.owner.recheck_interval > 0:
            self.check.start(self.owner.recheck_interval, now=False)
        log.info("Node-RED editor WebSocket opened for {peer}", peer=request.getClientAddress())

    def _recheck(self) -> None:
        d = self.owner.db_pool.orm(self.owner.access, self.key)

        def decided(decision: Decision) -> None:
            if decision.access is not Access.ALLOWED:
                log.info("Node-RED editor WebSocket closed: access withdrawn")
                self.close()

        d.addCallbacks(decided, lambda f: log.failure("editor recheck failed", f))

    def from_client(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.raw.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self.client is not None:
            self.client.raw.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.check.running:
            self.check.stop()
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.raw.loseConnection()


class _Side(protocol.Protocol):
    """One end of a splice; ``raw`` is its transport, producer methods included."""

    @property
    def raw(self) -> Any:
        return self.transport


class _ClientSide(_Side):
    def __init__(self, splice: _Splice) -> None:
        self.splice = splice

    def dataReceived(self, data: bytes) -> None:
        self.splice.from_client(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.splice.close()


class _UpstreamSide(_Side):
    def __init__(self, splice: _Splice) -> None:
        self.splice = splice
        self.pending: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.splice.client is None:
            self.pending.append(data)
        else:
            self.splice.from_upstream(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.splice.client is None and not self.splice.closed:
            # Node-RED hung up before the browser's connection was taken over.
            request = self.splice.request
            if not request._disconnected and not request.finished:
                self.splice.owner._finish_error(request, 502, "Node-RED closed the connection.")
        self.splice.close()


class _UpstreamFactory(protocol.ClientFactory):
    def __init__(self, splice: _Splice) -> None:
        self.splice = splice

    def buildProtocol(self, addr: Any) -> _UpstreamSide:
        side = _UpstreamSide(self.splice)
        side.factory = self
        return side


# ------------------------------------------------------------------ entry


def editor_resource(
    reactor: Any,
    db_pool: PoolService,
    admin_url: str,
    *,
    allowed_origins: frozenset[str] = frozenset(),
) -> resource.IResource:
    """The resource to mount at ``/nodered``: ``root.putChild(b"nodered", ...)``.

    ``admin_url`` is Node-RED's editor, e.g. ``http://127.0.0.1:1880/nodered/``
    (Node-RED with ``httpAdminRoot: "/nodered/"``, bound to localhost);
    ``allowed_origins`` are extra origins trusted like the bridge's own, as
    for the WebSocket edge.
    """
    return EditorResource(reactor, db_pool, admin_url, allowed_origins=allowed_origins)


__all__ = ["Access", "Decision", "EditorResource", "check_access", "editor_resource"]
