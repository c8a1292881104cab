"""Soak: hold 2000 viewers at half capacity for an hour and watch the server's memory.

Every viewer is identified, subscribed and heartbeating (``bench/loadgen.mjs``)
while the Node-RED stand-in (``bench/upstream_standin.py``) streams statuses.
The server's RSS is sampled every ``--sample`` seconds; the figure is its
growth from the ``--baseline-at`` mark (5 minutes into the hold, after the
allocator and caches have settled) to the end, with a target under 5 %.
Prints one JSON object (and writes it to ``bench/results/`` unless
``--no-save``).  Not run in CI.

    .venv/bin/python bench/soak.py                          # 1 h, the real soak
    .venv/bin/python bench/soak.py --duration 300 --baseline-at 60   # a short check

Load: "half capacity" is half of what bench/README.md measured the bridge to
sustain on one core (50 000 deliveries/s): by default 2000 viewers x 5 of 100
devices (100 viewers per device) at 250 statuses/s = 25 000 deliveries/s.

The bridge caps live sessions per user (4008 past the cap), so viewers are
spread over ``ceil(viewers / --per-user)`` users of one group that may read
every device, one load generator process per user (the generator identifies
all its viewers as one user).  Provisioning, the stand-in, the server and the
generators' plumbing come from ``bench/fanout.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from fanout import (  # noqa: E402  (bench/ is not a package)
    BenchError,
    Child,
    Rig,
    ServerSpec,
    assign,
    log,
    raise_fd_limit,
    run_admin,
    tree_cpu_ticks,
    tree_memory_kb,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
GROUP = "soak"

# One Django process: users in one group that reads every device, and a token each.
USERS_SCRIPT = """
import json
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from bridge.devices.models import Device, Grant
from bridge.identity import make_token
group, _ = Group.objects.get_or_create(name={group!r})
for device in Device.objects.all():
    Grant.objects.get_or_create(device=device, group=group, defaults={{"permission": "read"}})
tokens = {{}}
for name in {names!r}:
    user = get_user_model()(username=name)
    user.set_password({password!r})
    user.save()
    user.groups.add(group)
    tokens[name] = make_token(user)
