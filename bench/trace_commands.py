"""Where a command's round trip goes inside the bridge, from ``profile_bridge.py --trace``.

For each command written to Node-RED: the browser frame that carried it ->
the write upstream (the bridge's work), the write -> Node-RED's answer read
back (the stand-in's hop, plus any wait for the reactor), the answer -> the
end-of-turn write that carries the confirmation. Then the slowest round
trips with the thread-pool work and collections that overlapped them: a
round trip that lines up with ORM work on a thread was waiting for the GIL.

    .venv/bin/python bench/trace_commands.py /tmp/trace.txt [--commands 1000]
"""

from __future__ import annotations

import argparse
import bisect
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Event:
    tag: str
    start: float
    duration: float
    name: str = ""


def read(path: str) -> list[Event]:
    events = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                events.append(
                    Event(parts[0], float(parts[1]), float(parts[2]), " ".join(parts[3:]))
                )
    events.sort(key=lambda e: e.start)
    return events


def pct(values: list[float]) -> str:
    a = sorted(values)
    if not a:
        return "none"

    def at(q: float) -> float:
        return a[min(len(a) - 1, max(0, int(q * len(a) + 0.5) - 1))]

    return f"p50 {at(0.5):.3f}  p90 {at(0.9):.3f}  p99 {at(0.99):.3f}  max {a[-1]:.3f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--commands", type=int, default=0, help="only the first N (0: all)")
    parser.add_argument("--slowest", type=int, default=8)
    args = parser.parse_args(argv)
    events = read(args.trace)
    starts = [e.start for e in events]
    ups = [i for i, e in enumerate(events) if e.tag == "up"]
    if args.commands:
        ups = ups[: args.commands]
    if not ups:
        print("no command in the trace", file=sys.stderr)
        return 1
    rows = []
    for i in ups:
        j = i
        while j > 0 and events[j].tag != "in":
            j -= 1
        k = i
        while k < len(events) - 1 and events[k].tag != "st":
            k += 1
        m = k
        while m < len(events) - 1 and events[m].tag != "fl":
            m += 1
        t_in, t_up, t_st = events[j].start, events[i].start, events[k].start
        t_out = events[m].start + events[m].duration
        rows.append((t_in, t_up, t_st, t_out))
    legs = {
        "frame -> written upstream": [(b - a) * 1e3 for a, b, _, _ in rows],
        "upstream -> answer read": [(c - b) * 1e3 for _, b, c, _ in rows],
        "answer -> confirmation written": [(d - c) * 1e3 for _, _, c, d in rows],
        "frame -> confirmation written": [(d - a) * 1e3 for a, _, _, d in rows],
    }
    print(f"{len(rows)} commands")
    for name, values in legs.items():
        print(f"  {name:32s} {pct(values)}")
    side: dict[str, list[float]] = defaultdict(list)
    t0, t1 = rows[0][0], rows[-1][3]
    for e in events:
        if e.tag in ("thr", "gc") and t0 <= e.start <= t1:
            side[f"{e.tag} {e.name}"].append(e.duration * 1e3)
    print("thread-pool calls and collections meanwhile:")
    for name, values in sorted(side.items()):
        print(f"  {name:32s} n={len(values):<5d} {pct(values)}")
    print(f"slowest {args.slowest} (ms: total; overlapping pool work and collections):")
    for t_in, _, _, t_out in sorted(rows, key=lambda r: r[0] - r[3])[: args.slowest]:
        lo = bisect.bisect_left(starts, t_in - 0.05)
        hi = bisect.bisect_right(starts, t_out)
        overlap = [
            f"{e.tag} {e.name} {e.duration * 1e3:.1f}"
            for e in events[lo:hi]
            if e.tag in ("thr", "gc") and e.start < t_out and e.start + e.duration > t_in
        ]
        print(f"  {(t_out - t_in) * 1e3:7.3f}  {', '.join(overlap) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
