"""A raw Autobahn (Twisted) broadcaster: the performance ceiling for the bridge.

It speaks just the subset of protocol v1 the fan-out benchmark uses, with none
of the bridge's work (no Django, no permissions, no history, no slow-viewer
policy, no heartbeat timeout):

* ``/ws/``: HELLO; IDENTIFY with any token (or RESUME) answered by EVENT READY;
  SUBSCRIBE answered by one EVENT SUBSCRIBED per device (empty history);
  UNSUBSCRIBE by UNSUBSCRIBED; HEARTBEAT by HEARTBEAT_ACK; COMMAND forwarded
  upstream with COMMAND_RESULT ``sent`` and ``confirmed`` when the echo comes.
* STATUS fan-out: every status from the upstream link is encoded once and then
  only numbered per connection (``s``), like the bridge's pre-encoded bodies,
  and written to the transport as a ready-made WebSocket frame (as the bridge
  does; ``--autobahn-send`` uses Autobahn's ``sendMessage`` instead).
* Garbage collection tuned as the bridge's ``bridge.watchdog.install`` does
  (start-up objects frozen, thresholds 5000/20/100; ``--default-gc`` keeps
  CPython's defaults), so that the ceiling's latency is not its collector's.
* It dials the upstream like the bridge dials Node-RED
  (``--nodered ws://127.0.0.1:PORT/ws/bridge``), redialling every second.
* ``--port 0`` binds a free port and prints ``listening on http(s)://host:port/``
  like the bridge, so ``bench/fanout.py --server ceiling`` can drive it.
* ``--tls`` serves wss with a self-signed certificate kept in
  ``<data-dir>/tls/cert.pem`` and ``key.pem`` (generated if missing).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import ipaddress
import json
import os
import secrets
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
    connectWS,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import reactor as _reactor
from twisted.python import log
from twisted.python.failure import Failure

# Twisted's reactor interfaces are zope interfaces, which mypy cannot check.
reactor: Any = _reactor
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Hub:
    """Who is subscribed to what, and the upstream link."""

    def __init__(
        self, heartbeat_interval: int, drop_every: int = 0, direct_writes: bool = True
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.drop_every = drop_every
        self.direct_writes = direct_writes
        self.subscribers: dict[str, set[Viewer]] = {}
        self.known: dict[str, None] = {}
        self.link: UpstreamLink | None = None
        self.pending: dict[str, tuple[Viewer, str, str]] = {}
        self.statuses = 0
        self.dropped = 0

    def status(self, device: str, payload: Any, command_id: str | None) -> None:
        self.statuses += 1
        self.known[device] = None
        by = None
        if command_id is not None and command_id in self.pending:
            viewer, client_id, _ = self.pending.pop(command_id)
            by = "bench"
            viewer.event(
                "COMMAND_RESULT",
                {
                    "id": client_id,
                    "command_id": command_id,
                    "device": device,
                    "result": "confirmed",
                    "detail": "",
                },
            )
        viewers = self.subscribers.get(device)
        if self.drop_every and self.statuses % self.drop_every == 0:
            viewers = None  # --drop-every: a deliberate loss, to check the bench's accounting
        if not viewers:
            self.dropped += 1
            return
        body = _dumps(
            {
                "device": device,
                "payload": payload,
                "ts": time.time_ns() // 1_000_000,
                "by": by,
                "command_id": command_id if by else None,
            }
        ).encode()
        head = b'{"op":5,"d":' + body + b',"s":'
        if self.direct_writes:
            for viewer in viewers:
                viewer.seq += 1
                transport = viewer.transport
                if viewer.state == viewer.STATE_OPEN and transport is not None:
                    transport.write(text_frame(head + str(viewer.seq).encode() + b"}"))
            return
        for viewer in viewers:
            viewer.seq += 1
            viewer.sendMessage(head + str(viewer.seq).encode() + b"}")

    def command(self, viewer: Viewer, d: Any) -> None:
        if not isinstance(d, dict):
            return
        device, client_id = str(d.get("device")), str(d.get("id"))
        command_id = secrets.token_hex(16)
        result = "sent"
        if self.link is None:
            result = "upstream_unavailable"
        else:
            self.pending[command_id] = (viewer, client_id, device)
            self.link.sendMessage(
                _dumps(
                    {
                        "group_id": device,
                        "payload": d.get("payload"),
                        "user": "bench",
                        "command_id": command_id,
                        "ts": time.time_ns() // 1_000_000,
                    }
                ).encode()
            )
        viewer.event(
            "COMMAND_RESULT",
            {
                "id": client_id,
                "command_id": command_id,
                "device": device,
                "result": result,
                "detail": "",
            },
        )


class Viewer(WebSocketServerProtocol):
    hub: Hub

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn 26.10 tries setTcpNoDelay before it has copied the factory's
        # tcpNoDelay option, fails silently and leaves Nagle on: 40 ms stalls.
        transport: Any = self.transport
        transport.setTcpNoDelay(True)

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path not in ("/ws/", "/ws"):
            raise ConnectionDeny(404, f"nothing at {request.path}")
        self.seq = 0
        self.ready = False
        self.devices: set[str] = set()
        self.session_id = secrets.token_urlsafe(16)

    def onOpen(self) -> None:
        self.send(
            {
                "op": 0,
                "d": {
                    "heartbeat_interval": self.hub.heartbeat_interval,
                    "session_id": self.session_id,
                    "protocol": 1,
                },
            }
        )

    def send(self, frame: dict[str, Any]) -> None:
        self.sendMessage(_dumps(frame).encode())

    def event(self, name: str, d: Any) -> None:
        self.seq += 1
        self.send({"op": 6, "d": d, "s": self.seq, "t": name})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = json.loads(payload)
            op = frame["op"]
        except (ValueError, KeyError, TypeError):
            self.sendClose(4002, "decode error")
            return
        d = frame.get("d")
        if op == 1:
            self.send({"op": 2, "d": None})
        elif op in (3, 9):
            if self.ready:
                self.sendClose(4005, "already authenticated")
                return
            self.ready = True
            devices = [
                {
                    "id": dev,
                    "name": dev,
                    "kind": "sensor",
                    "permission": "read",
                    "online": self.hub.link is not None,
                    "history_size": 0,
                }
                for dev in self.hub.known
            ]
            self.event(
                "READY",
                {
                    "user": {"id": 1, "username": "bench"},
                    "role": "operator",
                    "devices": devices,
                    "session_id": self.session_id,
                },
            )
        elif not self.ready:
            self.sendClose(4006, "not authenticated")
        elif op == 7:
            for dev in _device_list(d):
                if dev not in self.devices:
                    self.devices.add(dev)
                    self.hub.subscribers.setdefault(dev, set()).add(self)
                self.event("SUBSCRIBED", {"device": dev, "permission": "read", "history": []})
        elif op == 8:
            for dev in _device_list(d):
                self._drop(dev)
                self.event("UNSUBSCRIBED", {"device": dev})
        elif op == 4:
            self.hub.command(self, d)
        elif op == 2:
            pass
        else:
            self.sendClose(4001, "unknown op")

    def _drop(self, dev: str) -> None:
        self.devices.discard(dev)
        viewers = self.hub.subscribers.get(dev)
        if viewers is not None:
            viewers.discard(self)
            if not viewers:
                del self.hub.subscribers[dev]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        for dev in list(getattr(self, "devices", ())):
            self._drop(dev)


def _device_list(d: Any) -> list[str]:
    if isinstance(d, dict) and isinstance(d.get("devices"), list):
        return [str(x) for x in d["devices"]]
    return []


class UpstreamLink(WebSocketClientProtocol):
    hub: Hub

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        transport.setTcpNoDelay(True)  # see Viewer.connectionMade

    def onOpen(self) -> None:
        self.hub.link = self
        log.msg("upstream link up")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if isinstance(msg, dict) and isinstance(msg.get("group_id"), str):
            self.hub.status(msg["group_id"], msg.get("payload"), msg.get("command_id"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.hub.link is self:
            self.hub.link = None
            log.msg(f"upstream link down ({code} {reason})")


class RedialFactory(WebSocketClientFactory):
    """Redials the upstream every second, forever."""

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        reactor.callLater(1.0, connector.connect)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        reactor.callLater(1.0, connector.connect)


def ensure_cert(data_dir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made once per data dir."""
    tls = data_dir / "tls"
    cert_path, key_path = tls / "cert.pem", tls / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    tls.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--nodered", help="upstream URL, e.g. ws://127.0.0.1:8765/ws/bridge")
    parser.add_argument("--tls", action="store_true", help="serve wss with a self-signed cert")
    parser.add_argument("--data-dir", help="where tls/cert.pem and tls/key.pem live")
    parser.add_argument("--heartbeat-interval", type=int, default=41250, help="ms")
    parser.add_argument(
        "--drop-every",
        type=int,
        default=0,
        metavar="N",
        help="drop every Nth status from upstream (checks the benchmark's loss accounting)",
    )
    parser.add_argument(
        "--autobahn-send",
        action="store_true",
        help="fan out with Autobahn's sendMessage instead of writing frames to the transport",
    )
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's garbage collector settings"
    )
    args = parser.parse_args(argv)

    log.startLogging(sys.stdout)
    hub = Hub(args.heartbeat_interval, args.drop_every, not args.autobahn_send)
    scheme = "https" if args.tls else "http"

    factory = WebSocketServerFactory(f"{'wss' if args.tls else 'ws'}://{args.interface}/ws/")

    class BoundViewer(Viewer):
        pass

    BoundViewer.hub = hub
    factory.protocol = BoundViewer
    factory.setProtocolOptions(
        utf8validateIncoming=False,
        openHandshakeTimeout=30,
        tcpNoDelay=True,
    )
    if args.tls:
        from twisted.internet import ssl

        data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="ceiling-"))
        cert_path, key_path = ensure_cert(data_dir)
        pem = cert_path.read_bytes() + key_path.read_bytes()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(args.port, factory, options, interface=args.interface)
    else:
        port = reactor.listenTCP(args.port, factory, interface=args.interface)
    bound = port.getHost().port
    log.msg(f"ceiling_autobahn listening on {scheme}://{args.interface}:{bound}/")

    if args.nodered:

        class BoundLink(UpstreamLink):
            pass

        BoundLink.hub = hub
        client = RedialFactory(args.nodered)
        client.protocol = BoundLink
        client.setProtocolOptions(tcpNoDelay=True, utf8validateIncoming=False)
        connectWS(client)

    if not args.default_gc:
        gc.collect()
        gc.freeze()
        gc.set_threshold(5000, 20, 100)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
