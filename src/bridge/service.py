"""Assemble one bridge process: pools, hub, upstream, site and listener.

Everything is a twisted.application service, so twistd starts it in order and
stops it in reverse, each step finished before the next begins: the listener
closes first (clients are told 1001), then the upstream link, then the vault
keeps the sessions for RESUME, and the store flushes last.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.wsgi import WSGIResource

from bridge.session import Limits

log = Logger()


@dataclass
class Settings:
    """Everything the command line decides (spec §9)."""

    tls: bool = False
    port: int | None = None
    interface: str | None = None
    data_dir: Path | None = None
    settings: str | None = None
    nodered: str | None = None
    nodered_secret_file: str | None = None
    nodered_ca: str | None = None
    nodered_cert: str | None = None
    nodered_key: str | None = None
    nodered_payload_key_file: str | None = None
    nodered_admin: str | None = None
    mqtt: str | None = None
    mqtt_password_file: str | None = None
    mqtt_ca: str | None = None
    mqtt_cert: str | None = None
    mqtt_key: str | None = None
    mqtt_topic_prefix: str = "bridge"
    redis: str | None = None
    redis_prefix: str = "bridge"
    redis_ca: str | None = None
    demo: bool = False
    cert: str | None = None
    key: str | None = None
    anonymous: bool = False
    metrics_token_file: str | None = None
    heartbeat: float = 30.0
    resume_window: float = 60.0
    allowed_origins: list[str] = field(default_factory=list)
    max_connections: int = 20_000
    max_sessions_per_user: int = 100
    max_message_size: int = 64 * 1024
    frames_per_second: float = 50.0
    frames_burst: int = 200
    identify_timeout: float = 10.0
    handshake_timeout: float = 10.0
    connect_rate: float = 50.0
    connect_burst: int = 500
    slow_viewer_frames: int = 1000
    slow_viewer_seconds: float = 30.0

    @property
    def bind(self) -> str:
        if self.interface is not None:
            return self.interface
        return "0.0.0.0" if self.tls else "127.0.0.1"

    @property
    def bind_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8443 if self.tls else 8000


class OrderlyService(MultiService):
    """Stops its children one after the other, in reverse order, each one finished.

    MultiService starts every child's stop at once; here the vault must keep
    the sessions after the upstream is down and before Redis is, and the store
    must flush after both.
    """

    step_timeout = 15.0

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            d = maybeDeferred(service.stopService)
            d.addTimeout(self.step_timeout, self._reactor())
            try:
                yield d
            except Exception:
                log.failure("stopping {name} failed", name=service.name)

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor


class Listener(Service):
    """Binds the port and logs the URL, including the one ``--port 0`` chose."""

    name = "listener"

    def __init__(self, reactor: Any, site: Any, config: Settings, tls_options: Any) -> None:
        self.reactor = reactor
        self.site = site
        self.config = config
        self.tls_options = tls_options
        self.port: IListeningPort | None = None
        self.on_start: list[Any] = []
        self.on_stop: list[Any] = []

    def startService(self) -> None:
        super().startService()
        for callback in self.on_start:
            callback()
        config = self.config
        if self.tls_options is not None:
            endpoint: Any = endpoints.SSL4ServerEndpoint(
                self.reactor, config.bind_port, self.tls_options, interface=config.bind
            )
        else:
            endpoint = endpoints.TCP4ServerEndpoint(
                self.reactor, config.bind_port, interface=config.bind
            )
        d = endpoint.listen(self.site)

        def listening(port: IListeningPort) -> None:
            self.port = port
            host = port.getHost()
            shown = "127.0.0.1" if host.host == "0.0.0.0" else host.host  # type: ignore[attr-defined]
            scheme = "https" if self.tls_options is not None else "http"
            log.info(
                "bridge listening on {url} (interface {iface})",
                url=f"{scheme}://{shown}:{host.port}/",  # type: ignore[attr-defined]
                iface=config.bind,
            )
            if self.tls_options is None and config.bind == "127.0.0.1":
                log.info("no --tls: bound to 127.0.0.1 only; use --tls to serve other hosts")

        def failed(f: Any) -> None:
            log.failure(
                "could not listen on {iface}:{port}", f, iface=config.bind, port=config.bind_port
            )
            self.reactor.stop()

        d.addCallbacks(listening, failed)

    def stopService(self) -> Any:
        super().stopService()
        # A callback may return a Deferred (the 1001 closes going out): the
        # services below stop, and the reactor with them, only after it.
        waits = [callback() for callback in self.on_stop]
        if self.port is not None:
            waits.append(self.port.stopListening())
        return defer.gatherResults([w for w in waits if isinstance(w, defer.Deferred)])


def provision_demo(data_dir: Path) -> dict[str, str]:
    """Demo users, devices and grants, created once; passwords kept 0600."""
    from django.contrib.auth import get_user_model

    from bridge.config import write_private
    from bridge.devices.models import Device, Grant

    User = get_user_model()
    secrets_file = data_dir / "demo-passwords.json"
    if secrets_file.exists():
        return dict(json.loads(secrets_file.read_text()))
    passwords = {name: secrets.token_urlsafe(12) for name in ("admin", "operator", "viewer")}
    users = {}
    for name, password in passwords.items():
        user, _ = User._default_manager.get_or_create(username=name)
        user.is_staff = user.is_superuser = name == "admin"
        user.set_password(password)
        user.save()
        users[name] = user
    toggle = Device.objects.create(name="Demo toggle", kind="toggle", history_size=20)
    dimmer = Device.objects.create(name="Demo dimmer", kind="dimmer", history_size=20)
    sensor = Device.objects.create(name="Demo temperature", kind="sensor", history_size=60)
    for device, level in ((toggle, Grant.CHANGE), (dimmer, Grant.CHANGE), (sensor, Grant.READ)):
        Grant.objects.create(device=device, user=users["operator"], permission=level)
    for device in (toggle, dimmer, sensor):
        Grant.objects.create(device=device, user=users["viewer"], permission=Grant.READ)
    write_private(secrets_file, json.dumps(passwords).encode())
    return passwords


def make_service(config: Settings, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from bridge.config import configure, is_standalone, load_secret

    data_dir = configure(config.data_dir, config.settings, tls=config.tls)

    from django.conf import settings as django_settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.management import call_command

    from bridge import store
    from bridge.changes import ChangeFeed, Reconciler
    from bridge.grants import GrantsCache
    from bridge.hub import Hub
    from bridge.metrics import MetricsResource, bridge_collector, staff_session
    from bridge.simulator import Simulator
    from bridge.site import BridgeSite, JSONResource, Root, StaticFiles, django_static_finder
    from bridge.sse import EventStream
    from bridge.threads import PoolService
    from bridge.websocket import BridgeWebSocketFactory, BridgeWebSocketResource, EdgeConfig

    if is_standalone():
        call_command("migrate", interactive=False, verbosity=0)
    if config.anonymous:
        django_settings.BRIDGE_ANONYMOUS = True
    if config.demo:
        for name, password in provision_demo(data_dir).items():
            log.info("demo user {name} password {password}", name=name, password=password)

    top = OrderlyService()
    wsgi_pool = PoolService(reactor, "wsgi", 1, 10)
    db_pool = PoolService(reactor, "db", 1, 4)
    wsgi_pool.setServiceParent(top)
    db_pool.setServiceParent(top)

    recorder = store.Store(db_pool, reactor)
    upstream: Any
    if config.nodered:
        from bridge.envelope import PayloadCipher
        from bridge.nodered import NodeRedLink

        upstream = NodeRedLink(
            config.nodered,
            reactor=reactor,
            secret=load_secret(config.nodered_secret_file),
            ca_file=config.nodered_ca,
            client_cert=config.nodered_cert,
            client_key=config.nodered_key,
            cipher=(
                PayloadCipher.from_file(config.nodered_payload_key_file)
                if config.nodered_payload_key_file
                else None
            ),
        )
    elif config.mqtt:
        from bridge.mqtt import MqttLink

        upstream = MqttLink(
            config.mqtt,
            reactor=reactor,
            password=load_secret(config.mqtt_password_file, env_var="BRIDGE_MQTT_PASSWORD"),
            ca_file=config.mqtt_ca,
            client_cert=config.mqtt_cert,
            client_key=config.mqtt_key,
            topic_prefix=config.mqtt_topic_prefix,
        )
    else:
        upstream = None
    hub = Hub(reactor, None, recorder)
    if upstream is None:
        upstream = Simulator(reactor, lambda: [s.config for s in hub.devices.values()])
    bus: Any = None
    lease: Any = None
    presence: Any = None
    if config.redis:
        from bridge.leader import ClusterUpstream, LeaderLease
        from bridge.presence import DevicePresence
        from bridge.redisbus import RedisBus

        # Replicas share one upstream link, held by whichever replica leads,
        # and know which replica holds each device client.
        bus = RedisBus(config.redis, reactor, prefix=config.redis_prefix, ca_file=config.redis_ca)
        lease = LeaderLease(bus, reactor)
        upstream = ClusterUpstream(upstream, bus, lease, reactor)
        presence = DevicePresence(bus, reactor, lease.replica_id)
        log.info("replica {me}: Redis at {url}", me=lease.replica_id, url=bus.target.display)
    hub.upstream = upstream
    upstream.attach(hub)
    if presence is not None:
        presence.attach(hub)
    recorder.history_size = lambda device_id: (
        state.config.history_size if (state := hub.devices.get(device_id)) else None
    )
    for device_config, history in store.load_devices():
        hub.set_device(device_config, history)
    from django.db import connections

    # Start-up's queries ran on this (the reactor's) thread, which makes no
    # more: its connection would only count against max_connections.
    connections.close_all()
    log.info("{n} devices loaded; upstream: {up}", n=len(hub.devices), up=upstream.description)

    edge = EdgeConfig(
        limits=Limits(
            heartbeat_interval=config.heartbeat,
            resume_window=config.resume_window,
            identify_timeout=config.identify_timeout,
            frames_per_second=config.frames_per_second,
            frames_burst=config.frames_burst,
            max_pending=config.slow_viewer_frames,
            max_behind_seconds=config.slow_viewer_seconds,
        ),
        max_message_size=config.max_message_size,
        max_connections=config.max_connections,
        max_per_user=config.max_sessions_per_user,
        connect_rate=config.connect_rate,
        connect_burst=config.connect_burst,
        handshake_timeout=config.handshake_timeout,
        allowed_origins=frozenset(
            o.rstrip("/").lower()
            for o in [
                *config.allowed_origins,
                *getattr(django_settings, "BRIDGE_ALLOWED_ORIGINS", []),
            ]
        ),
        secure=config.tls,
    )
    from bridge.vault import FileVault, RedisVault, Vault

    vault: Vault
    if bus is not None:
        vault = RedisVault(bus, hub, edge.limits, reactor, lease.replica_id)
    else:
        vault = FileVault(data_dir / "sessions.json", hub, edge.limits)
    grants = GrantsCache(db_pool, reactor)
    factory = BridgeWebSocketFactory(
        hub, db_pool, recorder, edge, reactor, vault=vault, grants=grants
    )
    events = EventStream(
        hub, db_pool, recorder, edge.limits, reactor, connects=factory.connects, grants=grants
    )
    reconciler = Reconciler(hub, db_pool, reactor, grants)
    feed = ChangeFeed(db_pool, reactor, reconciler.apply, fresh=grants.fresh)

    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "upstream": upstream.health(),
            "redis": bus.health() if bus is not None else {"state": "disabled"},
            **({"device_clients": presence.health()} if presence is not None else {}),
            "role": lease.role if lease is not None else "leader",
            "sessions": {"live": len(hub.sessions), **vault.health()},
            "connections": len(factory.connections),
            "devices": len(hub.devices),
            "store_backlog": recorder.backlog,
            "database": db_pool.database_health(),
        }

    static_root = getattr(django_settings, "STATIC_ROOT", None)
    wsgi = WSGIResource(reactor, wsgi_pool.pool, WSGIHandler())
    root = Root(
        wsgi,
        {
            b"ws": BridgeWebSocketResource(factory),
            b"events": events,
            b"metrics": MetricsResource(
                bridge_collector(
                    hub, factory, events, upstream, recorder, {"db": db_pool, "wsgi": wsgi_pool}
                ),
                lambda key: db_pool.orm(staff_session, key),
                load_secret(config.metrics_token_file, "BRIDGE_METRICS_TOKEN"),
            ),
            b"healthz": JSONResource(health),
            b"static": StaticFiles(
                Path(static_root) if static_root else None, django_static_finder
            ),
        },
    )
    if config.nodered_admin:
        from bridge.editor import editor_resource

        root.putChild(
            b"nodered",
            editor_resource(
                reactor, db_pool, config.nodered_admin, allowed_origins=edge.allowed_origins
            ),
        )
        django_settings.BRIDGE_NODERED_EDITOR = "/nodered/"
        log.info("Node-RED editor at /nodered/ -> {url}", url=config.nodered_admin)
    site = BridgeSite(root)
    site.displayTracebacks = False

    tls_options = None
    if config.tls:
        from bridge.tls import ensure_certificate, server_options

        if config.cert and config.key:
            cert_path, key_path = Path(config.cert), Path(config.key)
        else:
            cert_path, key_path = ensure_certificate(data_dir)
        tls_options = server_options(cert_path, key_path)

    # Start order: pools, store, bus, vault, upstream, feed, listener; stop is the reverse.
    recorder.setServiceParent(top)
    if bus is not None:
        bus.setServiceParent(top)
    vault.setServiceParent(top)
    upstream.setServiceParent(top)
    if presence is not None:
        presence.setServiceParent(top)
    feed.setServiceParent(top)
    listener = Listener(reactor, site, config, tls_options)
    listener.on_start.append(factory.start)
    listener.on_start.append(events.start)
    listener.on_stop.append(events.stop)
    listener.on_stop.append(factory.going_away)
    listener.on_stop.append(factory.stop)
    listener.setServiceParent(top)
    from bridge import watchdog

    watchdog.install()
    listener.on_start.append(lambda: watchdog.stall_dumps(reactor))
    return top
