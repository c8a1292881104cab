"""The MQTT upstream: devices behind an MQTT broker instead of Node-RED.

Commands go to ``<prefix>/<device>/command`` (QoS 1), statuses come from
``<prefix>/<device>/status`` (one subscription, ``<prefix>/+/status``, QoS 1);
docs/mqtt.md has the message shapes.  Link state, the command lifecycle and
what the hub sees are the same as with Node-RED (spec §7): the link is
available only while connected and subscribed, and redials forever with
backoff and jitter capped at 30 s.

The protocol is paho-mqtt's, driven by the reactor through its external-loop
API: the socket is registered with the reactor as a read/write descriptor and
the reactor calls ``loop_read``/``loop_write``/``loop_misc``.  Nothing of paho
runs on a thread except the one call that cannot be made non-blocking, the
TCP connect and TLS handshake of ``reconnect()``; a fresh paho client per dial
keeps a command queued for a dead connection from being sent late on the
next one.

Topic handling and message decoding are pure functions, tested without sockets.
"""

from __future__ import annotations

import json
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor, IWriteDescriptor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

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
    "MqttLink",
    "MqttStatus",
    "command_topic",
    "decode_status",
    "device_from_topic",
    "encode_command",
    "status_subscription",
]

#: Largest inbound message accepted; a status is a few hundred bytes.
MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: Upper bound of the wait between two dials (as for Node-RED, spec §7).
MAX_RETRY_DELAY: Final = 30.0
#: Malformed messages are logged at most this often; all are counted.
#: How often paho's timers (keepalive pings, their timeout) are run.
MISC_INTERVAL: Final = 1.0
#: On stop, how long the DISCONNECT may take before the socket is just closed.
STOP_GRACE: Final = 1.0

_TOPIC_LEVEL_FORBIDDEN = ("/", "+", "#", "\x00")

log = Logger(namespace="bridge.mqtt")


# ------------------------------------------------------------------ topics


def check_prefix(prefix: str) -> str:
    """A topic prefix: one or more plain levels (``bridge``, ``site-1/bridge``)."""
    if not prefix or any(c in prefix for c in "+#\x00"):
        raise ValueError("the MQTT topic prefix must be non-empty and free of + # and NUL")
    if prefix.startswith("$") or "" in prefix.split("/"):
        raise ValueError("the MQTT topic prefix must not start with $ or have empty levels")
    return prefix


def _valid_level(level: str) -> bool:
    return bool(level) and not any(c in level for c in _TOPIC_LEVEL_FORBIDDEN)


def command_topic(prefix: str, device_id: str) -> str | None:
    """``<prefix>/<device>/command``, or None for an id that is not one topic level."""
    if not _valid_level(device_id):
        return None
    return f"{prefix}/{device_id}/command"


def status_subscription(prefix: str) -> str:
    return f"{prefix}/+/status"


def device_from_topic(prefix: str, topic: str) -> str | None:
    """The device of a ``<prefix>/<device>/status`` topic, else None."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/status"):
        return None
    device = topic[len(head) : -len("/status")]
    return device if _valid_level(device) else None


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class MqttStatus:
    """One status from a device: ``{"payload", "command_id"?}``; the topic names the device."""

    payload: Any
    command_id: str | None


def decode_status(data: bytes | bytearray) -> MqttStatus:
    """Decode one status message, or raise :class:`MalformedMessage` (never quoting it).

    Other keys are ignored; a ``command_id`` that is neither missing, null
    nor a string is refused rather than guessed at, as on the Node-RED link.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"larger than {MAX_MESSAGE_BYTES} bytes")
    obj = decode_object(data)
    if "payload" not in obj:
        raise MalformedMessage("payload missing")
    return MqttStatus(obj["payload"], command_id_of(obj))


def encode_command(command: UpstreamCommand) -> bytes:
    """``{"payload", "user", "command_id", "ts"}``; the topic names the device.

    Raises ValueError or TypeError for a payload that is not JSON.
    """
    body = {
        "payload": command.payload,
        "user": command.user,
        "command_id": command.command_id,
        "ts": command.ts,
    }
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------- URL


@dataclass(frozen=True, slots=True)
class _Broker:
    secure: bool
    host: str
    port: int
    username: str | None
    display: str  # scheme://host:port, for logs and /healthz


