"""twistd plugin: ``twistd -n bridge [options]`` (spec §9).

Kept tiny: Twisted imports every plugin module to list them, so heavy imports
(Django, the bridge itself) wait until the service is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Serve the Django site, protocol v1 WebSockets and the Node-RED link on one port."
    optFlags = [
        ["tls", None, "Serve HTTPS and WSS only (TLS 1.2+); bind all interfaces by default."],
        ["demo", None, "Create demo users and devices once; run the simulator unless --nodered."],
        ["anonymous", None, "Let anonymous viewers read public devices."],
    ]
    optParameters = [
        [
            "port",
            "p",
            None,
            "Port to listen on (0 picks a free one). Default 8443 with --tls, else 8000.",
            int,
        ],
        ["interface", "i", None, "Address to bind. Default 0.0.0.0 with --tls, else 127.0.0.1."],
        ["data-dir", "d", None, "State directory: database, secret key, certificates."],
        [
            "settings",
            None,
            None,
            "Django settings module of your own project (default: standalone site).",
        ],
        ["nodered", None, None, "ws:// or wss:// URL of Node-RED's websocket-in listener."],
        [
            "nodered-secret-file",
            None,
            None,
            "File holding the link secret (or env BRIDGE_NODERED_SECRET).",
        ],
        [
            "nodered-ca",
            None,
            None,
            "CA file to verify Node-RED's certificate (default: system roots).",
        ],
        ["nodered-cert", None, None, "Client certificate for mutual TLS with Node-RED."],
        ["nodered-key", None, None, "Private key of the client certificate."],
        [
            "nodered-admin",
            None,
            None,
            "http(s):// URL of Node-RED's editor (its httpAdminRoot), served at /nodered/ "
            "to users with the bridge.use_nodered permission.",
        ],
        [
            "nodered-payload-key-file",
            None,
            None,
            "AES-256-GCM key file: payloads cross the link sealed.",
        ],
        [
            "mqtt",
            None,
            None,
            "mqtt:// or mqtts:// broker URL: devices over MQTT instead of Node-RED.",
        ],
        [
            "mqtt-password-file",
            None,
            None,
            "File holding the MQTT password (or env BRIDGE_MQTT_PASSWORD).",
        ],
        ["mqtt-ca", None, None, "CA file to verify the broker's certificate (mqtts://)."],
        ["mqtt-cert", None, None, "Client certificate for the broker."],
        ["mqtt-key", None, None, "Private key of the MQTT client certificate."],
        [
            "mqtt-topic-prefix",
            None,
            "bridge",
            "Topics are PREFIX/<device>/command and PREFIX/<device>/status.",
        ],
        [
            "redis",
            None,
            None,
            "redis:// or rediss:// URL shared by replicas (password in the URL or env "
            "BRIDGE_REDIS_PASSWORD): one upstream link per cluster, statuses and commands "
            "shared.",
        ],
        ["redis-prefix", None, "bridge", "Prefix of this cluster's Redis keys and channels."],
        ["redis-ca", None, None, "CA file to verify Redis's certificate (rediss://)."],
        ["cert", None, None, "PEM certificate (chain) for --tls; default: generated self-signed."],
        [
            "metrics-token-file",
            None,
            None,
            "Bearer token for /metrics (or env BRIDGE_METRICS_TOKEN).",
        ],
        ["key", None, None, "PEM private key for --cert."],
        ["heartbeat", None, 30.0, "Heartbeat interval announced in HELLO, seconds.", float],
        ["resume-window", None, 60.0, "Seconds a dropped session stays resumable.", float],
        # Limits (SECURITY.md, "Limits and their defaults").
        ["max-connections", None, 20_000, "Open connections per process; past it HTTP 503.", int],
        [
            "max-sessions-per-user",
            None,
            100,
            "Live sessions per user; past it IDENTIFY is closed with 4008.",
            int,
        ],
        ["max-message-size", None, 65_536, "Bytes per inbound message; past it 4010.", int],
        ["frames-per-second", None, 50.0, "Inbound frames per connection per second.", float],
        ["frames-burst", None, 200, "Inbound frames a connection may send at once (4008).", int],
        ["identify-timeout", None, 10.0, "Seconds to IDENTIFY or RESUME (4006).", float],
        ["handshake-timeout", None, 10.0, "Seconds for the WebSocket opening handshake.", float],
        [
            "connect-rate",
            None,
            50.0,
            "New WebSocket/SSE connections per client address per second (HTTP 429); 0: off.",
            float,
        ],
        ["connect-burst", None, 500, "New connections one address may open at once.", int],
        [
            "slow-viewer-frames",
            None,
            1000,
            "Frames held for a connection that cannot keep up; past it 4008.",
            int,
        ],
        [
            "slow-viewer-seconds",
            None,
            30.0,
            "Seconds a connection may stay unable to keep up; past it 4008.",
            float,
        ],
    ]

    #: Each limit's smallest sensible value.
    minimums = {
        "max-connections": 1,
        "max-sessions-per-user": 1,
        "max-message-size": 1024,
        "frames-per-second": 0.1,
        "frames-burst": 1,
        "identify-timeout": 1.0,
        "handshake-timeout": 1.0,
        "connect-rate": 0.0,
        "connect-burst": 1,
        "slow-viewer-frames": 10,
        "slow-viewer-seconds": 1.0,
        "heartbeat": 1.0,
        "resume-window": 1.0,
    }

    def __init__(self) -> None:
        super().__init__()
        self["allowed-origins"] = []

    def opt_allow_origin(self, origin: str) -> None:
        """Also accept WebSockets from this Origin (repeatable)."""
        self["allowed-origins"].append(origin)

    def postOptions(self) -> None:
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        if self["nodered"] and not self["nodered"].startswith(("ws://", "wss://")):
            raise usage.UsageError("--nodered must be a ws:// or wss:// URL")
        if self["nodered-admin"] and not self["nodered-admin"].startswith(("http://", "https://")):
            raise usage.UsageError("--nodered-admin must be an http:// or https:// URL")
        if self["nodered"] and self["mqtt"]:
            raise usage.UsageError("--nodered and --mqtt exclude each other: one upstream")
        if self["mqtt"] and not self["mqtt"].startswith(("mqtt://", "mqtts://")):
            raise usage.UsageError("--mqtt must be an mqtt:// or mqtts:// URL")
        if self["nodered-payload-key-file"] and not self["nodered"]:
            raise usage.UsageError("--nodered-payload-key-file needs --nodered")
        if self["redis"] and not self["redis"].startswith(("redis://", "rediss://")):
            raise usage.UsageError("--redis must be a redis:// or rediss:// URL")
        if self["port"] is not None and not 0 <= self["port"] <= 65535:
            raise usage.UsageError("--port must be between 0 and 65535")
        for name, least in self.minimums.items():
            if self[name] < least:
                raise usage.UsageError(f"--{name} must be at least {least:g}")
        if self["max-message-size"] > 16 * 1024 * 1024:
            raise usage.UsageError("--max-message-size must be at most 16 MiB")


@implementer(IServiceMaker, IPlugin)
class BridgeServiceMaker:
    tapname = "bridge"
    description = "bridge: Django, WebSockets and Node-RED in one Twisted process."
    options = Options

    def makeService(self, options: Options) -> Any:
        from bridge.service import Settings, make_service

        return make_service(
            Settings(
                tls=bool(options["tls"]),
                port=options["port"],
                interface=options["interface"],
                data_dir=Path(options["data-dir"]) if options["data-dir"] else None,
                settings=options["settings"],
                nodered=options["nodered"],
                nodered_secret_file=options["nodered-secret-file"],
                nodered_ca=options["nodered-ca"],
                nodered_cert=options["nodered-cert"],
                nodered_key=options["nodered-key"],
                nodered_payload_key_file=options["nodered-payload-key-file"],
                nodered_admin=options["nodered-admin"],
                mqtt=options["mqtt"],
                mqtt_password_file=options["mqtt-password-file"],
                mqtt_ca=options["mqtt-ca"],
                mqtt_cert=options["mqtt-cert"],
                mqtt_key=options["mqtt-key"],
                mqtt_topic_prefix=options["mqtt-topic-prefix"],
                redis=options["redis"],
                redis_prefix=options["redis-prefix"],
                redis_ca=options["redis-ca"],
                demo=bool(options["demo"]),
                cert=options["cert"],
                key=options["key"],
                anonymous=bool(options["anonymous"]),
                metrics_token_file=options["metrics-token-file"],
                heartbeat=options["heartbeat"],
                resume_window=options["resume-window"],
                max_connections=options["max-connections"],
                max_sessions_per_user=options["max-sessions-per-user"],
                max_message_size=options["max-message-size"],
                frames_per_second=options["frames-per-second"],
                frames_burst=options["frames-burst"],
                identify_timeout=options["identify-timeout"],
                handshake_timeout=options["handshake-timeout"],
                connect_rate=options["connect-rate"],
                connect_burst=options["connect-burst"],
                slow_viewer_frames=options["slow-viewer-frames"],
                slow_viewer_seconds=options["slow-viewer-seconds"],
                allowed_origins=list(options["allowed-origins"]),
            )
        )


serviceMaker = BridgeServiceMaker()
