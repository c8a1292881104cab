"""The replicas' shared line: Redis commands and pub/sub, reconnected forever.

Two connections per replica, each a :class:`ClientService` around a txredisapi
protocol: one for commands (``SET``, ``EVAL``, ``PUBLISH``), one subscribed to
the channels the replica listens on.  Every command fails at once while the
command connection is down instead of queueing: a lease renewal or a
forwarded command that waits for Redis to come back would act on stale state.
Keys and channels carry a prefix (``--redis-prefix``) so that several clusters,
or test runs, can share one Redis.

The bus is "up" while both connections are ready; its listeners hear every
change, which is how followers mark Node-RED-backed devices offline during an
outage and the leader re-announces its state when Redis returns.

What is published in one reactor turn goes out at the end of that turn, in
order; consecutive messages on a channel marked with :meth:`RedisBus.batch`
go as one ``PUBLISH`` of newline-separated messages (compact JSON has no raw
newline), so a leader fed a burst of statuses by Node-RED sends one message,
not one per status, and every replica handles it in one go.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

log = Logger(namespace="bridge.redis")

#: Seconds a command may take before the connection is taken for dead.
COMMAND_TIMEOUT = 2.0
#: Upper bound of the wait between two dials: an outage ends, replicas follow soon.
MAX_RETRY_DELAY = 2.0
#: At most this many messages, and about this many characters, in one batched
#: PUBLISH: a subscriber's output buffer in Redis stays far below its limits.
MAX_BATCH = 200
MAX_BATCH_CHARS = 64 * 1024

Handler = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    host: str
    port: int
    db: int
    tls: bool
    username: str | None
    password: str | None

    @property
    def display(self) -> str:
        """The URL without credentials, for logs and /healthz."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str, password: str | None = None) -> RedisTarget:
    """``redis://[user:password@]host[:port][/db]`` or ``rediss://`` (TLS).

    A password in the URL wins over ``password`` (``BRIDGE_REDIS_PASSWORD``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("the Redis URL must start with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError("the Redis URL has no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the Redis URL's path must be a database number")
    return RedisTarget(
        host=parts.hostname,
        port=parts.port or 6379,
        db=int(path or 0),
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else password,
    )


class _Commands(txredisapi.RedisProtocol):
    bus: RedisBus

    def itself(self) -> _Commands:
        """Through ClientService's proxy, the protocol itself (what connectionLost sees)."""
        return self

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.bus._lost(self, why)


class _Subscriber(txredisapi.SubscriberProtocol):
    bus: RedisBus

    def itself(self) -> _Subscriber:
        return self

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.bus._message(channel, message)

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.bus._lost(self, why)


class _Factory(Factory):
    noisy = False

    def __init__(self, bus: RedisBus, protocol: type[Any]) -> None:
        self.bus = bus
        self.kind = protocol

    def buildProtocol(self, addr: Any) -> Any:
        # AUTH and SELECT happen in prepareConnection, where a failure is ours
        # to log and retry, not the protocol's (which would stop a factory).
        proto = self.kind(charset="utf-8", convertNumbers=True)
        proto.factory = self
        proto.bus = self.bus
        return proto