def _parse_url(url: str) -> _Broker:
    """``mqtt://[user@]host[:port]`` or ``mqtts://...``; no password, path or query."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("the MQTT URL must start with mqtt:// or mqtts://")
    if parts.password is not None:
        raise ValueError(
            "the MQTT URL must not carry a password; give it with --mqtt-password-file "
            "or BRIDGE_MQTT_PASSWORD"
        )
    if not parts.hostname:
        raise ValueError("the MQTT URL has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the MQTT URL takes no path or query; set the topic prefix instead")
    secure = parts.scheme == "mqtts"
    port = parts.port or (8883 if secure else 1883)
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    username = parts.username or None
    return _Broker(secure, host, port, username, f"{parts.scheme}://{shown_host}:{port}")


def _tls_context(ca_file: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Verify the broker's chain and host name (system roots unless a CA file)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _dial_error(reason: Failure, broker: _Broker) -> str:
    """Say in words why a dial failed."""
    value = reason.value
    if isinstance(value, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed for {broker.host}: "
            f"{value.verify_message or value}; the broker's certificate must be valid for "
            f"{broker.host!r} and signed by a trusted CA (--mqtt-ca FILE, else the system roots)"
        )
    if isinstance(value, ssl.SSLError):
        return f"TLS handshake with {broker.display} failed: {value.reason or value}"
    if isinstance(value, socket.timeout | TimeoutError):
        return f"cannot reach the MQTT broker at {broker.display}: timed out"
    if isinstance(value, OSError):
        return f"cannot reach the MQTT broker at {broker.display}: {value.strerror or value}"
    return f"cannot reach the MQTT broker at {broker.display}: {reason.getErrorMessage()}"


# --------------------------------------------------------- reactor glue


@implementer(IReadDescriptor, IWriteDescriptor)
class _PahoSocket:
    """paho's socket as the reactor sees it; every event goes back to the link."""

    def __init__(self, link: MqttLink, client: paho.Client, sock: Any) -> None:
        self.link = link
        self.client = client
        self._fd: int = sock.fileno()
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def doRead(self) -> None:
        if not self.closed:
            self.link._do_read(self)

    def doWrite(self) -> None:
        if not self.closed:
            self.link._do_write(self)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor gave up on the descriptor (hang-up, error): make paho see it.
        if not self.closed:
            self.link._abort(self.client, "connection lost")

    def logPrefix(self) -> str:
        return "MqttLink"


# ------------------------------------------------------------- the link


