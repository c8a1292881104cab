"""Replica benchmark: one vs several ``--redis`` replicas behind one stand-in upstream.

Reuses ``bench/fanout.py``'s :class:`Rig` (stand-in, provisioning, load
generators, measurement) and only changes what differs: every replica shares
one PostgreSQL database (created for the run and dropped after), one Redis key
prefix and one data directory (so one secret key), and the viewers are split
round-robin across the replicas.  Only the leader holds the stand-in link; the
other replicas get every status over Redis.

    .venv/bin/python bench/replicas.py --replicas 1 --viewers 1000
    .venv/bin/python bench/replicas.py --replicas 2 --viewers 1000

CPU is summed over every replica ("server") and given per replica with its
role ("replicas"); Redis's CPU is "redis_cpu_pct"; memory is the first
replica's.  ``--profile DIR`` runs ``py-spy record`` (raw collapsed stacks,
``--nonblocking``) on every replica during the window, to find what limits a
follower.  Needs Redis at 127.0.0.1:6379, PostgreSQL at 127.0.0.1:5432 (user
postgres, trust) and psycopg.  Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fanout  # noqa: E402
from fanout import (  # noqa: E402
    CLK_TCK,
    PER_USER,
    BenchError,
    Gens,
    Rig,
    ServerSpec,
    assign,
    find_process,
    log,
    proc_cpu_ticks,
)

PG = "host=127.0.0.1 port=5432 user=postgres"
REDIS = "redis://127.0.0.1:6379/0"


class ReplicaRig(Rig):
    """A Rig whose server is N replicas; gens connect to them in turn."""

    def __init__(self, replicas: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_replicas = replicas
        self.replicas: list[tuple[Any, str, str]] = []

    def start_replicas(self, nodered: str, timeout: float) -> None:
        for _ in range(self.n_replicas):
            self.start_server(nodered, timeout)
            assert self.server is not None
            self.replicas.append((self.server, self.base, self.ws_url))

    def server_pids(self) -> dict[str, list[int]]:
        return {"server": [s.popen.pid for s, _, _ in self.replicas], **self.extra_pids}

    def watch_replicas(self, duration: float, profile: Path | None) -> dict[str, Any]:
        """Each replica's CPU over the window (run as measure's ``during``), and profiles."""
        import shutil
        import subprocess
        import time

        pids = [s.popen.pid for s, _, _ in self.replicas]
        spies = []
        if profile is not None:
            spy = shutil.which("py-spy") or str(Path(self.python).parent / "py-spy")
            profile.mkdir(parents=True, exist_ok=True)
            for i, pid in enumerate(pids):
                out = profile / f"replica{i}-{pid}.txt"
                argv = [spy, "record", "-p", str(pid), "-d", str(int(duration)), "-r", "200"]
                argv += ["--nonblocking", "-f", "raw", "-o", str(out)]
                spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        before = [proc_cpu_ticks(pid) for pid in pids]
        at = time.monotonic()
        time.sleep(duration)
        after = [proc_cpu_ticks(pid) for pid in pids]
        elapsed = time.monotonic() - at
        for spy_proc in spies:
            spy_proc.wait(60)
        return {
            "cpu_pct": [
                round(100 * (b - a) / CLK_TCK / elapsed, 1)
                for a, b in zip(before, after, strict=True)
            ]
        }

    def roles(self) -> list[str]:
        import urllib.request

        roles = []
        for _, base, _ in self.replicas:
            with urllib.request.urlopen(base + "healthz", timeout=5) as response:
                roles.append(json.loads(response.read())["role"])
        return roles

    def start_split_gens(
        self, plan: list[list[str]], procs: int, concurrency: int, refresh: float
    ) -> Gens:
        """One Rig.start_gens per replica over its share of the viewers, merged."""
        children, slices = [], []
        per = max(1, procs // len(self.replicas))
        for r, (_, base, ws_url) in enumerate(self.replicas):
            indices = list(range(r, len(plan), len(self.replicas)))
            self.base, self.ws_url = base, ws_url
            sub = self.start_gens([plan[i] for i in indices], per, concurrency, refresh)
            children += sub.children
            slices += [[indices[i] for i in s] for s in sub.slices]
        return Gens(children, slices, plan)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    db = f"bridge_bench_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{db}"
    prefix = f"bridge-bench-{secrets.token_hex(4)}"
    template = (
        "{twistd} -n --pidfile= bridge --port 0 --data-dir {data_dir} --nodered {nodered} "
        f"--redis {REDIS} --redis-prefix {prefix} --connect-rate 0"
    )
    spec = ServerSpec(kind="bridge", cmd=template, label=f"bridge x{args.replicas}")
    spec.provision = "shell"
    n_users = max(40, (args.viewers + PER_USER - 1) // PER_USER + 1)
    try:
        rig_args = (spec, args.python, args.devices, None, args.keep, n_users)
        with ReplicaRig(args.replicas, *rig_args) as rig:
            devices = rig.prepare()
            plan = assign(args.viewers, args.subs, devices)
            nodered = rig.start_standin(args.rate, args.size)
            rig.start_replicas(nodered, 60)
            rig.wait_link(60)
            assert rig.standin is not None
            rig.standin.send({"cmd": "start"})
            redis_pid = find_process("redis-server")
            if redis_pid is not None:
                rig.extra_pids["redis"] = [redis_pid]
            gens = rig.start_split_gens(plan, args.gen_procs, 50, 40)
            ready = rig.wait_ready(gens, 180)
            log(f"{ready['connected']}/{args.viewers} viewers subscribed")
            watched: dict[str, Any] = {}

            def during() -> None:
                watched.update(rig.watch_replicas(args.duration, args.profile))

            result = rig.measure(gens, args.duration, args.warmup, args.grace, during=during)
            rig.standin.send({"cmd": "stop"})
            roles = rig.roles()
            return {
                "replicas": args.replicas,
                "per_replica": [
                    {"role": role, "cpu_pct": cpu}
                    for role, cpu in zip(roles, watched.get("cpu_pct", []), strict=False)
                ],
                "config": {**vars(args), "tls": False, "deflate": False},
                **result,
                "target_deliveries_per_s": args.rate * args.viewers * args.subs / args.devices,
            }
    finally:
        with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--subs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--grace", type=float, default=3)
    parser.add_argument("--gen-procs", type=int, default=2)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    parser.add_argument("--profile", type=Path, help="py-spy record every replica into DIR")
    args = parser.parse_args(argv)
    fanout.raise_fd_limit()
    try:
        result = run(args)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    print(json.dumps(result, indent=2, default=str))
    print()
    print(fanout.markdown_header())
    print(fanout.markdown_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