class RedisBus(Service):
    """Commands and channels on one Redis, for one replica."""

    name = "redis"

    def __init__(
        self,
        url: str,
        reactor: Any,
        prefix: str = "bridge",
        password: str | None = None,
        ca_file: str | None = None,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        if password is None:
            password = os.environ.get("BRIDGE_REDIS_PASSWORD") or None
        self.target = parse_redis_url(url, password)
        self.reactor = reactor
        self.prefix = prefix
        self.command_timeout = command_timeout
        self.counters: Counter[str] = Counter()
        self.handlers: dict[str, Handler] = {}
        self.listeners: list[Callable[[bool], None]] = []
        # Published this turn, not yet sent: (channel, message), in order.
        self._outbox: list[tuple[str, str]] = []
        self._batched: set[str] = set()
        self._cmd: _Commands | None = None
        self._sub: _Subscriber | None = None
        self._up = False
        self._since: float | None = None
        self._last_error: str | None = None
        endpoint = self._endpoint(ca_file)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=MAX_RETRY_DELAY, factor=2.0)
        self._services = [
            ClientService(
                endpoint,
                _Factory(self, _Commands),
                retryPolicy=policy,
                clock=reactor,
                prepareConnection=self._prepare_commands,
            ),
            ClientService(
                endpoint,
                _Factory(self, _Subscriber),
                retryPolicy=policy,
                clock=reactor,
                prepareConnection=self._prepare_subscriber,
            ),
        ]

    def _endpoint(self, ca_file: str | None) -> Any:
        target = self.target
        endpoint: Any = HostnameEndpoint(self.reactor, target.host, target.port, timeout=5)
        if target.tls:
            if ca_file:
                with open(ca_file, "rb") as f:
                    trust: Any = Certificate.loadPEM(f.read())
            else:
                trust = platformTrust()
            endpoint = wrapClientTLS(optionsForClientTLS(target.host, trustRoot=trust), endpoint)
        return endpoint

    # --------------------------------------------------------------- names

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def on(self, channel: str, handler: Handler) -> None:
        """Listen on ``prefix:channel`` (before the service starts)."""
        self.handlers[self.key(channel)] = handler

    def batch(self, channel: str) -> None:
        """Let several messages on ``channel`` share a PUBLISH, one per line.

        Only for channels whose handlers split what they receive on newlines
        (:func:`messages`) and whose messages hold none.
        """
        self._batched.add(channel)

    # ------------------------------------------------------------ commands

    @property
    def up(self) -> bool:
        return self._up

    def execute(self, *args: Any) -> Deferred[Any]:
        """One command; fails at once while down, and after ``command_timeout``."""
        proto = self._cmd
        if proto is None:
            self.counters["commands_refused"] += 1
            return fail(txredisapi.ConnectionError("Redis is not connected"))
        d: Deferred[Any] = maybeDeferred(proto.execute_command, *args)
        d.addTimeout(self.command_timeout, self.reactor, onTimeoutCancel=self._timed_out(proto))
        return d

    def _timed_out(self, proto: _Commands) -> Callable[[Any, float], Any]:
        def timed_out(result: Any, timeout: float) -> Any:
            # A command unanswered that long: take the connection for half-open.
            self.counters["command_timeouts"] += 1
            self._last_error = f"no answer from Redis in {timeout:g} s"
            if proto.transport is not None:
                proto.transport.abortConnection()
            raise txredisapi.TimeoutError(self._last_error)

        return timed_out

    def publish(self, channel: str, message: str) -> None:
        """Fire and forget, sent at the end of this turn; lost while Redis is down (counted)."""
        if self._cmd is None:
            self.counters["publish_dropped"] += 1
            return
        if not self._outbox:
            self.reactor.callLater(0, self.flush)
        self._outbox.append((channel, message))

    def flush(self) -> None:
        """Send what was published, in order; runs at the end of the turn (and at stop)."""
        outbox, self._outbox = self._outbox, []
        i = 0
        while i < len(outbox):
            channel, message = outbox[i]
            j = i + 1
            if channel in self._batched:
                size = len(message)
                while (
                    j < len(outbox)
                    and j - i < MAX_BATCH
                    and outbox[j][0] == channel
                    and size + len(outbox[j][1]) < MAX_BATCH_CHARS
                ):
                    size += len(outbox[j][1]) + 1
                    j += 1
                if j - i > 1:
                    message = "\n".join(m for _, m in outbox[i:j])
                    self.counters["batched"] += j - i
            self._send(channel, message, j - i)
            i = j

    def _send(self, channel: str, message: str, count: int) -> None:
        if self._cmd is None:
            self.counters["publish_dropped"] += count
            return
        # No timeout here: under load a reply can lag behind a busy reactor, and
        # taking the connection down for that would lose every message after it.
        d = maybeDeferred(self._cmd.execute_command, "PUBLISH", self.key(channel), message)
        self.counters["published"] += count
        d.addErrback(self._publish_failed, count)

    def _publish_failed(self, failure: Failure, count: int) -> None:
        self.counters["publish_dropped"] += count

    # ---------------------------------------------------------- connections

    def _login(self, proto: Any) -> Deferred[Any]:
        target = self.target
        d: Deferred[Any] = Deferred()
        d.callback(None)
        if target.password is not None:
            if target.username:
                d.addCallback(
                    lambda _: proto.execute_command("AUTH", target.username, target.password)
                )
            else:
                d.addCallback(lambda _: proto.execute_command("AUTH", target.password))
        if target.db:
            d.addCallback(lambda _: proto.execute_command("SELECT", target.db))
        d.addErrback(self._login_failed, proto)
        return d

    def _login_failed(self, failure: Failure, proto: Any) -> Failure:
        self._set_error(f"Redis refused the connection: {failure.getErrorMessage()}")
        if proto.transport is not None:
            proto.transport.loseConnection()
        return failure

    def _prepare_commands(self, proto: Any) -> Deferred[Any]:
        d = self._login(proto)

        def ready(_: Any) -> None:
            self._cmd = proto.itself()
            self._changed()

        return d.addCallback(ready)

    def _prepare_subscriber(self, proto: Any) -> Deferred[Any]:
        d = self._login(proto)
        d.addCallback(lambda _: proto.subscribe(list(self.handlers)) if self.handlers else None)

        def ready(_: Any) -> None:
            self._sub = proto.itself()
            self._changed()

        return d.addCallback(ready)

    def _lost(self, proto: Any, why: Any) -> None:
        if proto is self._cmd:
            self._cmd = None
        elif proto is self._sub:
            self._sub = None
        else:
            return
        if self.running:
            reason = why.getErrorMessage() if isinstance(why, Failure) else str(why)
            self._set_error(f"connection to Redis lost: {reason}")
        self._changed()

    def _set_error(self, message: str) -> None:
        self._last_error = message
        if self.running:
            log.emit(LogLevel.warn, "{error}; reconnecting", error=message)

    def _changed(self) -> None:
        up = self._cmd is not None and self._sub is not None
        if up == self._up:
            return
        self._up = up
        self._since = time.time()
        self.counters["ups" if up else "downs"] += 1
        if up:
            self._last_error = None
            log.info("Redis up: {url}", url=self.target.display)
        elif self.running:
            log.emit(
                LogLevel.error,
                "Redis DOWN ({url}): replicas no longer share statuses or commands",
                url=self.target.display,
            )
        for listener in list(self.listeners):
            listener(up)

    def _message(self, channel: Any, message: Any) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode()
        handler = self.handlers.get(channel)
        if handler is None:
            return
        self.counters["received"] += 1
        if isinstance(message, bytes):
            message = message.decode()
        try:
            handler(message)
        except Exception:
            self.counters["handler_errors"] += 1
            log.failure("bus message on {channel} could not be handled", channel=channel)

    # -------------------------------------------------------------- service

    def startService(self) -> None:
        super().startService()
        log.info("Connecting to Redis at {url}", url=self.target.display)
        for service in self._services:
            service.startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        # Goodbyes published while the tree stops (lease release, device
        # clients gone) leave before the connections close.
        self.flush()
        return gatherResults([service.stopService() for service in self._services])

    def health(self) -> dict[str, Any]:
        return {
            "state": "up" if self._up else "down",
            "url": self.target.display,
            "prefix": self.prefix,
            "since": self._since,
            "last_error": self._last_error,
            "counters": dict(self.counters),
        }


def messages(text: str) -> list[str]:
    """The messages of one PUBLISH on a batched channel (see :meth:`RedisBus.batch`)."""
    return text.split("\n")
