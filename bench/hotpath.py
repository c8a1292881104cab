"""The bridge's per-status and per-delivery cost, in-process, without a network.

Drives the real code from the Node-RED link's bytes to the viewers' WebSocket
frames: a :class:`bridge.nodered.NodeRedLink` protocol after a real handshake
is fed the stand-in's status frames (``dataReceived``), the hub fans them out
to sessions attached to real :class:`bridge.websocket.BridgeServerProtocol`
connections (handshaken too), whose transports count the bytes written.
Twisted's own socket write and TLS are outside it: what is measured is the
bridge's Python work, the part its design decides.

    python bench/hotpath.py                       # per status (5 viewers) and per delivery
    python bench/hotpath.py --viewers 1000 --statuses 20000
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \\
        python bench/hotpath.py --statuses 2000 --repeat 1   # repeatable instruction counts

It prints µs per status at two fan-outs and the per-delivery slope between
them (CPU time: ``time.process_time``; best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent)]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Sink:
    """A transport that keeps nothing: counts bytes, takes producers."""

    disconnecting = False

    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0
        self.producer: Any = None
        self.captured = b""
        self.capture = True

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.writes += 1
        if self.capture:
            self.captured += data

    def writeSequence(self, seq: Any) -> None:
        for data in seq:
            self.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getPeer(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 8000)

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass


def server_frame(payload: bytes) -> bytes:
    """An unmasked text frame, as the stand-in (a WebSocket server) sends."""
    from bridge.transport import text_frame

    return text_frame(payload)


def masked_frame(payload: bytes) -> bytes:
    """A masked client text frame (mask of zeros keeps the payload as it is)."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def setup() -> None:
    os.environ.pop("DATABASE_URL", None)
    from bridge.config import configure

    configure(Path(tempfile.mkdtemp(prefix="hotpath-")), "django_site.settings")


def tcp_pairs(n: int) -> list[tuple[Any, Any]]:
    """``n`` connected loopback TCP socket pairs (server end, client end), non-blocking."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    pairs = []
    for _ in range(n):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for sock in (server, client):
            sock.setblocking(False)
        pairs.append((server, client))
    listener.close()
    return pairs


def drain(conns: list[Any]) -> None:
    """What the reactor and the viewers would do: flush Twisted's buffers, read."""
    for conn in conns:
        transport = conn.transport
        if getattr(transport, "_tempDataLen", 0) or getattr(transport, "dataBuffer", b""):
            transport.doWrite()
        peer = getattr(conn, "peer_socket", None)
        while peer is not None:
            try:
                if len(peer.recv(1 << 16)) < 1 << 16:
                    break
            except BlockingIOError:
                break


