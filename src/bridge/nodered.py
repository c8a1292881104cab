"""The Node-RED link: one persistent WebSocket to a ``websocket in`` listener.

Spec §7.  The bridge dials Node-RED (not the other way round) so that Node-RED
needs no credentials of ours and the bridge notices at once when the link is
gone: WebSocket pings bound how long a half-open link can go unnoticed.  The
link only moves messages and reports link state; the hub does the rest
(unknown ``group_id`` counting, confirmation, timeouts).

Inbound decoding is the pure function :func:`decode_status` so it can be tested
without sockets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from bridge.config import load_secret
from bridge.envelope import EnvelopeError, PayloadCipher
from bridge.transport import set_nodelay
from bridge.upstream import (
    IUpstream,
    LinkState,
    MalformedMessage,
    UpstreamCommand,
    command_id_of,
    decode_object,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MalformedMessage",
    "NodeRedLink",
    "StatusMessage",
    "decode_status",
    "load_secret",
]

#: Largest inbound message accepted; a status is a few hundred bytes.
MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: Upper bound of the wait between two dials (spec §7).
MAX_RETRY_DELAY: Final = 30.0
#: Malformed messages are logged at most this often; all are counted.

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_SECRET_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: fits a header, no spaces

log = Logger(namespace="bridge.nodered")


# --------------------------------------------------------------- secrets


# ------------------------------------------------------- inbound decoding


@dataclass(frozen=True, slots=True)
class StatusMessage:
    """One status from Node-RED: ``{"group_id", "payload", "command_id"?}``."""

    group_id: str
    payload: Any
    command_id: str | None


def decode_status(data: bytes | str) -> StatusMessage:
    """Decode one text message from Node-RED, or raise :class:`MalformedMessage`.

    Other keys (``_msgid``, ``topic``, ...) are ignored.  ``command_id`` may be
    missing or null; anything else that is not a string is refused rather than
    guessed at, because it decides which command a status confirms.
    """
    obj = decode_object(data)
    group_id = obj.get("group_id")
    if not isinstance(group_id, str) or not group_id:
        raise MalformedMessage("group_id missing or not a non-empty string")
    if "payload" not in obj:
        raise MalformedMessage("payload missing")
    return StatusMessage(group_id, obj["payload"], command_id_of(obj))


# --------------------------------------------------------------- the URL


@dataclass(frozen=True, slots=True)
class _Target:
    secure: bool
    host: str
    port: int
    display: str  # scheme://host:port/path, for logs and /healthz


def _parse_url(url: str) -> _Target:
    """Check the link URL; refuse credentials in it (they belong in the secret file)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("the Node-RED URL must start with ws:// or wss://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "the Node-RED URL must not carry credentials; "
            "give the link secret with --nodered-secret-file or BRIDGE_NODERED_SECRET"
        )
    if not parts.hostname:
        raise ValueError("the Node-RED URL has no host")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    display = f"{parts.scheme}://{shown_host}:{port}{parts.path or '/'}"
    return _Target(secure, host, port, display)


# ------------------------------------------------------- failure wording


def _status_code(status_line: str | None) -> tuple[int, str] | None:
    """``"HTTP/1.1 401 Unauthorized"`` -> ``(401, "Unauthorized")``."""
    if not status_line:
        return None
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1]), fields[2].strip() if len(fields) > 2 else ""


def _tls_failure(reason: Failure | None, host: str) -> str | None:
    """Say in words why TLS failed, or None if ``reason`` is no TLS failure."""
    if reason is None:
        return None
    value = reason.value
    if isinstance(value, VerificationError):
        return (
            f"TLS host name verification failed for {host}: Node-RED's certificate "
            f"is not valid for {host!r} ({value})"
        )
    if isinstance(value, SSL.Error):
        details = "; ".join(
            ":".join(str(part) for part in err if part)
            for err in (value.args[0] if value.args and isinstance(value.args[0], list) else [])
        ) or str(value)
        if "certificate verify failed" in details:
            return (
                f"TLS certificate verification failed for {host}: {details}; Node-RED's "
                "certificate is not signed by a trusted CA (--nodered-ca FILE, else the "
                "system roots)"
            )
        return f"TLS handshake with {host} failed: {details}"
    return None


