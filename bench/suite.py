"""The benchmark suite: the bridge against its alternatives, every scenario, one command.

    .venv/bin/python bench/suite.py             # everything, about 15-20 min
    .venv/bin/python bench/suite.py --quick     # the same, smaller and shorter
    .venv/bin/python bench/suite.py --scenarios idle --peers bridge,bridge-tls

Scenarios (``--scenarios``, comma-separated; default all):

* ``startup``  seconds from spawn to the ``listening on`` line, RSS of a fresh server;
* ``fanout``   1000 viewers x 5 of 100 devices, 1000 statuses/s of 200 B (bench/fanout.py);
* ``commands`` COMMAND -> COMMAND_RESULT confirmed round trip, unloaded and under fan-out;
* ``ramp``     the status rate raised until loss > 1 % or p99 > 100 ms;
* ``idle``     2000 and 10 000 identified, subscribed, heartbeating connections: KB each;
* ``storm``    handshakes + IDENTIFY to READY per second.

Peers (``--peers``): ``bridge``, ``bridge-tls``, ``ceiling``, ``ceiling-tls`` (raw Autobahn,
bench/ceiling_autobahn.py), ``channels``, ``channels-tls`` (Django Channels + daphne +
channels_redis, bench/channels_relay/, in its own venv bench/.venv-channels, Redis at
127.0.0.1:6379 db 13). The same Node load generator (bench/loadgen.mjs) and Node-RED
stand-in (bench/upstream_standin.py) drive every peer.

Prints a Markdown report (tables, ratios, targets) and writes it with the full JSON to
bench/results/<time>-suite.{json,md}. See bench/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fanout import (
    BENCH,
    PER_USER,
    BenchError,
    Child,
    Gens,
    Rig,
    ServerSpec,
    assign,
    cpu_pct,
    log,
    machine_figures,
    provision,
    raise_fd_limit,
    take_sample,
    tree_memory_kb,
)

SCENARIOS = ("startup", "fanout", "commands", "ramp", "idle", "storm")
PEERS: dict[str, ServerSpec] = {
    "bridge": ServerSpec("bridge", label="bridge", permission="change"),
    "bridge-tls": ServerSpec("bridge", tls=True, label="bridge-tls", permission="change"),
    "ceiling": ServerSpec("ceiling", label="ceiling"),
    "ceiling-tls": ServerSpec("ceiling", tls=True, label="ceiling-tls"),
    "channels": ServerSpec("channels", label="channels"),
    "channels-tls": ServerSpec("channels", tls=True, label="channels-tls"),
}
# Which peers each scenario runs by default (--peers narrows every list).
DEFAULT_PEERS: dict[str, list[str]] = {
    "startup": ["bridge", "bridge-tls", "ceiling", "channels"],
    "fanout": ["bridge", "bridge-tls", "ceiling", "ceiling-tls", "channels"],
    "commands": ["bridge", "bridge-tls", "ceiling", "channels"],
    "ramp": ["bridge", "ceiling", "channels"],
    "idle": list(PEERS),
    "storm": list(PEERS),
}
# 10 000 idle connections take the longest to open: these peers only, unless --peers says.
BIG_IDLE_PEERS = ["bridge", "bridge-tls", "ceiling", "ceiling-tls", "channels"]

# Enough users for 10 000 connections at fanout.PER_USER each, plus the command client.
N_USERS = 10000 // PER_USER + 20
RAMP_MAX_LOSS_PCT = 1.0
RAMP_MAX_P99_MS = 100.0


@dataclass
class Config:
    quick: bool = False
    viewers: int = 1000
    devices: int = 100
    subs: int = 5
    rate: float = 1000
    size: int = 200
    gen_procs: int = 2
    concurrency: int = 50
    fanout_duration: float = 15
    fanout_warmup: float = 5
    grace: float = 3
    # 600 commands make the p99 their 6th slowest, not (as 200 did) the 2nd; at
    # 50/s they still fit inside the fan-out window for the loaded run.
    cmd_rate: float = 50
    cmd_count: int = 600
    ramp_duration: float = 5
    ramp_warmup: float = 1.5
    ramp_grace: float = 1.5
    ramp_max_steps: int = 7
    ramp_factor: float = 1.5
    idle_sizes: list[int] = field(default_factory=lambda: [2000, 10000])
    idle_hold: float = 10
    idle_concurrency: int = 100
    storm_n: int = 1000
    storm_concurrency: int = 100
    startup_repeats: int = 2

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls()
        return cls(
            quick=True,
            fanout_duration=8,
            fanout_warmup=3,
            grace=2,
            cmd_count=300,
            ramp_duration=4,
            ramp_max_steps=5,
            idle_sizes=[2000],
            idle_hold=5,
            storm_n=500,
            startup_repeats=1,
        )


# --------------------------------------------------------------------- helpers


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1048576, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "fd_limit": raise_fd_limit(),
    }


def redis_used_memory() -> int | None:
    """Redis's used_memory in bytes (the Channels peer keeps its groups there)."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as sock:
            sock.sendall(b"INFO memory\r\n")
            data = b""
            while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 1 << 20:
                    break
        for line in data.decode("latin1").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def noisy(machine: dict[str, Any]) -> bool:
    """Other jobs used more than a quarter of a core during the measurement."""
    return (
        float(machine.get("other_processes_pct", 0))
        + max(0.0, float(machine.get("unattributed_pct", 0)))
        > 25
    )


