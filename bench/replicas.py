"""Replica benchmark: one vs several ``--redis`` replicas behind one stand-in upstream.

Reuses ``bench/fanout.py``'s :class:`Rig` (stand-in, provisioning, load
generators, measurement) and only changes what differs: every replica shares
one PostgreSQL database (created for the run and dropped after), one Redis key
prefix and one data directory (so one secret key), and the viewers are split
round-robin across the replicas.  Only the leader holds the stand-in link; the
other replicas get every status over Redis.

    /tmp/venv/bin/python bench/replicas.py --replicas 1 --viewers 1000
    /tmp/venv/bin/python bench/replicas.py --replicas 2 --viewers 1000

CPU is summed over every replica ("server"); memory is the first replica's.
Needs Redis at 127.0.0.1:6379, PostgreSQL at 127.0.0.1:5432 (user postgres,
trust) and psycopg.  Not run in CI.
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
from fanout import PER_USER, BenchError, Gens, Rig, ServerSpec, assign, log  # noqa: E402

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
            gens = rig.start_split_gens(plan, args.gen_procs, 50, 40)
            ready = rig.wait_ready(gens, 180)
            log(f"{ready['connected']}/{args.viewers} viewers subscribed")
            result = rig.measure(gens, args.duration, args.warmup, args.grace)
            rig.standin.send({"cmd": "stop"})
            return {
                "replicas": args.replicas,
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