def build(
    viewers: int, devices: int, subs: int, sockets: bool = False
) -> tuple[Any, Any, list[Any], list[str]]:
    from twisted.internet import task

    from bridge import nodered
    from bridge.hub import DeviceConfig, Hub
    from bridge.session import DeviceView, Identity, Permission, Role
    from bridge.threads import PoolService
    from bridge.websocket import BridgeWebSocketFactory, EdgeConfig

    clock = task.Clock()
    clock.advance(1_700_000_000)
    link = nodered.NodeRedLink("ws://127.0.0.1:1880/ws/bridge", reactor=clock)
    hub = Hub(clock, link)
    link.attach(hub)
    ids = [f"dev-{i:04d}" for i in range(devices)]
    for d in ids:
        hub.set_device(DeviceConfig(d, d, "sensor", history_size=10))
    hub.upstream_state(True)

    # The link: a real Autobahn client protocol, handshaken against a canned 101.
    proto = link._factory.buildProtocol(None)
    t = Sink()
    proto.makeConnection(t)
    request = t.captured.decode()
    key = next(
        line.split(":", 1)[1].strip()
        for line in request.split("\r\n")
        if line.lower().startswith("sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    proto.dataReceived(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    assert proto.state == proto.STATE_OPEN, proto.state
    t.capture = False

    # Every viewer comes from one address: no per-address connection budget here.
    edge = EdgeConfig()
    if hasattr(edge, "connect_burst"):
        edge = dataclasses.replace(edge, connect_rate=1e9, connect_burst=10**9)
    factory = BridgeWebSocketFactory(hub, PoolService(clock, "db", 1, 1), None, edge, clock)
    grants = {d: DeviceView(d, d, "sensor", 10, Permission.READ) for d in ids}
    conns = []
    pairs = tcp_pairs(viewers) if sockets else []
    for v in range(viewers):
        conn = factory.buildProtocol(None)
        sink: Any
        if sockets:
            from twisted.internet import reactor, tcp

            server, client = pairs[v]
            sink = tcp.Server(server, conn, ("127.0.0.1", 40000 + v), None, v, reactor)
            sink.stopReading()  # the reactor never runs here
            conn.peer_socket = client
        else:
            sink = Sink()
        conn.makeConnection(sink)
        conn.dataReceived(
            b"GET /ws/ HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert conn.state == conn.STATE_OPEN, conn.state
        identity = Identity(Role.OPERATOR, user_id=1 + v // 50, username=f"u{v // 50}")
        conn.execute(conn.session.identified(identity, grants, hub.is_online))
        hub.register(conn.session)
        mine = [ids[(v * subs + k) % devices] for k in range(subs)]
        subscribe = json.dumps({"op": 7, "d": {"devices": mine, "history": False}}).encode()
        conn.dataReceived(masked_frame(subscribe))
        assert conn.session.subscriptions == set(mine), conn.session.subscriptions
        clock.advance(0)
        sink.capture = False
        conns.append(conn)
        drain([conn])
    return hub, proto, conns, ids


def status_frames(ids: list[str], n: int, size: int) -> list[bytes]:
    pad = "x" * max(0, size - len('{"sent_ns":1763740000000000000,"seq":100000,"pad":""}'))
    frames = []
    for i in range(n):
        d = ids[i % len(ids)]
        body = (
            '{"group_id":' + json.dumps(d) + ',"payload":{"sent_ns":'
            f'{1763740000000000000 + i},"seq":{i // len(ids)},"pad":"{pad}"}}}}'
        ).encode()
        frames.append(server_frame(body))
    return frames


def run(
    viewers: int, devices: int, subs: int, statuses: int, size: int, batch: int, sockets: bool
) -> float:
    """CPU µs per status for one configuration."""
    import gc

    hub, proto, conns, ids = build(viewers, devices, subs, sockets)
    frames = status_frames(ids, statuses, size)
    chunks = [b"".join(frames[i : i + batch]) for i in range(0, len(frames), batch)]
    before = hub.counters["deliveries"]
    written = 0 if sockets else sum(c.transport.bytes for c in conns)
    gc.collect()
    gc.freeze()
    t0 = time.process_time()
    turn = hub.clock.advance  # the reactor's next turn: what waited for it is written
    for i, chunk in enumerate(chunks, 1):
        proto.dataReceived(chunk)
        turn(0)
        if sockets and i % 20 == 0:  # about 5 frames per viewer: the kernel holds them
            drain(conns)
    t1 = time.process_time()
    gc.unfreeze()
    delivered = hub.counters["deliveries"] - before
    want = statuses * viewers * subs // devices
    assert delivered == want, (delivered, want)
    if not sockets:  # every frame was written (a turn's frames may go in one write)
        out = sum(c.transport.bytes for c in conns) - written
        assert out >= delivered * size, (out, delivered)
    return (t1 - t0) / statuses * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--subs", type=int, default=5)
    parser.add_argument("--viewers", type=int, default=1000, help="the wide fan-out")
    parser.add_argument("--narrow", type=int, default=100, help="the narrow fan-out's viewers")
    parser.add_argument("--statuses", type=int, default=20000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--batch", type=int, default=5, help="statuses per dataReceived")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("narrow", "wide"), help="one configuration only")
    parser.add_argument(
        "--sockets",
        action="store_true",
        help="viewers on real loopback TCP connections (Twisted's write path and the "
        "kernel's send, and the viewers' reads, are then in the figures)",
    )
    args = parser.parse_args()
    setup()
    import bridge.watchdog  # noqa: F401  (the same imports as the server)

    results = {}
    for name, viewers in (("narrow", args.narrow), ("wide", args.viewers)):
        if args.only and args.only != name:
            continue
        best = min(
            run(
                viewers, args.devices, args.subs, args.statuses, args.size, args.batch, args.sockets
            )
            for _ in range(args.repeat)
        )
        per_status_viewers = viewers * args.subs / args.devices
        results[name] = {"viewers_per_status": per_status_viewers, "us_per_status": round(best, 2)}
    if len(results) == 2:
        n, w = results["narrow"], results["wide"]
        slope = (w["us_per_status"] - n["us_per_status"]) / (
            w["viewers_per_status"] - n["viewers_per_status"]
        )
        results["us_per_delivery"] = round(slope, 3)
        results["us_per_status_alone"] = round(
            n["us_per_status"] - slope * n["viewers_per_status"], 2
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
