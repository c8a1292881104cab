"""Reactor stalls: garbage-collector pauses logged and kept rare, and an
optional stack dump when the reactor misses a deadline.

With thousands of connections a full collection walks every live object
while the reactor waits; that shows up as a latency spike for every viewer.
``BRIDGE_STALL_DUMP_MS=150`` makes faulthandler print every thread's stack to
stderr whenever the reactor thread is away longer than that: the way to find
what blocks it. A debugging aid only: faulthandler's watchdog thread reads
other threads' frames unsafely and has crashed a busy process here.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import time
from typing import Any

from twisted.logger import Logger

log = Logger()

_started: list[float] = [0.0]
SLOW = 0.05


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    elapsed = time.perf_counter() - _started[0]
    if elapsed > SLOW:
        log.warn(
            "garbage collection of generation {gen} paused the reactor {ms:.0f} ms",
            gen=info.get("generation"),
            ms=elapsed * 1000,
        )


def install() -> None:
    """Freeze start-up's objects out of collections and make full ones rarer.

    What start-up allocated (Django, apps, code) lives as long as the process,
    so it is frozen out of every collection. The young generation is larger
    than CPython's default (700) so short-lived per-frame objects die by
    refcount before a collection sees them, and a full collection waits for
    100 middle-generation ones instead of 10; cyclic garbage is still found,
    only later.
    """
    gc.collect()
    gc.freeze()
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)
    gc.set_threshold(5000, 20, 100)


def stall_dumps(clock: Any) -> Any:
    """Arm faulthandler from the reactor; returns the LoopingCall, or None."""
    from twisted.internet.task import LoopingCall

    limit_ms = int(os.environ.get("BRIDGE_STALL_DUMP_MS", "0") or 0)
    if limit_ms <= 0:
        return None

    stderr = sys.__stderr__
    assert stderr is not None

    def rearm() -> None:
        # twistd replaces sys.stderr with a logging file that has no descriptor.
        faulthandler.dump_traceback_later(limit_ms / 1000, repeat=False, file=stderr)

    loop = LoopingCall(rearm)
    loop.clock = clock
    loop.start(min(limit_ms / 3000, 0.05))
    log.warn("stall dumps armed: stacks printed after {ms} ms without the reactor", ms=limit_ms)
    return loop