@dataclass
class Provisioned:
    """One bridge data dir (users, 100 devices, grants) shared by every bridge run."""

    data_dir: Path
    devices: list[str]
    password: str


class Suite:
    def __init__(self, cfg: Config, python: str, keep: bool, bridge_cmd: str | None = None) -> None:
        self.cfg = cfg
        self.bridge_cmd = bridge_cmd
        self.python = python
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-suite-"))
        self._bridge_data: Provisioned | None = None
        self._rigs = 0

    # ---------------------------------------------------------------- rigs

    def bridge_data(self) -> Provisioned:
        if self._bridge_data is None:
            data_dir = self.workdir / "bridge-data"
            data_dir.mkdir()
            password = "bench-" + os.urandom(8).hex()
            devices = provision(
                self.python, data_dir, self.cfg.devices, password, "auto", "change", N_USERS
            )
            self._bridge_data = Provisioned(data_dir, devices, password)
        return self._bridge_data

    def rig(self, peer: str) -> Rig:
        spec = PEERS[peer]
        if self.bridge_cmd and spec.kind == "bridge":
            spec = dataclasses.replace(
                spec, cmd=self.bridge_cmd, signal_window=True, provision="shell"
            )
        if spec.provision_mode == "none":
            rig = Rig(spec, self.python, self.cfg.devices, keep=self.keep)
            rig.prepare()
            return rig
        shared = self.bridge_data()
        # A fresh server on the shared data dir (a Rig given a data dir never deletes it),
        # with logs of its own.
        rig = Rig(spec, self.python, self.cfg.devices, str(shared.data_dir), self.keep, N_USERS)
        self._rigs += 1
        rig.logdir = self.workdir / f"logs-{self._rigs:02d}-{peer}"
        rig.logdir.mkdir()
        rig.password = shared.password
        rig.devices = shared.devices
        (rig.logdir / "devices.json").write_text(json.dumps(shared.devices))
        return rig

    def boot(self, rig: Rig) -> float:
        """Stand-in (not streaming) and server; returns seconds to 'listening on'."""
        nodered = rig.start_standin(self.cfg.rate, self.cfg.size)
        started = rig.start_server(nodered, 90)
        rig.wait_link(60)
        return started

    # ---------------------------------------------------------------- startup

    def startup(self, peer: str) -> dict[str, Any]:
        times: list[float] = []
        rss: list[float] = []
        with self.rig(peer) as rig:
            nodered = rig.start_standin(self.cfg.rate, self.cfg.size)
            for _ in range(self.cfg.startup_repeats):
                times.append(rig.start_server(nodered, 90))
                rig.wait_link(60)
                time.sleep(2)
                rss.append(rig.server_memory()["rss_mb"])
                rig.stop_server()
                time.sleep(0.5)
        return {
            "to_listening_s": [round(t, 3) for t in times],
            "to_listening_median_s": round(statistics.median(times), 3),
            "fresh_rss_mb": rss,
            "fresh_rss_median_mb": round(statistics.median(rss), 1),
            "note": "first start on this data dir includes generating the TLS certificate",
        }

    # ---------------------------------------------------------------- stream

    def stream(self, peer: str, want: set[str]) -> dict[str, Any]:
        """fanout, commands and ramp on one server: the viewers connect once."""
        cfg = self.cfg
        out: dict[str, Any] = {}
        with self.rig(peer) as rig:
            self.boot(rig)
            assert rig.standin is not None
            standin = rig.standin
            device = rig.devices[0]
            commander: Gens | None = None
            if "commands" in want:
                commander = rig.start_gens([[]], 1, 1)
                rig.wait_ready(commander, 60)
                time.sleep(1)
                log(f"{peer}: commands, unloaded")
                out["commands_unloaded"] = self.commands(commander.children[0], device)
            plan = assign(cfg.viewers, cfg.subs, rig.devices)
            gens = rig.start_gens(plan, cfg.gen_procs, cfg.concurrency)
            ready = rig.wait_ready(gens, 300)
            log(f"{peer}: {ready['connected']}/{cfg.viewers} viewers in {ready['ramp_s']} s")
            out["viewers_ready"] = ready
            if ready["connected"] == 0:
                raise BenchError(f"{peer}: no viewer got through: {ready['errors'][:3]}")
            standin.send({"cmd": "start"})
            if "fanout" in want or "commands" in want:
                under_load: dict[str, Any] = {}
                during: Callable[[], None] | None = None
                if commander is not None:
                    gen = commander.children[0]

                    def during() -> None:
                        log(f"{peer}: commands, under the fan-out load")
                        under_load.update(self.commands(gen, device))

                result = rig.measure(
                    gens, cfg.fanout_duration, cfg.fanout_warmup, cfg.grace, True, during
                )
                result["config"] = {
                    "viewers": cfg.viewers,
                    "devices": cfg.devices,
                    "subs": cfg.subs,
                    "rate": cfg.rate,
                    "size": cfg.size,
                    "tls": rig.spec.tls,
                    "gen_procs": len(gens.children),
                }
                result["target_deliveries_per_s"] = cfg.rate * cfg.viewers * cfg.subs / cfg.devices
                out["fanout"] = result
                if commander is not None:
                    out["commands_loaded"] = under_load
            if "ramp" in want:
                start = cfg.rate
                fan = out.get("fanout")
                if fan is not None and step_ok(fan):
                    start = cfg.rate * cfg.ramp_factor
                elif fan is not None:
                    # Start a little under what it did deliver: an overloaded first step
                    # leaves a backlog that later steps would pay for.
                    per_status = cfg.viewers * cfg.subs / cfg.devices
                    start = min(cfg.rate / 2, 0.8 * fan["deliveries_per_s"] / per_status)
                out["ramp"] = self.ramp(rig, gens, start)
            standin.send({"cmd": "stop"})
        return out

    def commands(self, gen: Child, device: str) -> dict[str, Any]:
        cfg = self.cfg
        gen.send(
            {
                "cmd": "commands",
                "device": device,
                "rate": cfg.cmd_rate,
                "count": cfg.cmd_count,
                "timeout_ms": 6000,
            }
        )
        result = gen.wait_event("commands", cfg.cmd_count / cfg.cmd_rate + 30)
        result.pop("event", None)
        return result

    def ramp(self, rig: Rig, gens: Gens, start: float) -> dict[str, Any]:
        cfg = self.cfg
        assert rig.standin is not None
        standin = rig.standin
        steps: list[dict[str, Any]] = []
        passed: float | None = None
        failed: float | None = None
        rate = max(5.0, round(start))
        stop_reason = "max steps"
        per_status = cfg.viewers * cfg.subs / cfg.devices
        while len(steps) < cfg.ramp_max_steps:
            standin.send({"cmd": "rate", "rate": rate})
            standin.wait_event("rate", 10)
            log(
                f"ramp {rig.spec.name}: {rate:g} statuses/s ({rate * per_status:,.0f} deliveries/s)"
            )
            res = rig.measure(gens, cfg.ramp_duration, cfg.ramp_warmup, cfg.ramp_grace, True)
            ok = step_ok(res)
            steps.append(
                {
                    "rate": rate,
                    "target_deliveries_per_s": rate * per_status,
                    "deliveries_per_s": res["deliveries_per_s"],
                    "loss_pct": res["loss_pct"],
                    "p50_ms": res["latency_ms"]["p50"],
                    "p99_ms": res["latency_ms"]["p99"],
                    "server_cpu_pct": res["server"]["cpu_pct"],
                    "server_rss_mb": res["server"]["rss_mb"],
                    **{
                        k: v
                        for k, v in res["server"].items()
                        if k.endswith("_cpu_pct") and k != "cpu_pct"
                    },
                    "generator_cpu_pct": res["generator"]["cpu_pct"],
                    "generator_elu": res["generator"]["event_loop_utilization"],
                    "machine_busy_pct": res["machine"]["busy_pct"],
                    "other_processes_pct": res["machine"]["other_processes_pct"],
                    "seq_gaps": res["checks"]["seq_gaps"],
                    "closes": res["checks"]["closes"],
                    "ok": ok,
                }
            )
            step = steps[-1]
            log(
                f"ramp {rig.spec.name}: {rate:g}/s -> {step['deliveries_per_s']:,.0f} "
                f"deliveries/s, loss {step['loss_pct']} %, p99 {step['p99_ms']} ms, "
                f"server {step['server_cpu_pct']} %, generator ELU {step['generator_elu']}, "
                f"machine {step['machine_busy_pct']} %: {'pass' if ok else 'FAIL'}"
            )
            if ok:
                passed = rate if passed is None else max(passed, rate)
            else:
                failed = rate if failed is None else min(failed, rate)
            if res["checks"]["closes"]:
                stop_reason = f"the server closed viewers: {res['checks']['closes']}"
                break
            # Let a backlog drain before the next step.
            standin.send({"cmd": "rate", "rate": 0})
            standin.wait_event("rate", 10)
            self.settle(rig)
            if failed is None:
                rate = round(rate * cfg.ramp_factor)
            elif passed is None:
                if rate <= 5:
                    stop_reason = "fails even at 5 statuses/s"
                    break
                rate = max(5.0, round(rate / 2))
            elif failed / passed <= 1.15:
                stop_reason = "bracketed within 15 %"
                break
            else:
                rate = round(math.sqrt(passed * failed))
        good = [s for s in steps if s["ok"]]
        best = max(good, key=lambda s: s["deliveries_per_s"]) if good else None
        # Throughput alone (latency ignored): what it delivers without losing more than 1 %.
        lossless = [s for s in steps if s["loss_pct"] <= RAMP_MAX_LOSS_PCT and not s["closes"]]
        return {
            "best_lossless_deliveries_per_s": max(
                (s["deliveries_per_s"] for s in lossless), default=0.0
            ),
            "criteria": f"loss <= {RAMP_MAX_LOSS_PCT} % and p99 <= {RAMP_MAX_P99_MS} ms",
            "best_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
            "best_rate": best["rate"] if best else None,
            "best_p99_ms": best["p99_ms"] if best else None,
            "first_failing_rate": failed,
            "stop_reason": stop_reason,
            "steps": steps,
        }

    def settle(self, rig: Rig, limit: float = 45) -> None:
        """Wait until the server is nearly idle (a failed step may leave a backlog)."""
        pids = rig.server_pids()
        started = time.monotonic()
        time.sleep(1)
        while time.monotonic() < started + limit:
            a = take_sample(pids)
            time.sleep(0.5)
            b = take_sample(pids)
            if cpu_pct(a, b, "server") < 30:
                break
        waited = time.monotonic() - started
        if waited > 3:
            log(f"ramp {rig.spec.name}: waited {waited:.0f} s for the server to drain")

    # ---------------------------------------------------------------- idle, storm

    def connections(self, peer: str, sizes: list[int], storm: bool) -> dict[str, Any]:
        """Idle connections on a fresh server per size; the storm after the first size."""
        out: dict[str, Any] = {"idle": [], "startup_samples": []}
        for i, n in enumerate(sizes or [0]):
            with self.rig(peer) as rig:
                started = self.boot(rig)
                time.sleep(2)
                assert rig.server is not None
                pid = rig.server.popen.pid
                rss0 = tree_memory_kb(pid)["VmRSS"]
                out["startup_samples"].append(
                    {"to_listening_s": round(started, 3), "fresh_rss_mb": round(rss0 / 1024, 1)}
                )
                if n:
                    out["idle"].append(self.idle(rig, n, rss0))
                if storm and i == 0:
                    time.sleep(1)
                    out["storm"] = self.storm(rig)
        return out

    def idle(self, rig: Rig, n: int, rss0_kb: int) -> dict[str, Any]:
        cfg = self.cfg
        redis0 = redis_used_memory() if rig.extra_pids else None
        plan = assign(n, cfg.subs, rig.devices)
        procs = max(1, math.ceil(n / 5000))
        log(f"idle {rig.spec.name}: opening {n} connections ({procs} generator processes)")
        rig.signal_server(signal.SIGUSR2)
        pids = {**rig.server_pids(), "generator": []}
        gens = rig.start_gens(
            plan, procs, cfg.idle_concurrency, connect_timeout_ms=120000, token_refresh=30
        )
        pids["generator"] = gens.pids
        a = take_sample(pids, everyone=True)
        ready = rig.wait_ready(gens, 900)
        b = take_sample(pids, everyone=True)
        log(
            f"idle {rig.spec.name}: {ready['connected']}/{n} ready in {ready['ramp_s']} s; "
            f"holding {cfg.idle_hold:g} s"
        )
        time.sleep(cfg.idle_hold)
        c = take_sample(pids, everyone=True)
        assert rig.server is not None
        mem = tree_memory_kb(rig.server.popen.pid)
        rig.signal_server(signal.SIGUSR1)
        redis1 = redis_used_memory() if rig.extra_pids else None
        gens.send({"cmd": "report"})
        reports = [g.wait_event("report", 30) for g in gens.children]
        open_now = sum(int(r["open"]) for r in reports)
        closes: dict[str, int] = {}
        for r in reports:
            for code, k in r["closes"].items():
                closes[code] = closes.get(code, 0) + int(k)
        delta_kb = mem["VmRSS"] - rss0_kb
        result: dict[str, Any] = {
            "peer": rig.spec.name,
            "tls": rig.spec.tls,
            "connections": n,
            "connected": ready["connected"],
            "open_after_hold": open_now,
            "held": open_now == n and not closes,
            "closes": closes,
            "hb_sent": sum(int(r["hb_sent"]) for r in reports),
            "hb_acks": sum(int(r["hb_acks"]) for r in reports),
            "rss_before_mb": round(rss0_kb / 1024, 1),
            "rss_after_mb": round(mem["VmRSS"] / 1024, 1),
            "kb_per_connection": round(delta_kb / n, 1),
            "connect_s": ready["ramp_s"],
            "connected_per_s": ready["connected_per_s"],
            "connect_server_cpu_pct": cpu_pct(a, b, "server"),
            "idle_server_cpu_pct": cpu_pct(b, c, "server"),
            "hold_s": cfg.idle_hold,
            "generator_rss_mb": [round(float(r["rss_mb"]), 1) for r in reports],
            "machine_during_hold": machine_figures(b, c, cpu_pct(b, c, "server")),
            "errors": ready["errors"][:5],
        }
        for name in rig.extra_pids:
            result[f"idle_{name}_cpu_pct"] = cpu_pct(b, c, name)
        if redis0 is not None and redis1 is not None:
            result["redis_kb_per_connection"] = round((redis1 - redis0) / 1024 / n, 2)
        rig.stop_gens(gens)
        return result

    def storm(self, rig: Rig) -> dict[str, Any]:
        cfg = self.cfg
        log(f"storm {rig.spec.name}: {cfg.storm_n} connections to READY")
        pids = {**rig.server_pids(), "generator": []}
        gens = rig.start_gens(
            [[] for _ in range(cfg.storm_n)], 1, cfg.storm_concurrency, connect_timeout_ms=60000
        )
        pids["generator"] = gens.pids
        rig.signal_server(signal.SIGUSR2)
        a = take_sample(pids, everyone=True)
        ready = rig.wait_ready(gens, 600)
        b = take_sample(pids, everyone=True)
        rig.signal_server(signal.SIGUSR1)
        rig.stop_gens(gens)
        return {
            "peer": rig.spec.name,
            "tls": rig.spec.tls,
            "connections": cfg.storm_n,
            "concurrency": cfg.storm_concurrency,
            **{k: v for k, v in ready.items() if k != "errors"},
            "server_cpu_pct": cpu_pct(a, b, "server"),
            "generator_cpu_pct": cpu_pct(a, b, "generator"),
            "machine": machine_figures(a, b, cpu_pct(a, b, "server")),
            "errors": ready["errors"][:5],
        }

    def close(self) -> None:
        if not self.keep:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            log(f"kept {self.workdir}")