print("SOAK_TOKENS=" + json.dumps(tokens))
"""


def provision_users(rig: Rig, count: int) -> dict[str, str]:
    names = [f"soak-{i:03d}" for i in range(count)]
    script = USERS_SCRIPT.format(group=GROUP, names=names, password=rig.password)
    out = run_admin(rig.python, rig.data_dir, ["shell", "-c", script])
    marker = [line for line in out.splitlines() if line.startswith("SOAK_TOKENS=")]
    if not marker:
        raise BenchError(f"no SOAK_TOKENS line in: {out[-300:]!r}")
    tokens: dict[str, str] = json.loads(marker[-1].split("=", 1)[1])
    return tokens


def start_generators(
    rig: Rig, plan: list[list[str]], tokens: dict[str, str], per_user: int, concurrency: int
) -> list[Child]:
    """One loadgen process per user, each with at most ``per_user`` viewers."""
    gens: list[Child] = []
    users = list(tokens)
    for g, start in enumerate(range(0, len(plan), per_user)):
        user = users[g]
        cfg = {
            "id": g,
            "url": rig.ws_url,
            "token": tokens[user],
            "token_url": rig.base + "api/token/",
            "username": user,
            "password": rig.password,
            "viewers": plan[start : start + per_user],
            "concurrency": max(1, concurrency // max(1, len(users))),
            "connect_timeout_ms": 30000,
            "token_refresh_s": 40,
            "deflate": False,
        }
        gens.append(rig.spawn_loadgen(f"soak-loadgen-{g}", cfg))
    return gens


def report(gens: list[Child]) -> dict[str, Any]:
    """Ask every generator how its viewers are doing and add the answers up."""
    for gen in gens:
        gen.send({"cmd": "report"})
    answers = [gen.wait_event("report", 30) for gen in gens]
    closes: dict[str, int] = {}
    for a in answers:
        for code, n in a.get("closes", {}).items():
            closes[code] = closes.get(code, 0) + int(n)
    return {
        "open": sum(int(a["open"]) for a in answers),
        "ready": sum(int(a["ready"]) for a in answers),
        "closes_after_ready": closes,
        "hb_sent": sum(int(a["hb_sent"]) for a in answers),
        "hb_acks": sum(int(a["hb_acks"]) for a in answers),
        "seq_violations": sum(int(a["seq_violations"]) for a in answers),
        "errors": [e for a in answers for e in a.get("errors", [])][:10],
    }


def growth(samples: list[tuple[float, float]], baseline_at: float) -> dict[str, Any]:
    """RSS growth from the baseline mark to the end, two ways.

    ``growth_pct`` compares the sample at the mark with the last one;
    ``growth_pct_minute_means`` compares the means of the first and the last
    minute after the mark, which a single GC-timed sample cannot swing.
    """
    after = [(t, rss) for t, rss in samples if t >= baseline_at]
    if len(after) < 2:
        return {"growth_pct": None, "note": "the run ended before the baseline mark"}
    base, end = after[0][1], after[-1][1]
    first = [rss for t, rss in after if t < after[0][0] + 60]
    last = [rss for t, rss in after if t > after[-1][0] - 60]
    return {
        "baseline_at_s": round(after[0][0], 1),
        "baseline_rss_mb": round(base, 1),
        "end_at_s": round(after[-1][0], 1),
        "end_rss_mb": round(end, 1),
        "growth_pct": round(100 * (end - base) / base, 2),
        # Needs two whole minutes after the mark, or the two means share samples.
        "growth_pct_minute_means": round(
            100 * (statistics.mean(last) - statistics.mean(first)) / statistics.mean(first), 2
        )
        if after[-1][0] - after[0][0] >= 120
        else None,
        "max_rss_mb_after_baseline": round(max(rss for _, rss in after), 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    n_users = math.ceil(args.viewers / args.per_user)
    spec = ServerSpec(kind="bridge", tls=args.tls)
    with Rig(spec, args.python, args.devices, args.data_dir, args.keep) as rig:
        devices = rig.prepare()
        tokens = provision_users(rig, n_users)
        plan = assign(args.viewers, args.subs, devices)
        nodered = rig.start_standin(args.rate, args.size)
        rig.start_server(nodered, args.start_timeout)
        rig.wait_link(args.start_timeout)
        assert rig.standin is not None and rig.server is not None
        rig.standin.send({"cmd": "start"})
        server_pid = rig.server.popen.pid

        gens = start_generators(rig, plan, tokens, args.per_user, args.concurrency)
        readies = [g.wait_event("ready", args.ready_timeout) for g in gens]
        connected = sum(int(r["connected"]) for r in readies)
        ramp = max(float(r["ramp_s"]) for r in readies)
        log(f"{connected}/{args.viewers} viewers subscribed in {ramp:.1f} s; holding")
        if connected < args.viewers:
            errors = [e for r in readies for e in r.get("errors", [])][:5]
            raise BenchError(f"only {connected}/{args.viewers} viewers got through: {errors}")
        at_start = report(gens)

        samples: list[tuple[float, float]] = []
        reports: list[dict[str, Any]] = []
        t0 = time.monotonic()
        ticks0 = tree_cpu_ticks(server_pid)
        next_report = t0 + args.report_every
        while True:
            elapsed = time.monotonic() - t0
            rss_mb = tree_memory_kb(server_pid)["VmRSS"] / 1024
            samples.append((elapsed, rss_mb))
            if rig.server.popen.poll() is not None:
                raise BenchError(f"the server died after {elapsed:.0f} s{rig.server.tail_text()}")
            if time.monotonic() >= next_report:
                r = report(gens)
                reports.append({"at_s": round(elapsed, 1), **r})
                log(
                    f"{elapsed:5.0f} s: RSS {rss_mb:.1f} MB, {r['open']} open, "
                    f"closes {r['closes_after_ready'] or 'none'}"
                )
                next_report += args.report_every
            if elapsed >= args.duration:
                break
            time.sleep(min(args.sample, max(0.0, args.duration - elapsed)))
        hold = time.monotonic() - t0
        server_cpu = 100 * (tree_cpu_ticks(server_pid) - ticks0) / CLK_TCK / hold
        at_end = report(gens)
        rig.standin.send({"cmd": "stats"})
        standin = rig.standin.wait_event("stats", 10)
        memory = rig.server_memory()

        figures = growth(samples, args.baseline_at)
        ok = (
            figures.get("growth_pct") is not None
            and figures["growth_pct"] < args.target_pct
            and at_end["open"] == args.viewers
            and not at_end["closes_after_ready"]
            and at_end["seq_violations"] == 0
        )
        return {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kind": "soak",
            "config": {
                "viewers": args.viewers,
                "users": n_users,
                "per_user": args.per_user,
                "devices": args.devices,
                "subs": args.subs,
                "rate": args.rate,
                "size": args.size,
                "tls": args.tls,
                "duration_s": args.duration,
                "sample_s": args.sample,
                "baseline_at_s": args.baseline_at,
                "target_growth_pct": args.target_pct,
                "deliveries_per_s_target": args.rate * args.viewers * args.subs / args.devices,
            },
            "rss": {
                **figures,
                "hwm_mb": memory["hwm_mb"],
                "samples": [[round(t, 1), round(m, 1)] for t, m in samples],
            },
            "server_cpu_pct": round(server_cpu, 1),
            "ramp_s": round(ramp, 1),
            "viewers": {"at_start": at_start, "at_end": at_end, "reports": reports},
            "standin": standin,
            "pass": ok,
            "data_dir": str(rig.data_dir) if args.keep else None,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--subs", type=int, default=5, help="devices per viewer")
    parser.add_argument("--rate", type=float, default=250, help="statuses/s from upstream")
    parser.add_argument("--size", type=int, default=200, help="status payload bytes")
    parser.add_argument("--duration", type=float, default=3600, help="seconds held")
    parser.add_argument("--sample", type=float, default=10, help="seconds between RSS samples")
    parser.add_argument(
        "--baseline-at", type=float, default=300, help="seconds into the hold: growth from here"
    )
    parser.add_argument("--target-pct", type=float, default=5.0, help="allowed RSS growth")
    parser.add_argument("--report-every", type=float, default=60, help="viewer health checks")
    parser.add_argument(
        "--per-user", type=int, default=80, help="viewers per user (the server caps sessions)"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="viewers connecting at once")
    parser.add_argument("--tls", action="store_true", help="serve and connect over wss")
    parser.add_argument("--start-timeout", type=float, default=60)
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--python", default=sys.executable, help="python of the venv")
    parser.add_argument("--data-dir", help="use (and keep) this data dir instead of a temp one")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir and logs")
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_save:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-soak-{args.viewers}v-{args.duration:g}s.json"
        (out / name).write_text(text + "\n")
        log(f"wrote {out / name}")
    return 0 if result["pass"] else 2


if __name__ == "__main__":
    sys.exit(main())