# ------------------------------------------------------- Twisted plumbing


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Wraps the real endpoint so that failed dials reach the link (for logs, /healthz)."""

    def __init__(
        self,
        wrapped: Any,  # an IStreamClientEndpoint
        display: str,
        on_failure: Callable[[Failure], None],
    ) -> None:
        self._wrapped = wrapped
        self._display = display
        self._on_failure = on_failure

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d = self._wrapped.connect(protocolFactory)

        def failed(reason: Failure) -> Failure:
            self._on_failure(reason)
            return reason

        return d.addErrback(failed)

    def __repr__(self) -> str:
        return f"<Node-RED endpoint {self._display}>"


class _LinkProtocol(WebSocketClientProtocol):
    """One WebSocket connection; everything of interest goes to the link."""

    # Pinned at "info": autobahn logs the whole handshake request at debug,
    # and that includes the Authorization header with the link secret.
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    factory: _LinkFactory
    _lost_reason: Failure | None = None
    _was_opened = False

    def connectionMade(self) -> None:
        super().connectionMade()
        set_nodelay(self.transport)

    def onOpen(self) -> None:
        self._was_opened = True
        self.factory.link._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.link._received(payload, isBinary)

    # ------------------------------------------- inbound statuses, fast

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's version formats a debug line's arguments on every read,
        # shown or not; the link reads hundreds of times a second.
        self._dataReceived(data)

    def consumeData(self) -> None:
        """Autobahn's frame loop, with whole small text frames taken in one step.

        Nearly everything on the link is one unfragmented text frame per
        status, often several in one read. Autobahn parses each through
        half a dozen callbacks and fires an observer Deferred per message;
        :meth:`_take_text_frames` hands such frames straight to the link.
        Anything else (control frames, fragments, a frame not yet complete,
        invalid UTF-8, a protocol violation) is left to Autobahn, one step
        at a time, so its behaviour there is unchanged.
        """
        if self.state != self.STATE_OPEN:
            super().consumeData()
            return
        self._take_text_frames()
        while self.state == self.STATE_OPEN and self.processData():
            self._take_text_frames()
        if self.state == self.STATE_CLOSING:
            super().consumeData()

    def _take_text_frames(self) -> None:
        if self.current_frame is not None or self.inside_message:
            return
        data = self.data
        size = len(data)
        pos = 0
        received = self.factory.link._received_text
        while size - pos >= 2 and data[pos] == 0x81:  # FIN, no RSV bits, text
            length = data[pos + 1]  # the mask bit set (not allowed) falls through
            if length < 126:
                start = pos + 2
            elif length == 126 and size - pos >= 4:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:  # not the minimal encoding: a violation
                    break
                start = pos + 4
            else:  # 64-bit lengths, masked frames, a header not complete
                break
            end = start + length
            if end > size:
                break
            try:
                text = data[start:end].decode("utf-8")
            except UnicodeDecodeError:  # Autobahn fails the connection (1007)
                break
            pos = end
            received(text)
            if self.state != self.STATE_OPEN or self.data is not data:
                break  # the link closed (or was reset) while handling it
        if pos:
            if self.data is data:
                self.data = data[pos:]
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Keep the transport-level reason: onClose only gets a string, and a
        # TLS verification failure must be told apart from a dropped link.
        self._lost_reason = reason
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.link._closed(
            self,
            opened=self._was_opened,
            reason=reason or "",
            status_line=getattr(self, "http_status_line", None),
            lost=self._lost_reason,
        )


class _LinkFactory(WebSocketClientFactory):
    protocol = _LinkProtocol  # type: ignore[assignment]

    def __init__(self, link: NodeRedLink, url: str, headers: dict[str, str], reactor: Any):
        super().__init__(url, headers=headers, reactor=reactor)
        self.link = link

    def __repr__(self) -> str:  # the default repr would be harmless, but be sure
        return f"<Node-RED link factory {self.link.url}>"


# ------------------------------------------------------------- the link


@implementer(IUpstream)
class NodeRedLink(LinkState, Service):
    """The bridge's end of the Node-RED link (spec §7), as a Twisted service.

    Redials forever with exponential backoff plus jitter, capped at 30 s.  A
    connection that never finishes the WebSocket handshake (refused secret,
    certificate error, wrong path) counts as a failed attempt too, so a
    misconfigured link backs off instead of hammering Node-RED.
    """

    source = "Node-RED"

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        secret: str | None = None,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        handshake_timeout: float = 10.0,
        ping_interval: float = 2.0,
        ping_timeout: float = 3.0,
        retry_policy: Callable[[int], float] | None = None,
        cipher: PayloadCipher | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        LinkState.__init__(self, reactor)
        self._target = _parse_url(url)
        if secret is not None and not _SECRET_CHARS.fullmatch(secret):
            raise ValueError("the link secret must be printable ASCII without spaces")
        if client_key is not None and client_cert is None:
            raise ValueError("a client key needs a client certificate")
        if min(handshake_timeout, ping_interval, ping_timeout) < 1.0:
            # autobahn rounds these timers down to whole seconds: a 0.5 s ping
            # timeout can fire at once, before any pong could arrive.
            raise ValueError("handshake and ping timings must be at least 1 s")
        if not self._target.secure and (ca_file or client_cert):
            raise ValueError("a CA file or client certificate needs a wss:// URL")
        # With a cipher, payloads cross the link sealed (docs/encryption.md).
        self._cipher = cipher
        self._protocol: _LinkProtocol | None = None
        self._unopened = 0  # connections in a row that closed before the handshake finished
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=MAX_RETRY_DELAY - 1.0, factor=2.0
        )  # its jitter adds [0, 1) s, so the wait stays under 30 s

        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._has_secret = bool(secret)
        self._factory = _LinkFactory(self, url, headers, reactor)
        self._factory.setProtocolOptions(
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=1.0,
            serverConnectionDropTimeout=1.0,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            tcpNoDelay=True,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
            perMessageCompressionOffers=[],
        )
        tcp = HostnameEndpoint(
            reactor, self._target.host, self._target.port, timeout=handshake_timeout
        )
        endpoint: Any = tcp
        if self._target.secure:
            tls = self._tls_options(ca_file, client_cert, client_key)
            endpoint = wrapClientTLS(tls, cast(IStreamClientEndpoint, tcp))
        reporting = _ReportingEndpoint(endpoint, self._target.display, self._dial_failed)
        self._client = ClientService(
            cast(IStreamClientEndpoint, reporting),
            cast(IProtocolFactory, self._factory),
            retryPolicy=self._retry_delay,
            clock=reactor,
        )

    def _tls_options(self, ca_file: str | None, cert: str | None, key: str | None) -> Any:
        """Client TLS: verify the server's chain and host name; optionally present a cert."""
        if ca_file is not None:
            with open(ca_file, "rb") as f:
                pems = _PEM_CERT.findall(f.read())
            if not pems:
                raise ValueError(f"no PEM certificate in the CA file {ca_file}")
            trust = trustRootFromCertificates([Certificate.loadPEM(pem) for pem in pems])
        else:
            trust = platformTrust()
        client = None
        if cert is not None:
            with open(cert, "rb") as f:
                material = f.read()
            if key is not None:
                with open(key, "rb") as f:
                    material += b"\n" + f.read()
            client = PrivateCertificate.loadPEM(material)
        return optionsForClientTLS(self._target.host, trustRoot=trust, clientCertificate=client)

    # ---------------------------------------------------------- IUpstream

    @property
    def url(self) -> str:
        """The URL without credentials, query or fragment."""
        return self._target.display

    @property
    def description(self) -> str:
        return f"Node-RED at {self._target.display}"

    @property
    def available(self) -> bool:
        proto = self._protocol
        return proto is not None and proto.state == WebSocketProtocol.STATE_OPEN

    def send_command(self, command: UpstreamCommand) -> bool:
        """Send one command as one text message; False at once if the link is down."""
        proto = self._protocol
        if proto is None or proto.state != WebSocketProtocol.STATE_OPEN:
            return False
        try:
            message = command.to_json()
            if self._cipher is not None:
                message = self._cipher.seal_command(message)
            text = json.dumps(message, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError):
            self.counters["commands_unencodable"] += 1
            log.emit(
                LogLevel.warn,
                "Command {command_id} for {device} is not JSON; not sent",
                command_id=command.command_id,
                device=command.device_id,
            )
            return False
        proto.sendMessage(text.encode("utf-8"), isBinary=False)
        self.counters["commands_out"] += 1
        return True

    def health(self) -> dict[str, Any]:
        return self._health(self._target.display)

    def __repr__(self) -> str:
        return f"<NodeRedLink {self._target.display} {'up' if self._up else 'down'}>"

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        if not self._has_secret:
            log.emit(
                LogLevel.warn,
                "No Node-RED link secret configured: the link sends no Authorization header "
                "(set --nodered-secret-file or BRIDGE_NODERED_SECRET)",
            )
        log.info("Dialling {description}", description=self.description)
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        proto = self._protocol
        if proto is not None and proto.state == WebSocketProtocol.STATE_OPEN:
            proto.sendClose(
                code=WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL, reason="bridge stopping"
            )
        return self._client.stopService().addCallback(self._cancel_stray_timers)

    def _cancel_stray_timers(self, result: None) -> None:
        """Once every connection is closed, cancel autobahn's leftover timer buckets.

        autobahn batches its timers per factory and leaves an empty bucket
        scheduled when a connection goes; harmless, but a stopped service
        should leave nothing behind on the reactor (and trial checks that).
        """
        timer = getattr(self._factory, "_batched_timer", None)
        buckets = getattr(timer, "_buckets", None)
        if isinstance(buckets, dict):
            for delayed_call, _calls in list(buckets.values()):
                if delayed_call.active():
                    delayed_call.cancel()
            buckets.clear()
        return result

    # ------------------------------------------------------- link events

    def _retry_delay(self, attempt: int) -> float:
        """ClientService resets its count on every TCP connect; add handshake failures."""
        return min(self._retry_policy(attempt + self._unopened), MAX_RETRY_DELAY)

    def _set_error(self, message: str) -> None:
        self._last_error = message
        log.emit(LogLevel.warn, "{error}; retrying", error=message)

    def _dial_failed(self, reason: Failure) -> None:
        if not self.running:  # stopService cancelled the attempt
            return
        self.counters["dial_failures"] += 1
        detail = _tls_failure(reason, self._target.host) or (
            f"cannot reach Node-RED at {self._target.display}: {reason.getErrorMessage()}"
        )
        self._set_error(detail)

    def _opened(self, proto: _LinkProtocol) -> None:
        self._protocol = proto
        self._unopened = 0
        self._last_error = None
        self.counters["links_up"] += 1
        log.info("Node-RED link up: {url}", url=self._target.display)
        self._transition(True)

    def _closed(
        self,
        proto: _LinkProtocol,
        *,
        opened: bool,
        reason: str,
        status_line: str | None,
        lost: Failure | None,
    ) -> None:
        if opened:
            if self._protocol is proto:
                self._protocol = None
                if self.running:
                    self._last_error = f"link lost: {reason}"
                    log.emit(LogLevel.warn, "Node-RED link lost: {reason}", reason=reason)
                self._transition(False)
            return
        self._unopened += 1
        self.counters["handshake_failures"] += 1
        if not self.running:
            return
        self._set_error(self._handshake_failure(reason, status_line, lost))

    def _handshake_failure(self, reason: str, status_line: str | None, lost: Failure | None) -> str:
        tls = _tls_failure(lost, self._target.host)
        if tls is not None:
            return tls
        status = _status_code(status_line)
        if status is not None and status[0] != 101:
            code, phrase = status
            text = f"Node-RED refused the link handshake: HTTP {code} {phrase}".rstrip()
            if code in (401, 403):
                hint = (
                    "the link secret is wrong (it must equal BRIDGE_NODERED_SECRET in "
                    "Node-RED's environment)"
                    if self._has_secret
                    else "the bridge sends no link secret (set --nodered-secret-file or "
                    "BRIDGE_NODERED_SECRET)"
                )
                return f"{text}; {hint}"
            return f"{text}; check that the path matches a `websocket in` listener"
        if status is None:
            # Node-RED does not answer a handshake for a path that no deployed
            # `websocket in` listener serves: it drops it after a while.
            what = "timed out" if "opening handshake timeout" in reason else f"failed: {reason}"
            return (
                f"WebSocket handshake with {self._target.display} {what}; is a `websocket in` "
                "listener deployed on exactly that path?"
            )
        return f"WebSocket handshake with {self._target.display} failed: {reason}"

    def _received(self, data: bytes, is_binary: bool) -> None:
        if is_binary:
            self._malformed("a binary message")
            return
        self._received_text(data)

    def _received_text(self, data: bytes | str) -> None:
        try:
            status = decode_status(data)
        except MalformedMessage as e:
            self._malformed(str(e))
            return
        payload = status.payload
        if self._cipher is not None:
            try:
                payload = self._cipher.open_status(status.group_id, payload, status.command_id)
            except EnvelopeError as e:
                self.counters["undecryptable"] += 1
                self._malformed(f"a payload that does not open: {e}")
                return
        self.counters["statuses_in"] += 1
        if self._listener is not None:
            self._listener.upstream_status(status.group_id, payload, status.command_id)