def step_ok(res: dict[str, Any]) -> bool:
    p99 = res["latency_ms"]["p99"]
    return (
        res["loss_pct"] <= RAMP_MAX_LOSS_PCT
        and p99 is not None
        and p99 <= RAMP_MAX_P99_MS
        and not res["checks"]["closes"]
    )


# --------------------------------------------------------------------- running it all


def apply_overrides(cfg: Config, pairs: Sequence[str]) -> None:
    """``--set idle_sizes=500,1000 --set fanout_duration=10``: change any Config field."""
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in Config.__dataclass_fields__ or not raw:
            raise BenchError(f"--set {pair!r}: use FIELD=VALUE with a field of Config")
        current = getattr(cfg, key)
        value: Any
        if isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, list):
            value = [int(x) for x in raw.split(",") if x]
        else:
            value = type(current)(raw)
        setattr(cfg, key, value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config.make(args.quick)
    apply_overrides(cfg, args.set)
    scenarios = [s for s in SCENARIOS if s in set(args.scenarios.split(","))]
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        raise BenchError(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    only = set(args.peers.split(",")) if args.peers else None
    if only and only - set(PEERS):
        raise BenchError(f"unknown peers {sorted(only - set(PEERS))}; choose from {list(PEERS)}")

    def peers_for(scenario: str) -> list[str]:
        if only is not None:
            return [p for p in PEERS if p in only]
        return DEFAULT_PEERS[scenario]

    suite = Suite(cfg, args.python, args.keep, args.bridge_cmd)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": asdict(cfg),
        "scenarios": scenarios,
        "loadavg_at_start": loadavg(),
        "results": {s: {} for s in scenarios},
        "failures": {},
    }
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = report["results"]

    def attempt(label: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BenchError as exc:
            log(f"FAILED {label}: {exc}")
            report["failures"][label] = str(exc)[:2000]

    try:
        if "startup" in scenarios:
            for peer in peers_for("startup"):

                def do_startup(peer: str = peer) -> None:
                    results["startup"][peer] = suite.startup(peer)

                attempt(f"startup {peer}", do_startup)
        stream_wanted = {"fanout", "commands", "ramp"} & set(scenarios)
        stream_peers = [p for p in PEERS if any(p in peers_for(s) for s in stream_wanted)]
        for peer in stream_peers:
            want = {s for s in stream_wanted if peer in peers_for(s)}

            def do_stream(peer: str = peer, want: set[str] = want) -> None:
                out = suite.stream(peer, want)
                if "fanout" in want and "fanout" in out:
                    results["fanout"][peer] = out["fanout"]
                if "commands" in want:
                    results["commands"][peer] = {
                        "unloaded": out.get("commands_unloaded"),
                        "under_fanout": out.get("commands_loaded"),
                    }
                if "ramp" in want and "ramp" in out:
                    results["ramp"][peer] = out["ramp"]
                if "fanout" not in scenarios and "fanout" in out:
                    results.setdefault("fanout_for_commands", {})[peer] = out["fanout"]

            attempt(f"stream {peer}", do_stream)
        if "idle" in scenarios or "storm" in scenarios:
            conn_peers = [p for p in PEERS if p in peers_for("idle") or p in peers_for("storm")]
            for peer in conn_peers:
                sizes: list[int] = []
                if "idle" in scenarios and peer in peers_for("idle"):
                    sizes = [
                        n
                        for n in cfg.idle_sizes
                        if n <= 2000 or only is not None or peer in BIG_IDLE_PEERS
                    ]
                storm = "storm" in scenarios and peer in peers_for("storm")

                def do_conns(
                    peer: str = peer, sizes: list[int] = sizes, storm: bool = storm
                ) -> None:
                    out = suite.connections(peer, sizes, storm)
                    if sizes:
                        results["idle"][peer] = out["idle"]
                    if storm:
                        results["storm"][peer] = out["storm"]
                    results.setdefault("startup_samples", {})[peer] = out["startup_samples"]

                attempt(f"connections {peer}", do_conns)
    finally:
        suite.close()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["loadavg_at_end"] = loadavg()
    report["ratios"] = ratios(results)
    report["targets"] = targets(results, report["ratios"])
    return report


# --------------------------------------------------------------------- ratios, targets


def _get(d: dict[str, Any], *path: str) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, dict) or key not in cur or cur[key] is None:
            return None
        cur = cur[key]
    return cur


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(float(a) / float(b), 3)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ramp = results.get("ramp", {})
    best = {p: _get(ramp, p, "best_deliveries_per_s") for p in ramp}
    out["ramp_bridge_over_ceiling"] = _ratio(best.get("bridge"), best.get("ceiling"))
    out["ramp_bridge_over_channels"] = _ratio(best.get("bridge"), best.get("channels"))
    steps = _get(ramp, "channels", "steps")
    if best.get("bridge") and best.get("channels") == 0 and steps:
        # Channels passed no step: it sustains less than the lowest rate tried.
        floor = min(s["target_deliveries_per_s"] for s in steps)
        out["ramp_bridge_over_channels_lower_bound"] = _ratio(best["bridge"], floor)
    lossless = {p: _get(ramp, p, "best_lossless_deliveries_per_s") for p in ramp}
    out["ramp_loss_only_bridge_over_ceiling"] = _ratio(
        lossless.get("bridge"), lossless.get("ceiling")
    )
    out["ramp_loss_only_bridge_over_channels"] = _ratio(
        lossless.get("bridge"), lossless.get("channels")
    )
    fan = results.get("fanout", {})
    dps = {p: _get(fan, p, "deliveries_per_s") for p in fan}
    p99 = {p: _get(fan, p, "latency_ms", "p99") for p in fan}
    out["fanout_deliveries_bridge_over_ceiling"] = _ratio(dps.get("bridge"), dps.get("ceiling"))
    out["fanout_deliveries_bridge_over_channels"] = _ratio(dps.get("bridge"), dps.get("channels"))
    out["fanout_p99_bridge_over_ceiling"] = _ratio(p99.get("bridge"), p99.get("ceiling"))
    out["fanout_p99_bridge_tls_over_ceiling_tls"] = _ratio(
        p99.get("bridge-tls"), p99.get("ceiling-tls")
    )
    idle = results.get("idle", {})

    def kb(peer: str, n: int) -> Any:
        for row in idle.get(peer, []):
            if row["connections"] == n:
                return row["kb_per_connection"]
        return None

    for n in (2000, 10000):
        out[f"idle{n}_kb_bridge_over_ceiling"] = _ratio(kb("bridge", n), kb("ceiling", n))
        out[f"idle{n}_kb_bridge_over_channels"] = _ratio(kb("bridge", n), kb("channels", n))
    storm = results.get("storm", {})
    rate = {p: _get(storm, p, "connected_per_s") for p in storm}
    out["storm_bridge_over_ceiling"] = _ratio(rate.get("bridge"), rate.get("ceiling"))
    out["storm_bridge_over_channels"] = _ratio(rate.get("bridge"), rate.get("channels"))
    out["storm_bridge_tls_over_ceiling_tls"] = _ratio(
        rate.get("bridge-tls"), rate.get("ceiling-tls")
    )
    cmd = results.get("commands", {})
    c99 = {p: _get(cmd, p, "unloaded", "confirmed_ms", "p99") for p in cmd}
    out["commands_p99_bridge_over_ceiling"] = _ratio(c99.get("bridge"), c99.get("ceiling"))
    out["commands_p99_bridge_over_channels"] = _ratio(c99.get("bridge"), c99.get("channels"))
    return out


def targets(results: dict[str, dict[str, Any]], r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, met: bool | None) -> None:
        rows.append({"target": name, "wanted": target, "measured": value, "met": met})

    def le(value: Any, limit: float) -> bool | None:
        return None if value is None else float(value) <= limit

    def ge(value: Any, limit: float) -> bool | None:
        return None if value is None else float(value) >= limit

    ratio = r.get("ramp_bridge_over_ceiling")
    add("ramp: bridge vs ceiling", ">= 0.70 x", ratio, ge(ratio, 0.7))
    ratio = r.get("ramp_bridge_over_channels")
    bound = r.get("ramp_bridge_over_channels_lower_bound")
    if ratio is None and bound is not None:
        add(
            "ramp: bridge vs Channels",
            ">= 30 x",
            f"> {bound} (Channels passed no step)",
            bound >= 30,
        )
    else:
        add("ramp: bridge vs Channels", ">= 30 x", ratio, ge(ratio, 30))
    fan = results.get("fanout", {})
    for peer, limit in (("bridge", 10.0), ("bridge-tls", 25.0)):
        res = fan.get(peer)
        if res is None:
            add(f"fan-out {peer}: no loss, p99", f"<= {limit:g} ms", None, None)
            continue
        p99 = res["latency_ms"]["p99"]
        met = res["loss"] == 0 and not res["checks"]["closes"] and le(p99, limit) is True
        add(
            f"fan-out {peer}: no loss, p99",
            f"loss 0, p99 <= {limit:g} ms",
            f"loss {res['loss_pct']} %, p99 {p99} ms",
            met,
        )
    idle = results.get("idle", {})
    for peer, limit in (("bridge", 15.0), ("bridge-tls", 40.0)):
        rows_ = idle.get(peer, [])
        worst = max((row["kb_per_connection"] for row in rows_), default=None)
        add(f"idle {peer}: KB per connection", f"<= {limit:g} KB", worst, le(worst, limit))
    for peer in ("bridge", "bridge-tls"):
        big = [row for row in idle.get(peer, []) if row["connections"] >= 10000]
        held = big[0]["held"] if big else None
        value = f"{big[0]['open_after_hold']}/{big[0]['connections']} open" if big else None
        add(f"idle {peer}: 10 000 connections held", "all open, no close", value, held)
    cmd = results.get("commands", {})
    for peer in ("bridge", "bridge-tls"):
        p99 = _get(cmd, peer, "unloaded", "confirmed_ms", "p99")
        p99 = None if p99 is None else round(float(p99), 2)
        add(f"commands {peer}: p99 unloaded", "<= 5 ms", p99, le(p99, 5))
    start = results.get("startup", {})
    samples = results.get("startup_samples", {})
    for peer in ("bridge", "bridge-tls"):
        times = list(_get(start, peer, "to_listening_s") or [])
        times += [s["to_listening_s"] for s in samples.get(peer, [])]
        med = round(statistics.median(times), 2) if times else None
        add(f"start-up {peer}: to 'listening on'", "<= 3 s (median)", med, le(med, 3))
    rss = list(_get(start, "bridge", "fresh_rss_mb") or [])
    rss += [s["fresh_rss_mb"] for s in samples.get("bridge", [])]
    med = round(statistics.median(rss), 1) if rss else None
    add("idle RSS, fresh bridge with Django, no connections", "<= 60 MB", med, le(med, 60))
    return rows


# --------------------------------------------------------------------- Markdown


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and spec:
        return format(value, spec)
    if isinstance(value, int | float) and spec:
        return format(value, spec)
    return str(value)


def _results(commands: dict[str, Any]) -> str:
    if not commands:
        return "–"
    parts = [f"{k} {v}" for k, v in commands.get("results", {}).items()]
    if commands.get("unanswered"):
        parts.append(f"unanswered {commands['unanswered']}")
    return ", ".join(parts) or "–"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    m = report["machine"]
    parts = [
        f"Suite run {report['when']}{' (--quick)' if report['config']['quick'] else ''}: "
        f"{m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}; "
        f"load average {report['loadavg_at_start']} at the start, "
        f"{report.get('loadavg_at_end')} at the end; {report.get('elapsed_s')} s in all.",
    ]
    fan = res.get("fanout") or {}
    if fan:
        rows = []
        for peer, r in fan.items():
            s = r["server"]
            extra = "".join(
                f", {k[:-8]} {v:.0f}"
                for k, v in s.items()
                if k.endswith("_cpu_pct") and k != "cpu_pct"
            )
            rows.append(
                [
                    peer,
                    f"{r['viewers_connected']}/{r['config']['viewers']}",
                    f"{r['deliveries_per_s']:,.0f}",
                    f"{r['loss_pct']:.3f}",
                    _fmt(r["latency_ms"]["p50"]),
                    _fmt(r["latency_ms"]["p99"]),
                    f"{s['cpu_pct']:.0f}{extra}",
                    f"{s['rss_mb']:.0f}",
                    f"{r['generator']['cpu_pct']:.0f}",
                    f"{r['machine']['busy_pct']:.0f}" + (" (noisy)" if noisy(r["machine"]) else ""),
                ]
            )
        parts.append(
            "### Fan-out: 1000 viewers x 5 of 100 devices, 1000 statuses/s of 200 B\n\n"
            + _table(
                [
                    "peer",
                    "viewers",
                    "deliveries/s",
                    "loss %",
                    "p50 ms",
                    "p99 ms",
                    "server CPU %",
                    "server RSS MB",
                    "gen CPU %",
                    "machine busy %",
                ],
                rows,
            )
        )
    ramp = res.get("ramp") or {}
    if ramp:
        rows = []
        for peer, r in ramp.items():
            best = next((s for s in r["steps"] if s["ok"] and s["rate"] == r["best_rate"]), None)
            rows.append(
                [
                    peer,
                    f"{r['best_deliveries_per_s']:,.0f}",
                    _fmt(r["best_rate"]),
                    _fmt(r["best_p99_ms"]),
                    _fmt(best["server_cpu_pct"]) if best else "–",
                    _fmt(r["first_failing_rate"]),
                    f"{r.get('best_lossless_deliveries_per_s', 0):,.0f}",
                    " ".join(f"{s['rate']:g}{'✓' if s['ok'] else '✗'}" for s in r["steps"]),
                ]
            )
        parts.append(
            "### Ramp: highest sustained deliveries/s (loss <= 1 %, p99 <= 100 ms)\n\n"
            + _table(
                [
                    "peer",
                    "deliveries/s",
                    "statuses/s",
                    "p99 ms there",
                    "server CPU % there",
                    "first failing statuses/s",
                    "loss <= 1 % only: deliveries/s",
                    "steps (statuses/s)",
                ],
                rows,
            )
        )
    cmd = res.get("commands") or {}
    if cmd:
        rows = []
        for peer, r in cmd.items():
            u = r.get("unloaded") or {}
            lo = r.get("under_fanout") or {}
            rows.append(
                [
                    peer,
                    _fmt(_get(u, "confirmed_ms", "p50"), ".2f"),
                    _fmt(_get(u, "confirmed_ms", "p99"), ".2f"),
                    _fmt(_get(lo, "confirmed_ms", "p50"), ".2f"),
                    _fmt(_get(lo, "confirmed_ms", "p99"), ".2f"),
                    f"{_results(u)} / {_results(lo)}",
                ]
            )
        parts.append(
            "### Commands: COMMAND -> COMMAND_RESULT confirmed round trip\n\n"
            + _table(
                [
                    "peer",
                    "unloaded p50 ms",
                    "unloaded p99 ms",
                    "under fan-out p50 ms",
                    "under fan-out p99 ms",
                    "results (unloaded / loaded)",
                ],
                rows,
            )
        )
    idle = res.get("idle") or {}
    if idle:
        rows = []
        for peer, lst in idle.items():
            for r in lst:
                extra = ""
                if "redis_kb_per_connection" in r:
                    extra = f" (+{r['redis_kb_per_connection']:.1f} in Redis)"
                rows.append(
                    [
                        peer,
                        f"{r['connections']:,}",
                        f"{r['open_after_hold']:,}"
                        + ("" if r["held"] else f" closes {r['closes']}"),
                        f"{r['kb_per_connection']:.1f}{extra}",
                        f"{r['rss_before_mb']:.0f} → {r['rss_after_mb']:.0f}",
                        f"{r['connect_s']:.1f}",
                        f"{r['idle_server_cpu_pct']:.1f}",
                    ]
                )
        parts.append(
            "### Idle: identified, subscribed (5 devices), heartbeating connections\n\n"
            + _table(
                [
                    "peer",
                    "connections",
                    "open after hold",
                    "KB per connection",
                    "server RSS MB",
                    "opened in s",
                    "server CPU % idle",
                ],
                rows,
            )
        )
    storm = res.get("storm") or {}
    if storm:
        rows = [
            [
                peer,
                f"{r['connected']}/{r['connections']}",
                str(r["concurrency"]),
                _fmt(r["connected_per_s"], ".0f"),
                _fmt(r["connect_ms_p50"], ".0f"),
                _fmt(r["connect_ms_p99"], ".0f"),
                f"{r['server_cpu_pct']:.0f}",
            ]
            for peer, r in storm.items()
        ]
        parts.append(
            "### Connect storm: handshake + IDENTIFY to READY\n\n"
            + _table(
                [
                    "peer",
                    "ready",
                    "in flight",
                    "READY/s",
                    "p50 ms",
                    "p99 ms",
                    "server CPU %",
                ],
                rows,
            )
        )
    start = res.get("startup") or {}
    if start:
        rows = [
            [
                peer,
                f"{r['to_listening_median_s']:.2f}",
                " ".join(f"{t:.2f}" for t in r["to_listening_s"]),
                f"{r['fresh_rss_median_mb']:.0f}",
            ]
            for peer, r in start.items()
        ]
        parts.append(
            "### Start-up: spawn to the `listening on` line; RSS of the fresh server\n\n"
            + _table(["peer", "median s", "runs s", "fresh RSS MB"], rows)
        )
    ratio_rows = [[k, _fmt(v)] for k, v in report["ratios"].items() if v is not None]
    if ratio_rows:
        parts.append("### Ratios\n\n" + _table(["ratio", "value"], ratio_rows))
    target_rows = [
        [
            t["target"],
            t["wanted"],
            _fmt(t["measured"]),
            {True: "met", False: "**not met**", None: "not measured"}[t["met"]],
        ]
        for t in report["targets"]
    ]
    parts.append(
        "### Targets\n\n" + _table(["target", "wanted", "measured", "status"], target_rows)
    )
    if report["failures"]:
        parts.append(
            "### Failures\n\n"
            + "\n".join(f"- {k}: {v.splitlines()[0][:300]}" for k, v in report["failures"].items())
        )
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (~5 min)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--peers", help=f"only these peers, from {','.join(PEERS)}")
    parser.add_argument("--python", default=sys.executable, help="python of the project venv")
    parser.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    parser.add_argument(
        "--bridge-cmd",
        help="command template for the bridge peers instead of the preset (placeholders as "
        "in fanout.py --server-cmd); the server gets SIGUSR2/SIGUSR1 around each measured "
        "window, as bench/profile_bridge.py expects",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a setting of Config (e.g. idle_sizes=2000,10000 or ramp_max_steps=10)",
    )
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--report",
        metavar="SUITE.json",
        help="run nothing: recompute ratios and targets of a saved run and print its Markdown",
    )
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        saved["ratios"] = ratios(saved["results"])
        saved["targets"] = targets(saved["results"], saved["ratios"])
        print(markdown(saved))
        return 0
    try:
        report = run(args)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    text = markdown(report)
    print(text)
    if not args.no_save:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-suite{'-quick' if args.quick else ''}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text)
        log(f"wrote {out / stem}.json and .md")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
