"""A fast stand-in for Node-RED on the bridge's upstream link (spec section 7).

It is a WebSocket *server* listening on ``127.0.0.1:PORT`` at ``/ws/bridge``; the
bridge (or ``bench/ceiling_autobahn.py``) dials it with
``--nodered ws://127.0.0.1:PORT/ws/bridge``.

* Every command the bridge sends (``{"group_id", "payload", "user", "command_id",
  "ts"}``) is answered at once with a status echoing ``group_id`` and
  ``command_id``.
* While emitting, it sends ``rate`` statuses per second spread round-robin over the
  devices, in small batches per tick so that the rate stays exact::

      {"group_id": "<device id>", "payload": {"sent_ns": <time.time_ns()>,
                                              "seq": <n-th status of that device>,
                                              "pad": "xxxx..."}}

  ``pad`` is sized so that the encoded payload object is about ``size`` bytes.
* It remembers when it sent every status, so that it can say exactly how many
  statuses per device were sent inside a measurement window.

Standalone::

    python bench/upstream_standin.py --port 8765 --devices 100 --rate 1000 --autostart

When run by ``bench/fanout.py`` it is driven over stdin/stdout with one JSON
object per line: commands ``{"cmd": "start"}``, ``{"cmd": "stop"}``,
``{"cmd": "rate", "rate": R}`` (statuses/s from now on; the ramp uses it),
``{"cmd": "counts", "t0_ms": float, "t1_ms": float}``, ``{"cmd": "stats"}`` and
``{"cmd": "quit"}``; events ``{"event": "listening", "port": N}``,
``{"event": "link", "connected": bool, "links": N}``, ``{"event": "counts", ...}``
and ``{"event": "stats", ...}``.

Window membership is decided with ``sent_ns / 1e6`` compared to the window's
``t0_ms``/``t1_ms`` as IEEE doubles, exactly as ``bench/loadgen.mjs`` does after
parsing ``sent_ns`` from JSON, so both sides classify every status identically.

It can also be imported: :class:`Standin` is the whole thing minus the CLI.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import reactor as _default_reactor
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

LINK_PATH = "/ws/bridge"


def pad_for(size: int) -> str:
    """Padding that makes the encoded payload about ``size`` bytes long."""
    sample = json.dumps(
        {"sent_ns": time.time_ns(), "seq": 100000, "pad": ""}, separators=(",", ":")
    )
    return "x" * max(0, size - len(sample))


class LinkProtocol(WebSocketServerProtocol):
    """One upstream link (normally exactly one: the bridge's)."""

    standin: Standin

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn 26.10 tries setTcpNoDelay before it has copied the factory's
        # tcpNoDelay option, fails silently and leaves Nagle on: 40 ms stalls.
        transport: Any = self.transport
        transport.setTcpNoDelay(True)

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path.rstrip("/") != LINK_PATH:
            raise ConnectionDeny(404, f"no link at {request.path}")
        self.standin.auth_headers.append(request.headers.get("authorization", ""))

    def onOpen(self) -> None:
        self.standin.link_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.standin.command_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.standin.link_closed(self)


class Standin:
    """The stand-in upstream: link server, status emitter and send log."""

    def __init__(
        self,
        devices: Sequence[str],
        rate: float,
        size: int = 200,
        tick: float = 0.005,
        reactor: Any = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not devices:
            raise ValueError("at least one device is needed")
        self.devices = list(devices)
        self.rate = rate
        self.size = size
        self.tick = tick
        # Twisted's reactor interfaces are zope interfaces, which mypy cannot check.
        self.reactor: Any = reactor if reactor is not None else _default_reactor
        self.on_event = on_event or (lambda event: None)
        self.links: list[LinkProtocol] = []
        self.auth_headers: list[str] = []
        # Per device: the seq to use next and the send time (ns) of every status.
        self.next_seq = [0] * len(self.devices)
        self.sent_log: list[list[int]] = [[] for _ in self.devices]
        self.index = {device: i for i, device in enumerate(self.devices)}
        self._pad = pad_for(size)
        # Pre-encoded pieces: only sent_ns and seq change per status.
        self._heads = [
            ('{"group_id":' + json.dumps(d) + ',"payload":{"sent_ns":').encode()
            for d in self.devices
        ]
        self._tail = (',"pad":"' + self._pad + '"}}').encode()
        self.emitted = 0
        self.commands = 0
        self.max_batch = 0
        self.late_ticks = 0
        self._cursor = 0
        self._started_at: float | None = None
        self._loop: LoopingCall | None = None
        self._port: Any = None

    # ---------------------------------------------------------------- server

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        factory = WebSocketServerFactory(f"ws://{interface}{LINK_PATH}")
        standin = self

        class BoundLink(LinkProtocol):
            pass

        BoundLink.standin = standin
        factory.protocol = BoundLink
        factory.setProtocolOptions(
            utf8validateIncoming=False, openHandshakeTimeout=10, tcpNoDelay=True
        )
        self._port = self.reactor.listenTCP(port, factory, interface=interface)
        bound: int = self._port.getHost().port
        return bound

    def close(self) -> Any:
        """Stop emitting and listening, and drop the links (for tests' clean reactors)."""
        self.stop()
        for link in list(self.links):
            link.dropConnection(abort=True)
        return self._port.stopListening() if self._port is not None else None

    def link_opened(self, link: LinkProtocol) -> None:
        self.links.append(link)
        self.on_event({"event": "link", "connected": True, "links": len(self.links)})

    def link_closed(self, link: LinkProtocol) -> None:
        if link in self.links:
            self.links.remove(link)
            self.on_event({"event": "link", "connected": False, "links": len(self.links)})

    def command_received(self, raw: bytes) -> None:
        """Answer a command with a status echoing ``group_id`` and ``command_id``."""
        try:
            command = json.loads(raw)
        except ValueError:
            return
        if not isinstance(command, dict) or "group_id" not in command:
            return
        self.commands += 1
        device = command["group_id"]
        sent_ns = time.time_ns()
        status: dict[str, Any] = {
            "group_id": device,
            "payload": {"sent_ns": sent_ns, "ack": command.get("payload")},
        }
        if command.get("command_id") is not None:
            status["command_id"] = command["command_id"]
        body = json.dumps(status, separators=(",", ":")).encode()
        for link in self.links:
            link.sendMessage(body)
        i = self.index.get(device)
        if i is not None and self.links:
            self.sent_log[i].append(sent_ns)

    # ---------------------------------------------------------------- emitter

    def start(self) -> None:
        if self._loop is not None:
            return
        clock = self.reactor
        self._started_at = clock.seconds()
        self._sent_since_start = 0
        self._loop = LoopingCall(self._emit)
        self._loop.clock = clock
        self._loop.start(self.tick, now=True)

    def set_rate(self, rate: float) -> None:
        """Change the rate; a running emitter counts what is due from now on."""
        self.rate = rate
        if self._loop is not None:
            self._started_at = self.reactor.seconds()
            self._sent_since_start = 0

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _emit(self) -> None:
        assert self._started_at is not None
        clock = self.reactor
        due = int((clock.seconds() - self._started_at) * self.rate) - self._sent_since_start
        if due <= 0:
            return
        if due > max(4, 4 * self.rate * self.tick):
            self.late_ticks += 1
        self.max_batch = max(self.max_batch, due)
        self._sent_since_start += due
        if not self.links:
            return  # nothing is connected: these statuses were never sent
        n_devices = len(self.devices)
        heads, tail, seqs, log = self._heads, self._tail, self.next_seq, self.sent_log
        links = self.links
        cursor = self._cursor
        for _ in range(due):
            i = cursor
            cursor = cursor + 1 if cursor + 1 < n_devices else 0
            seq = seqs[i]
            seqs[i] = seq + 1
            sent_ns = time.time_ns()
            body = b"".join((heads[i], str(sent_ns).encode(), b',"seq":', str(seq).encode(), tail))
            for link in links:
                if link.state == link.STATE_OPEN:  # a closing link drops out next tick
                    link.sendMessage(body)
            log[i].append(sent_ns)
        self._cursor = cursor
        self.emitted += due

    # ---------------------------------------------------------------- results

    def counts(self, t0_ms: float, t1_ms: float) -> dict[str, int]:
        """Statuses sent per device with ``t0_ms <= sent_ns / 1e6 < t1_ms``."""
        result: dict[str, int] = {}
        for device, log in zip(self.devices, self.sent_log, strict=True):
            lo = bisect.bisect_left(log, t0_ms, key=lambda ns: ns / 1e6)
            hi = bisect.bisect_left(log, t1_ms, key=lambda ns: ns / 1e6)
            result[device] = hi - lo
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "emitted": self.emitted,
            "commands": self.commands,
            "links": len(self.links),
            "max_batch": self.max_batch,
            "late_ticks": self.late_ticks,
            "payload_bytes": len(self._pad) + len('{"sent_ns":1763740000000000000,"seq":100000}'),
            "authorization_seen": any(self.auth_headers),
        }


class Control(LineReceiver):
    """Line-based JSON control channel on stdin/stdout."""

    delimiter = b"\n"

    def __init__(self, standin: Standin, reactor: Any) -> None:
        self.standin = standin
        self.reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
            cmd = msg["cmd"]
        except (ValueError, KeyError, TypeError):
            emit({"event": "error", "message": f"bad control line {line[:80]!r}"})
            return
        if cmd == "start":
            self.standin.start()
            emit({"event": "started"})
        elif cmd == "rate":
            self.standin.set_rate(float(msg["rate"]))
            emit({"event": "rate", "rate": self.standin.rate})
        elif cmd == "stop":
            self.standin.stop()
            emit({"event": "stopped", **self.standin.stats()})
        elif cmd == "counts":
            counts = self.standin.counts(float(msg["t0_ms"]), float(msg["t1_ms"]))
            emit({"event": "counts", "counts": counts, "total": sum(counts.values())})
        elif cmd == "stats":
            emit({"event": "stats", **self.standin.stats()})
        elif cmd == "quit":
            self.standin.stop()
            self.reactor.stop()
        else:
            emit({"event": "error", "message": f"unknown cmd {cmd!r}"})

    def connectionLost(self, reason: object = None) -> None:
        # stdin closed: the orchestrator is gone, so are we.
        if self.reactor.running:
            self.reactor.stop()


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--devices", type=int, default=100, help="use ids dev-0000 .. dev-N-1")
    group.add_argument("--devices-file", help="JSON list of device ids")
    parser.add_argument("--rate", type=float, default=1000.0, help="statuses per second")
    parser.add_argument("--size", type=int, default=200, help="payload size in bytes")
    parser.add_argument("--tick", type=float, default=0.005, help="seconds between batches")
    parser.add_argument(
        "--autostart", action="store_true", help="emit from the start (no control commands)"
    )
    parser.add_argument(
        "--no-stdin", action="store_true", help="do not read control commands from stdin"
    )
    args = parser.parse_args(argv)
    if args.devices_file:
        with open(args.devices_file) as f:
            devices = [str(d) for d in json.load(f)]
    else:
        devices = [f"dev-{i:04d}" for i in range(args.devices)]

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    standin = Standin(devices, args.rate, args.size, args.tick, reactor, emit)
    port = standin.listen(args.port, args.interface)
    emit({"event": "listening", "port": port, "url": f"ws://{args.interface}:{port}{LINK_PATH}"})
    if not args.no_stdin:
        from twisted.internet.stdio import StandardIO

        StandardIO(Control(standin, reactor), reactor=reactor)
    if args.autostart:
        standin.start()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
