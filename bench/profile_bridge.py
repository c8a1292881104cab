"""Run the bridge (twistd) under cProfile or tracemalloc, as a benchmark's server command.

py-spy cannot sample the bridge reliably, so this wraps ``twistd`` in-process::

    # CPU: profile the reactor thread during fan-out's measured window only
    .venv/bin/python bench/fanout.py --profile-window --label bridge-prof --server-cmd \\
      "{python} {bench}/profile_bridge.py --cprofile /tmp/fanout.prof -- \\
       -n --pidfile= bridge --port 0 --data-dir {data_dir} --nodered {nodered} {tls}"
    .venv/bin/python -c "import pstats; pstats.Stats('/tmp/fanout.prof')\\
      .sort_stats('tottime').print_stats(30)"

    # memory: what idle connections hold (bench/suite.py --bridge-cmd ... --profile-window)
    ... profile_bridge.py --tracemalloc /tmp/idle-mem.txt -- -n --pidfile= bridge ...

    # commands: where a round trip's time goes (bench/trace_commands.py reads it)
    .venv/bin/python bench/suite.py --scenarios commands --peers bridge --bridge-cmd \
      "{python} {bench}/profile_bridge.py --trace /tmp/trace.txt -- -n --pidfile= bridge \
       --port 0 --data-dir {data_dir} --nodered {nodered} --connect-rate 0 {tls}"
    .venv/bin/python bench/trace_commands.py /tmp/trace.txt

``--trace`` stamps (``time.perf_counter``, start and duration) every frame the
bridge reads from a browser, every command written to Node-RED, every read
from the Node-RED link, every end-of-turn write, every ORM call on a thread
pool and every garbage collection, from the reactor's start; it costs about
a microsecond each.

Signals: SIGUSR2 starts (or restarts) the window: cProfile clears what it has,
tracemalloc takes its baseline snapshot. SIGUSR1 ends it: cProfile writes its
stats to the file, tracemalloc writes the allocations made since the baseline
that are still alive, grouped by source line and by 6-frame traceback.
Without signals, cProfile covers the whole run and writes at exit.
cProfile sees the reactor (main) thread only; the thread pools are not profiled.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--cprofile", metavar="FILE", help="write pstats data here")
    group.add_argument("--tracemalloc", metavar="FILE", help="write allocation report here")
    group.add_argument("--trace", metavar="FILE", help="write command-path timestamps here")
    parser.add_argument("--frames", type=int, default=6, help="tracemalloc traceback depth")
    parser.add_argument("twistd_args", nargs=argparse.REMAINDER, help="-- then twistd's")
    args = parser.parse_args(argv)
    twistd_args = args.twistd_args[1:] if args.twistd_args[:1] == ["--"] else args.twistd_args

    from twisted.scripts.twistd import run

    if args.trace:
        from twisted.internet import reactor

        # The suite's window signals would otherwise end the process.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        reactor.callWhenRunning(install_trace, Path(args.trace))
        sys.argv = ["twistd", *twistd_args]
        run()
        return 0

    if args.cprofile:
        out = Path(args.cprofile)
        profiler = cProfile.Profile()

        def start(signum: int, frame: FrameType | None) -> None:
            profiler.disable()
            profiler.clear()
            profiler.enable()
            print("profile_bridge: cProfile window opened", file=sys.__stderr__, flush=True)

        def stop(signum: int, frame: FrameType | None) -> None:
            profiler.disable()
            profiler.dump_stats(out)
            print(f"profile_bridge: cProfile written to {out}", file=sys.__stderr__, flush=True)

        signal.signal(signal.SIGUSR2, start)
        signal.signal(signal.SIGUSR1, stop)
        sys.argv = ["twistd", *twistd_args]
        profiler.enable()
        try:
            run()
        finally:
            profiler.disable()
            if not out.exists():
                profiler.dump_stats(out)
        return 0

    report = Path(args.tracemalloc)
    tracemalloc.start(args.frames)
    baseline: list[tracemalloc.Snapshot] = []

    def mark(signum: int, frame: FrameType | None) -> None:
        baseline[:] = [tracemalloc.take_snapshot()]
        print("profile_bridge: tracemalloc baseline taken", file=sys.__stderr__, flush=True)

    def dump(signum: int, frame: FrameType | None) -> None:
        snap = tracemalloc.take_snapshot()
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        snap = snap.filter_traces(filters)
        lines: list[str] = []
        if baseline:
            diff = snap.compare_to(baseline[0].filter_traces(filters), "lineno")
            total = sum(d.size_diff for d in diff)
            lines.append(f"alive since the baseline: {total / 1024:.0f} KiB")
            lines.append("== by line")
            lines += [str(d) for d in diff[:40]]
            lines.append("== by traceback")
            for d in snap.compare_to(baseline[0].filter_traces(filters), "traceback")[:15]:
                lines.append(f"{d.size_diff / 1024:.0f} KiB in {d.count_diff} blocks")
                lines += ["    " + line for line in d.traceback.format()]
        else:
            lines += [str(s) for s in snap.statistics("lineno")[:40]]
        report.write_text("\n".join(lines) + "\n")
        print(f"profile_bridge: allocations written to {report}", file=sys.__stderr__, flush=True)

    signal.signal(signal.SIGUSR2, mark)
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["twistd", *twistd_args]
    run()
    return 0


def install_trace(path: Path) -> None:
    """Wrap the command path's steps once the service is built (see the module doc)."""
    import gc
    import time
    from typing import Any

    from bridge import nodered, threads, transport, websocket

    out = path.open("w", buffering=1 << 16)
    clock = time.perf_counter

    def stamped(tag: str, inner: Any, label: Any = lambda args: "") -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                out.write(f"{tag} {t:.6f} {clock() - t:.6f} {label(args)}\n")

        return timed

    for cls, name, tag in (
        (websocket.BridgeServerProtocol, "onMessage", "in"),
        (nodered.NodeRedLink, "send_command", "up"),
        (nodered._LinkProtocol, "dataReceived", "st"),
        (transport.Coalescer, "flush", "fl"),
    ):
        setattr(cls, name, stamped(tag, getattr(cls, name)))
    threads._with_connections = stamped(
        "thr", threads._with_connections, lambda args: getattr(args[0], "__name__", "?")
    )
    started: list[float] = [0.0]

    def collected(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            out.write(f"gc {started[0]:.6f} {clock() - started[0]:.6f} {info['generation']}\n")

    gc.callbacks.append(collected)
    print(f"profile_bridge: tracing the command path to {path}", file=sys.__stderr__, flush=True)


if __name__ == "__main__":
    sys.exit(main())
