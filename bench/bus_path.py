"""What a follower spends per status: the Redis bus's share against the hub's fan-out.

Feeds a real ``RedisBus`` subscriber protocol (txredisapi, with hiredis when it
is installed) the bytes Redis would send for ``--statuses`` statuses, as the
leader publishes them (one per message, or ``--batch`` per message), into a
real ``ClusterUpstream`` and ``Hub`` with ``--viewers`` sessions on fake links
(each subscribed to ``--subs`` of ``--devices`` devices), and times three
variants in one process:

* ``parse``: the subscriber protocol and the bus's dispatch only (no handler work);
* ``decode``: and ``ClusterUpstream`` splitting, decoding and fencing each status;
* ``apply``: and the hub's per-status work (history, the frame), no session subscribed;
* ``fanout``: the same with the sessions subscribed (what a follower does).

The bus's share is ``decode``; ``apply - decode`` the hub's per-status work,
which a single process does too; ``fanout - apply`` the per-delivery work.

    .venv/bin/python bench/bus_path.py                 # 25 subscribers per status
    .venv/bin/python bench/bus_path.py --batch 20
    .venv/bin/python bench/bus_path.py --parser python     # txredisapi without hiredis

Prints microseconds per status and per delivery, and the bus's share.
CPU-bound and single-threaded: run it under ``flock /tmp/bridge-bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class NullLink:
    """A connection that frames what it is given (as the WebSocket edge does) and drops it."""

    def __init__(self) -> None:
        from bridge.transport import text_frame

        self.frame = text_frame

    def write(self, data: bytes) -> None:
        self.frame(data)

    def execute(self, actions: list[Any]) -> None:
        pass


def resp_message(channel: bytes, text: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(text),
        text,
    )


def build(args: argparse.Namespace, stage: str) -> tuple[Any, list[bytes]]:
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from bridge.hub import DeviceConfig, Hub
    from bridge.leader import ClusterUpstream, LeaderLease
    from bridge.redisbus import RedisBus, _Factory, _Subscriber
    from bridge.session import DeviceView, Identity, Limits, Permission, Role, Session, State

    clock = task.Clock()
    bus = RedisBus("redis://127.0.0.1:6379/0", clock, prefix="b")
    lease = LeaderLease(bus, clock, replica_id="follower")
    lease.holder, lease.holder_token = "leader", 7

    class Inner:
        available = False
        description = "none"
        running = False

        def attach(self, listener: Any) -> None:
            pass

    hub = Hub(clock)
    cluster = ClusterUpstream(Inner(), bus, lease, clock)
    hub.upstream = cluster
    cluster.attach(hub)
    devices = [f"dev-{i:04d}" for i in range(args.devices)]
    for device in devices:
        hub.set_device(DeviceConfig(device, device, "sensor", history_size=50))
    views = {d: DeviceView(d, d, "sensor", 50, Permission.READ) for d in devices}
    link = NullLink()
    for v in range(args.viewers):
        s = Session(secrets.token_hex(8), Limits(), 0.0)
        s.state = State.READY
        s.identity = Identity(Role.OPERATOR, user_id=v % 40 + 1, username=f"u{v}")
        mine = [devices[(v * args.subs + k) % len(devices)] for k in range(args.subs)]
        s.grants = {d: views[d] for d in mine}
        s.link = link
        hub.register(s)
        if stage == "fanout":
            hub.subscribe(s, mine, history=False)
    if stage == "parse":
        bus.handlers[bus.key("status")] = lambda text: None
    if stage == "decode":
        hub.apply_remote_status = lambda *a, **k: True  # type: ignore[method-assign]
    payload = json.dumps({"v": "x" * max(0, args.size - 10)}, separators=(",", ":"))
    items = []
    for i in range(args.statuses):
        head = {
            "o": "leader",
            "f": 7,
            "d": devices[i % len(devices)],
            "ts": 1_700_000_000_000 + i,
            "by": None,
            "c": None,
            "n": i + 1,
        }
        items.append(json.dumps(head, separators=(",", ":"))[:-1] + ',"p":' + payload + "}")
    channel = bus.key("status").encode()
    chunks = [
        resp_message(channel, "\n".join(items[i : i + args.batch]).encode())
        for i in range(0, len(items), args.batch)
    ]
    kind: Any = _Subscriber
    if args.parser == "python":
        import txredisapi

        class PythonSubscriber(txredisapi.BaseRedisProtocol):  # type: ignore[misc]
            """txredisapi's subscriber on its pure-Python parser (no hiredis)."""

            _sub_unsub_reponses = txredisapi.SubscriberProtocol._sub_unsub_reponses
            replyReceived = txredisapi.SubscriberProtocol.replyReceived
            # Its parser hands the rest of each read on through callLater(0).
            callLater = clock.callLater

            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                self.bus._message(channel, message)

        kind = PythonSubscriber
    proto = _Factory(bus, kind).buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.clock = clock
    return proto, chunks


def timed(args: argparse.Namespace, stage: str) -> float:
    """Best of ``--repeats``: seconds for every status, fed in reads of about 64 KB."""
    best = float("inf")
    for _ in range(args.repeats):
        proto, chunks = build(args, stage)
        reads, current = [], b""
        for chunk in chunks:
            current += chunk
            if len(current) >= 65536:
                reads.append(current)
                current = b""
        if current:
            reads.append(current)
        clock = proto.clock
        started = time.perf_counter()
        for data in reads:
            proto.dataReceived(data)
            while clock.getDelayedCalls():  # one "reactor turn" per bulk string
                clock.advance(0)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statuses", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--viewers", type=int, default=500)
    parser.add_argument("--subs", type=int, default=5)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parser", choices=("installed", "python"), default="installed", help="python: no hiredis"
    )
    args = parser.parse_args(argv)
    import txredisapi

    per_status = args.viewers * args.subs / args.devices
    n = args.statuses
    us = {stage: 1e6 * timed(args, stage) / n for stage in ("parse", "decode", "apply", "fanout")}
    result = {
        "parser": "BaseRedisProtocol"
        if args.parser == "python"
        else txredisapi.RedisProtocol.__name__,
        "batch": args.batch,
        "subscribers_per_status": per_status,
        "us_per_status": {k: round(v, 2) for k, v in us.items()},
        "bus_us_per_status": round(us["decode"], 2),
        "hub_us_per_status": round(us["apply"] - us["decode"], 2),
        "hub_us_per_delivery": round((us["fanout"] - us["apply"]) / per_status, 3),
        "bus_share_pct": round(100 * us["decode"] / us["fanout"], 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