@implementer(IUpstream)
class MqttLink(LinkState, Service):
    """The bridge's MQTT client, as a Twisted service and an upstream."""

    source = "MQTT"

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        topic_prefix: str = "bridge",
        keepalive: int = 10,
        connect_timeout: float = 5.0,
        state_topic: str | None = "",
        client_id: str | None = None,
        retry_policy: Callable[[int], float] | None = None,
    ) -> None:
        """``state_topic``: where the bridge's retained ``{"online": bool}``
        birth and last-will go; "" means ``<prefix>/_bridge/state``, None none."""
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        LinkState.__init__(self, reactor)
        self._broker = _parse_url(url)
        self._prefix = check_prefix(topic_prefix)
        if password is not None and self._broker.username is None:
            raise ValueError("an MQTT password needs a user name: mqtt://USER@host")
        if client_key is not None and client_cert is None:
            raise ValueError("a client key needs a client certificate")
        if not self._broker.secure and (ca_file or client_cert):
            raise ValueError("a CA file or client certificate needs an mqtts:// URL")
        if keepalive < 1 or connect_timeout <= 0:
            raise ValueError("keepalive and connect timeout must be positive")
        self._password = password
        self._keepalive = int(keepalive)
        self._connect_timeout = float(connect_timeout)
        self._tls = _tls_context(ca_file, client_cert, client_key) if self._broker.secure else None
        self._state_topic = f"{self._prefix}/_bridge/state" if state_topic == "" else state_topic
        self._client_id = client_id or f"bridge-{uuid.uuid4().hex[:16]}"
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=MAX_RETRY_DELAY - 1.0, factor=2.0
        )  # its jitter adds [0, 1) s, so the wait stays under 30 s

        self._client: paho.Client | None = None  # the current dial's client
        self._socket: _PahoSocket | None = None
        self._dialling: Deferred[Any] | None = None  # the thread doing connect()
        self._misc: LoopingCall | None = None
        self._connack_timer: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._stop_grace: IDelayedCall | None = None
        self._stopped: Deferred[None] | None = None
        self._failures = 0  # dials in a row that did not get as far as subscribed

    # ---------------------------------------------------------- IUpstream

    @property
    def url(self) -> str:
        """The broker's URL without user name or password."""
        return self._broker.display

    @property
    def description(self) -> str:
        return f"MQTT broker at {self._broker.display} (topics {self._prefix}/<device>/...)"

    @property
    def available(self) -> bool:
        return self._up

    def send_command(self, command: UpstreamCommand) -> bool:
        """Publish one command at QoS 1; False at once if not connected."""
        client = self._client
        if not self._up or client is None:
            return False
        topic = command_topic(self._prefix, command.device_id)
        if topic is None:
            self.counters["commands_bad_device_id"] += 1
            return False
        try:
            data = encode_command(command)
        except (TypeError, ValueError):
            self.counters["commands_unencodable"] += 1
            log.emit(
                LogLevel.warn,
                "Command {command_id} for {device} is not JSON; not sent",
                command_id=command.command_id,
                device=command.device_id,
            )
            return False
        info = client.publish(topic, data, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.counters["commands_refused"] += 1
            return False
        self.counters["commands_out"] += 1
        return True

    def health(self) -> dict[str, Any]:
        return self._health(self._broker.display, topic_prefix=self._prefix)

    def __repr__(self) -> str:
        return f"<MqttLink {self._broker.display} {'up' if self._up else 'down'}>"

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        if self._password is not None and not self._broker.secure:
            log.emit(
                LogLevel.warn,
                "The MQTT password goes to {url} without TLS; use mqtts:// off this host",
                url=self._broker.display,
            )
        log.info("Connecting to {description}", description=self.description)
        self._dial()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        client = self._client
        if client is not None and self._socket is not None:
            if self._up and self._state_topic:
                client.publish(self._state_topic, self._state_message(False), qos=1, retain=True)
            client.disconnect()  # paho closes the socket once DISCONNECT is written
            self._stop_grace = self._reactor.callLater(
                STOP_GRACE, self._abort, client, "bridge stopping"
            )
        if self._socket is None and self._dialling is None:
            return succeed(None)
        self._stopped = Deferred()
        return self._stopped

    def _maybe_stopped(self) -> None:
        if self.running or self._socket is not None or self._dialling is not None:
            return
        if self._stop_grace is not None and self._stop_grace.active():
            self._stop_grace.cancel()
        self._stop_grace = None
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    # ------------------------------------------------------------- dialling

    def _new_client(self) -> paho.Client:
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,  # paho must never dial by itself: that would block
        )
        client.connect_timeout = self._connect_timeout
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if self._state_topic:
            client.will_set(self._state_topic, self._state_message(False), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        # Only records where to go; reconnect() below does the connecting.
        client.connect_async(self._broker.host, self._broker.port, keepalive=self._keepalive)
        return client

    def _dial(self) -> None:
        self._retry = None
        if not self.running:
            return
        client = self._new_client()
        self._client = client
        self.counters["dials"] += 1
        # TCP connect, TLS handshake and queueing CONNECT: the only blocking part.
        dialling = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), client.reconnect)
        self._dialling = dialling
        dialling.addCallbacks(
            self._socket_ready,
            self._dial_failed,
            callbackArgs=(client,),
            errbackArgs=(client,),
        )

    def _socket_ready(self, result: object, client: paho.Client) -> None:
        self._dialling = None
        sock = client.socket()
        if client is not self._client or not self.running or sock is None:
            self._discard(client)
            self._maybe_stopped()
            return
        descriptor = _PahoSocket(self, client, sock)
        self._socket = descriptor
        self._reactor.addReader(descriptor)
        if client.want_write():  # the CONNECT queued on the thread
            self._reactor.addWriter(descriptor)
        self._misc = LoopingCall(self._run_misc, client)
        self._misc.clock = self._reactor
        self._misc.start(MISC_INTERVAL, now=False)
        self._connack_timer = self._reactor.callLater(
            self._connect_timeout, self._abort, client, "the broker did not answer CONNECT"
        )

    def _dial_failed(self, reason: Failure, client: paho.Client) -> None:
        self._dialling = None
        self._discard(client)
        if client is self._client:
            self._client = None
        if not self.running:
            self._maybe_stopped()
            return
        self.counters["dial_failures"] += 1
        self._set_error(_dial_error(reason, self._broker))
        self._schedule_retry()

    def _discard(self, client: paho.Client) -> None:
        """Forget a client that never got a descriptor: no callbacks, socket closed."""
        client.on_socket_close = None
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        sock = client.socket()
        if sock is not None:
            sock.close()

    def _schedule_retry(self) -> None:
        if not self.running or self._retry is not None:
            return
        self._failures += 1
        delay = min(self._retry_policy(self._failures), MAX_RETRY_DELAY)
        self._retry = self._reactor.callLater(delay, self._dial)

    def _retry_delay(self, attempt: int) -> float:
        """The wait before dial ``attempt`` (1-based) of a losing streak; for tests."""
        return min(self._retry_policy(attempt), MAX_RETRY_DELAY)

    # ---------------------------------------------------------- socket I/O

    def _do_read(self, descriptor: _PahoSocket) -> None:
        client = descriptor.client
        rc = client.loop_read()
        # TLS may hold whole records the kernel no longer reports as readable.
        sock = client.socket()
        for _ in range(1000):
            if rc != paho.MQTT_ERR_SUCCESS or descriptor.closed or sock is None:
                break
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
            rc = client.loop_read()

    def _do_write(self, descriptor: _PahoSocket) -> None:
        descriptor.client.loop_write()

    def _run_misc(self, client: paho.Client) -> None:
        client.loop_misc()  # keepalive ping, and closing when its answer is overdue

    def _abort(self, client: paho.Client, why: str) -> None:
        """Close the connection now; paho notices on the read and cleans up."""
        descriptor = self._socket
        if descriptor is None or descriptor.client is not client or descriptor.closed:
            return
        if self.running:
            self._last_error = why
        sock = client.socket()
        if sock is not None:
            try:
                cast(socket.socket, sock).shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        client.loop_read()  # reads EOF: paho closes the socket and calls back
        if not descriptor.closed:  # paho saw buffered data instead; be blunt
            self._on_socket_close(client, None, sock)
            if sock is not None:
                sock.close()

    # ------------------------------------------------------ paho callbacks

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # On the dialling thread the reactor is not ours to touch; _socket_ready
        # registers for writing if CONNECT is still queued.
        descriptor = self._socket
        if threadable.isInIOThread() and descriptor is not None and descriptor.client is client:
            self._reactor.addWriter(descriptor)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        descriptor = self._socket
        if threadable.isInIOThread() and descriptor is not None and descriptor.client is client:
            self._reactor.removeWriter(descriptor)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        descriptor = self._socket
        if descriptor is None or descriptor.client is not client or descriptor.closed:
            return
        self._reactor.removeReader(descriptor)
        self._reactor.removeWriter(descriptor)
        descriptor.closed = True
        self._socket = None
        if self._misc is not None and self._misc.running:
            self._misc.stop()
        self._misc = None
        if self._connack_timer is not None and self._connack_timer.active():
            self._connack_timer.cancel()
        self._connack_timer = None
        if self._client is client:
            self._client = None
        was_up = self._up
        self._transition(False)
        if not self.running:
            self._maybe_stopped()
            return
        if was_up:
            self._last_error = self._last_error or "connection to the broker lost"
            log.emit(LogLevel.warn, "MQTT link lost: {error}", error=self._last_error)
        else:
            self.counters["handshake_failures"] += 1
            self._set_error(self._last_error or self._closed_early())
        self._schedule_retry()

    def _closed_early(self) -> str:
        """Why a connection may end before the broker accepts it, as a hint."""
        if self._broker.secure:
            hint = "does it require a client certificate? (--mqtt-cert, --mqtt-key)"
        else:
            hint = "is it a TLS port? (use mqtts://)"
        return f"the MQTT broker closed the connection before accepting it; {hint}"

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: Any,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self.counters["connects_refused"] += 1
            hint = ""
            if str(reason) in ("Not authorized", "Bad user name or password"):
                hint = (
                    "; check the user name in the URL and the password "
                    "(--mqtt-password-file or BRIDGE_MQTT_PASSWORD)"
                )
            self._last_error = f"the MQTT broker refused the connection: {reason}{hint}"
            return  # paho closes the socket next
        rc, _mid = client.subscribe(status_subscription(self._prefix), qos=1)
        if rc != paho.MQTT_ERR_SUCCESS:
            self._abort(client, f"cannot subscribe: {paho.error_string(rc)}")

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[Any],
        properties: Any,
    ) -> None:
        if any(r.is_failure for r in reasons):
            self._abort(
                client,
                f"the MQTT broker refused the subscription to "
                f"{status_subscription(self._prefix)} (check its ACL)",
            )
            return
        if self._connack_timer is not None and self._connack_timer.active():
            self._connack_timer.cancel()
        self._connack_timer = None
        self._failures = 0
        self._last_error = None
        self.counters["links_up"] += 1
        if self._state_topic:
            client.publish(self._state_topic, self._state_message(True), qos=1, retain=True)
        log.info("MQTT link up: {url}", url=self._broker.display)
        self._transition(True)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._malformed("a topic that is not UTF-8")
            return
        device = device_from_topic(self._prefix, topic)
        if device is None:
            self._malformed("a message on an unexpected topic")
            return
        try:
            status = decode_status(message.payload)
        except MalformedMessage as e:
            self._malformed(str(e))
            return
        command_id = status.command_id
        if message.retain:
            # A retained status is the device's last word from before we
            # subscribed: it is state, and confirms no command of ours.
            self.counters["retained_in"] += 1
            command_id = None
        self.counters["statuses_in"] += 1
        if self._listener is not None:
            try:
                self._listener.upstream_status(device, status.payload, command_id)
            except Exception:
                # A failing listener must not take the connection down with it.
                log.failure("Listener failed on a status for {device}", device=device)

    # -------------------------------------------------------------- state

    def _state_message(self, online: bool) -> bytes:
        return json.dumps(
            {"online": online, "client_id": self._client_id}, separators=(",", ":")
        ).encode("utf-8")

    def _set_error(self, message: str) -> None:
        self._last_error = message
        log.emit(LogLevel.warn, "{error}; retrying", error=message)
