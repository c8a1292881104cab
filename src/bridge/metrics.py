"""``/metrics`` in Prometheus text format, for staff or a configured bearer token.

The numbers already live where the work happens (hub counters, the edge's
frame counts, pool queues); this module only reads them at scrape time, so
nothing on the hot path waits on metrics. The text format is small enough
that a client library would add a dependency and a second registry for no
gain.
"""

from __future__ import annotations

import bisect
import hmac
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web import resource, server

log = Logger()


class Histogram:
    """Cumulative buckets as Prometheus wants them; observe() is O(log n)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        brace = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{brace} {self.total:.6f}")
        out.append(f"{name}_count{brace} {self.count}")
        return out


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """Builds the text: HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            self.lines.append(f"{name}{{{inner}}} {value:g}")
        else:
            self.lines.append(f"{name} {value:g}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def labelled(
        self, name: str, kind: str, help_text: str, label: str, values: dict[str, float]
    ) -> None:
        self.family(name, kind, help_text)
        for key, value in sorted(values.items()):
            self.sample(name, value, **{label: key})

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        collect: Callable[[Exposition], None],
        staff_check: Callable[[str], Any],
        token: str | None,
    ) -> None:
        super().__init__()
        self.collect = collect
        self.staff_check = staff_check  # session key -> Deferred[bool]
        self.token = token

    def render_GET(self, request: server.Request) -> Any:
        self._serve(request)
        return server.NOT_DONE_YET

    @inlineCallbacks
    def _serve(self, request: server.Request) -> Any:
        allowed = False
        header = request.getHeader(b"authorization")
        if header and self.token:
            scheme, _, given = header.decode("latin-1").partition(" ")
            allowed = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), self.token.encode()
            )
        if not allowed:
            from bridge.identity import session_key_from_cookie_header

            cookie = request.getHeader(b"cookie")
            key = session_key_from_cookie_header(cookie.decode("latin-1") if cookie else None)
            if key:
                try:
                    allowed = bool((yield self.staff_check(key)))
                except Exception:
                    log.failure("metrics: could not check the session")
        if request.finished or request._disconnected:
            return
        if not allowed:
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"metrics are for staff, or with the configured bearer token\n")
            request.finish()
            return
        exposition = Exposition()
        try:
            self.collect(exposition)
        except Exception:
            log.failure("metrics: collecting failed")
            request.setResponseCode(500)
            request.write(b"collecting metrics failed; see the log\n")
            request.finish()
            return
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.write(exposition.text())
        request.finish()


def staff_session(session_key: str) -> bool:
    """ORM: is this Django session a logged-in, active staff member? (thread pool)"""
    from bridge.identity import user_from_session

    user = user_from_session(session_key)
    return bool(user is not None and user.is_active and user.is_staff)


def prefixed(counters: Counter[str], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in counters.items() if k.startswith(prefix)}


def bridge_collector(
    hub: Any, edge: Any, events: Any, upstream: Any, store: Any, pools: dict[str, Any]
) -> Callable[[Exposition], None]:
    """Everything /metrics shows, read from the objects that count it."""

    def collect(x: Exposition) -> None:
        roles: Counter[str] = Counter()
        for conn in edge.connections:
            who = conn.session.identity
            roles[who.role.value if who else "unidentified"] += 1
        for role in ("operator", "device", "anonymous", "unidentified"):
            roles.setdefault(role, 0)
        x.labelled(
            "bridge_connections",
            "gauge",
            "Open WebSocket connections by role.",
            "role",
            dict(roles),
        )
        x.one(
            "bridge_sse_streams", "gauge", "Open Server-Sent Events streams.", len(events.streams)
        )
        detached = sum(1 for s in hub.sessions.values() if s.link is None)
        x.labelled(
            "bridge_sessions",
            "gauge",
            "Sessions, attached or waiting for RESUME.",
            "state",
            {"attached": len(hub.sessions) - detached, "detached": detached},
        )
        x.one(
            "bridge_frames_received_total", "counter", "WebSocket frames received.", edge.frames_in
        )
        x.one("bridge_frames_sent_total", "counter", "WebSocket frames sent.", edge.frames_out)
        c = hub.counters
        x.one("bridge_statuses_total", "counter", "Statuses accepted into the hub.", c["statuses"])
        x.one(
            "bridge_fanout_deliveries_total",
            "counter",
            "Statuses handed to viewers.",
            c["deliveries"],
        )
        x.labelled(
            "bridge_statuses_dropped_total",
            "counter",
            "Statuses dropped, by reason.",
            "reason",
            {"unknown_device": c["statuses_unknown_device"], "invalid": c["statuses_invalid"]},
        )
        x.one("bridge_commands_total", "counter", "Commands accepted.", c["commands"])
        results = prefixed(c, "commands_")
        for result in ("confirmed", "timeout", "upstream_unavailable", "rejected"):
            results.setdefault(result, 0)
        x.labelled(
            "bridge_command_results_total", "counter", "Final command results.", "result", results
        )
        x.labelled(
            "bridge_denied_total",
            "counter",
            "Refused requests (connection closed), by kind; identify = auth failures.",
            "action",
            prefixed(edge.counters, "denied_"),
        )
        x.one(
            "bridge_slow_viewer_drops_total",
            "counter",
            "Pending statuses a slow viewer never got (a newer one replaced them).",
            edge.counters["slow_drops"],
        )
        x.one(
            "bridge_slow_viewer_closes_total",
            "counter",
            "Connections closed with 4008 for staying behind.",
            edge.counters["slow_closes"],
        )
        x.one(
            "bridge_rate_limited_total",
            "counter",
            "Connections closed with 4008 for sending too many frames.",
            edge.counters["rate_limited"],
        )
        x.one(
            "bridge_upstream_up",
            "gauge",
            "1 while the upstream link is up.",
            1 if getattr(upstream, "available", False) else 0,
        )
        link_counters = getattr(upstream, "counters", None)
        if link_counters:
            x.labelled(
                "bridge_upstream_events_total",
                "counter",
                "Upstream link events (messages in/out, malformed, reconnects).",
                "event",
                {k: float(v) for k, v in link_counters.items()},
            )
        x.labelled(
            "bridge_threadpool_queue_depth",
            "gauge",
            "Work waiting for a pool thread.",
            "pool",
            {name: pool.queued for name, pool in pools.items()},
        )
        x.one(
            "bridge_store_backlog",
            "gauge",
            "History and audit rows not yet written.",
            store.backlog,
        )
        x.one(
            "bridge_store_failures_total",
            "counter",
            "Failed database batches (retried).",
            store.failures,
        )
        x.one(
            "bridge_store_refused_total",
            "counter",
            "History and audit rows the database refused as bad data, left out.",
            store.refused,
        )
        x.family(
            "bridge_command_confirm_seconds",
            "histogram",
            "From COMMAND to its confirmation by the device.",
        )
        x.lines.extend(hub.confirm_seconds.lines("bridge_command_confirm_seconds"))
        x.family("bridge_identify_seconds", "histogram", "From connection open to READY.")
        x.lines.extend(edge.identify_seconds.lines("bridge_identify_seconds"))

    return collect
