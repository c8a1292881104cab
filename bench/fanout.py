"""Fan-out benchmark: N viewers, each on S of D devices, fed R statuses/s by a stand-in.

One command provisions a throwaway data directory, starts the stand-in upstream
(``bench/upstream_standin.py``), starts the server under test dialling it as its
Node-RED link, connects the viewers (``bench/loadgen.mjs``, Node + ``ws``), lets
the load warm up, measures for ``--duration`` seconds and prints a JSON result
and a Markdown table row; the JSON also goes to ``bench/results/``.

    .venv/bin/python bench/fanout.py                      # the bridge, ws
    .venv/bin/python bench/fanout.py --tls                # the bridge, wss
    .venv/bin/python bench/fanout.py --server ceiling     # raw Autobahn ceiling
    .venv/bin/python bench/fanout.py --server channels    # Django Channels peer

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
USERNAME = "benchuser"

SERVER_PRESETS = {
    # Every load-generator connection comes from 127.0.0.1: no per-address connect rate.
    "bridge": "{twistd} -n --pidfile= bridge --port 0 --data-dir {data_dir} "
    "--nodered {nodered} --connect-rate 0 {tls}",
    "ceiling": "{python} {bench}/ceiling_autobahn.py --port 0 --data-dir {data_dir} "
    "--nodered {nodered} {tls}",
    # Django Channels + daphne + channels_redis (bench/channels_relay/, own venv, Redis).
    "channels": "{channels_python} {bench}/channels_relay/serve.py --port 0 "
    "--data-dir {data_dir} --nodered {nodered} --devices {devices} {tls}",
}
LISTENING = re.compile(r"listening on\s+(https?)://(\[[^\]]+\]|[^\s/:]+):(\d+)/")

# Latency histogram layout shared with loadgen.mjs.
FINE = 100_000
NBUCKETS = FINE + 60_000


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- /proc


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def proc_children(pid: int) -> list[int]:
    """All descendants of pid."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_ticks(pid: int) -> int:
    return sum(proc_cpu_ticks(p) for p in [pid, *proc_children(pid)])


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    result = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in result:
                    result[key] = int(line.split()[1])
    except OSError:
        pass
    return result


def tree_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over pid and its descendants (daphne + worker, say)."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in [pid, *proc_children(pid)]:
        for key, value in proc_memory_kb(p).items():
            total[key] += value
    return total


def find_process(name: str) -> int | None:
    """The pid of a running process whose command name is ``name`` (e.g. redis-server)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == name:
                    return int(entry)
        except OSError:
            continue
    return None


def system_cpu() -> tuple[int, int, int]:
    """(busy, softirq, total) jiffies summed over all cores since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, values[6], total


def all_process_ticks() -> dict[int, int]:
    """CPU ticks of every live process, to tell other jobs on the machine apart."""
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ticks[int(entry)] = proc_cpu_ticks(int(entry))
    return ticks


# --------------------------------------------------------------------- children


@dataclass
class Child:
    """A child process whose output is drained by a thread into a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    logfile: Path
    json_events: bool = False
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    tail: list[str] = field(default_factory=list)
    on_line: Callable[[str], None] | None = None
    readers: list[threading.Thread] = field(default_factory=list)

    def start_readers(self) -> None:
        streams: list[IO[bytes]] = [s for s in (self.popen.stdout, self.popen.stderr) if s]
        out = self.logfile.open("a", buffering=1)
        for stream in streams:
            is_stdout = stream is self.popen.stdout
            reader = threading.Thread(
                target=self._drain, args=(stream, out, is_stdout), daemon=True
            )
            reader.start()
            self.readers.append(reader)

    def _drain(self, stream: IO[bytes], out: IO[str], is_stdout: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if self.json_events and is_stdout and line.startswith("{"):
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    pass
                out.write(line[:2000] + "\n")
            else:
                out.write(line + "\n")
            self.tail.append(line[:500])
            del self.tail[:-30]
            if self.on_line is not None:
                self.on_line(line)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(obj) + "\n").encode())
        self.popen.stdin.flush()

    def wait_event(
        self, kind: str, timeout: float, predicate: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(
                    f"{self.name}: no {kind!r} within {timeout:.0f} s{self.tail_text()}"
                )
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None:
                    # Its last line (a generator's result, megabytes of JSON)
                    # may still be on its way through the reader thread.
                    for reader in self.readers:
                        reader.join(max(0.0, min(30.0, deadline - time.monotonic())))
                    if not self.events.empty():
                        continue
                    raise BenchError(
                        f"{self.name} exited ({self.popen.returncode}) waiting for {kind!r}"
                        f"{self.tail_text()}"
                    ) from None
                continue
            if event.get("event") == kind and (predicate is None or predicate(event)):
                return event

    def tail_text(self) -> str:
        return "\n  last output:\n    " + "\n    ".join(self.tail[-15:]) if self.tail else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        except ProcessLookupError:
            pass


def spawn(
    name: str,
    argv: Sequence[str],
    logdir: Path,
    env: dict[str, str] | None = None,
    json_events: bool = False,
    stdin: bool = False,
    merge_stderr: bool = False,
    on_line: Callable[[str], None] | None = None,
) -> Child:
    command = shlex.join(argv)
    log(f"start {name}: {command if len(command) < 400 else command[:400] + ' ...'}")
    popen = subprocess.Popen(
        list(argv),
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        start_new_session=True,
    )
    child = Child(name, popen, logdir / f"{name}.log", json_events=json_events, on_line=on_line)
    child.start_readers()
    return child


# --------------------------------------------------------------------- provisioning


def project_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def admin_argv(python: str, data_dir: Path, args: Iterable[str]) -> list[str]:
    script = Path(python).parent / "bridge-admin"
    if script.exists():
        head = [str(script)]
    else:
        head = [python, "-c", "import sys; from bridge.cli import main; sys.exit(main())"]
    return [*head, "--data-dir", str(data_dir), *args]


def run_admin(
    python: str, data_dir: Path, args: Sequence[str], stdin: str | None = None, tries: int = 1
) -> str:
    argv = admin_argv(python, data_dir, args)
    for attempt in range(1, tries + 1):
        proc = subprocess.run(
            argv, cwd=REPO, env=project_env(), input=stdin, capture_output=True, text=True
        )
        if proc.returncode == 0:
            return proc.stdout
        if attempt == tries:
            raise BenchError(
                f"bridge-admin {' '.join(args[:2])} failed ({proc.returncode}): "
                f"{proc.stderr.strip()[-800:]}"
            )
        time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


# One Django process creating every user, device and grant through the documented
# management commands (call_command), instead of hundreds of processes. Viewers are
# spread over many users (the bridge limits live sessions per user), all in one group
# that holds the grants. "--" because a random device id may start with "-", which
# argparse would take for an option.
SHELL_SCRIPT = """
import contextlib, io, json
from django.core.management import call_command
for name in {users!r}:
    call_command("adduser", name, "--group", {group!r}, stdout=io.StringIO())
ids = []
for name in {names!r}:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        call_command("adddevice", name, "--kind", "sensor", "--history", "{history}", stdout=buf)
    ids.append(buf.getvalue().split()[-1])
for device_id in ids:
    with contextlib.redirect_stdout(io.StringIO()):
        call_command(
            "grant", "--group", {group!r}, "--", device_id, {permission!r}, stdout=io.StringIO()
        )
print("BENCH_IDS=" + json.dumps(ids))
"""

# A long-lived Django process printing a fresh IDENTIFY token for every bench user
# (bridge.identity.make_token, what `bridge-admin token` prints) every 20 s: tokens
# live 60 s, and opening 10 000 connections takes longer than that.
MINT_SCRIPT = """
import json, time
from django.contrib.auth import get_user_model
from bridge.identity import make_token
users = list(get_user_model()._default_manager.filter(groups__name={group!r}))
while True:
    tokens = {{u.get_username(): make_token(u) for u in users}}
    print(json.dumps({{"event": "tokens", "tokens": tokens}}), flush=True)
    time.sleep(20)
"""
GROUP = "bench"
PER_USER = 50  # live connections per user (the bridge refuses past 100 by default)


def bench_users(n: int) -> list[str]:
    return [f"bench-u{i:04d}" for i in range(n)]


def provision(
    python: str,
    data_dir: Path,
    n_devices: int,
    password: str,
    mode: str,
    permission: str = "read",
    n_users: int = 40,
) -> list[str]:
    started = time.monotonic()
    run_admin(python, data_dir, ["migrate", "--noinput"])
    run_admin(
        python,
        data_dir,
        ["adduser", USERNAME, "--password-stdin", "--group", GROUP],
        stdin=password + "\n",
    )
    names = [f"bench-{i:04d}" for i in range(n_devices)]
    users = bench_users(n_users)
    ids: list[str] | None = None
    if mode in ("auto", "shell"):
        try:
            script = SHELL_SCRIPT.format(
                users=users, group=GROUP, names=names, history=10, permission=permission
            )
            output = run_admin(python, data_dir, ["shell", "-c", script])
            marker = [line for line in output.splitlines() if line.startswith("BENCH_IDS=")]
            if not marker:
                raise BenchError(f"no BENCH_IDS line in shell output: {output[-300:]!r}")
            ids = [str(x) for x in json.loads(marker[-1].split("=", 1)[1])]
        except BenchError as exc:
            if mode == "shell":
                raise
            log(f"one-process provisioning failed, falling back to the CLI per call: {exc}")
            ids = None
    if ids is None:
        # Two workers: the machine has two cores and SQLite serialises writes anyway.
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(
                pool.map(
                    lambda u: run_admin(
                        python, data_dir, ["adduser", u, "--group", GROUP], tries=5
                    ),
                    users,
                )
            )
            outs = list(
                pool.map(
                    lambda n: run_admin(
                        python,
                        data_dir,
                        ["adddevice", n, "--kind", "sensor", "--history", "10"],
                        tries=5,
                    ),
                    names,
                )
            )
            ids = [o.split()[-1] for o in outs]
            list(
                pool.map(
                    lambda d: run_admin(
                        python,
                        data_dir,
                        ["grant", "--group", GROUP, "--", d, permission],
                        tries=5,
                    ),
                    ids,
                )
            )
    log(
        f"provisioned {len(users)} users and {len(ids)} devices in "
        f"{time.monotonic() - started:.1f} s"
    )
    return ids


# --------------------------------------------------------------------- results


def bucket_value_ms(index: int) -> float:
    if index < FINE:
        return (index + 0.5) / 1000
    return FINE / 1000 + (index - FINE) + 0.5


def percentiles(hist: dict[int, int], qs: Sequence[float]) -> dict[str, float | None]:
    total = sum(hist.values())
    result: dict[str, float | None] = {}
    if total == 0:
        result = {f"p{q:g}": None for q in qs}
        result["max"] = None
        return result
    ordered = sorted(hist.items())
    for q in qs:
        target = q / 100 * total
        acc = 0
        for index, count in ordered:
            acc += count
            if acc >= target:
                result[f"p{q:g}"] = round(bucket_value_ms(index), 3)
                break
    result["max"] = round(bucket_value_ms(ordered[-1][0]), 3)
    return result


def assign(viewers: int, subs: int, devices: Sequence[str]) -> list[list[str]]:
    """Viewer v gets devices v*S .. v*S+S-1 (mod D): every device has N*S/D viewers."""
    d = len(devices)
    if subs > d:
        raise BenchError(f"--subs {subs} > --devices {d}")
    return [[devices[(v * subs + k) % d] for k in range(subs)] for v in range(viewers)]


@dataclass
class Sample:
    at: float
    ticks: dict[str, int]
    system: tuple[int, int, int]
    everyone: dict[int, int]


def take_sample(pids: dict[str, list[int]], everyone: bool = False) -> Sample:
    ticks = {name: sum(tree_cpu_ticks(p) for p in group) for name, group in pids.items()}
    return Sample(time.monotonic(), ticks, system_cpu(), all_process_ticks() if everyone else {})


def cpu_pct(a: Sample, b: Sample, name: str) -> float:
    return round(100 * (b.ticks[name] - a.ticks[name]) / CLK_TCK / (b.at - a.at), 1)


def machine_figures(a: Sample, b: Sample, ours: float) -> dict[str, Any]:
    """Whole-machine CPU in percent of one core (200 = both cores of this machine busy)."""
    cores = os.cpu_count() or 1
    total = max(1, b.system[2] - a.system[2])
    busy = 100 * cores * (b.system[0] - a.system[0]) / total
    softirq = 100 * cores * (b.system[1] - a.system[1]) / total
    processes = sum(t - a.everyone.get(pid, 0) for pid, t in b.everyone.items())
    all_procs = 100 * processes / CLK_TCK / (b.at - a.at)
    return {
        "cores": cores,
        "busy_pct": round(busy, 1),
        "softirq_pct": round(softirq, 1),
        "other_processes_pct": round(all_procs - ours, 1),
        "unattributed_pct": round(busy - softirq - all_procs, 1),
        "note": "percent of one core summed over cores (200 = all busy); softirq is mostly "
        "the kernel's loopback TCP work; other_processes is every other process alive at "
        "the window's end; unattributed is mostly processes that ended within the window "
        "(other jobs on this machine make every figure noisy)",
    }


def markdown_header() -> str:
    cols = [
        "server",
        "ws",
        "viewers",
        "subs/dev",
        "rate/s",
        "size B",
        "deliveries/s",
        "loss %",
        "p50 ms",
        "p99 ms",
        "server CPU %",
        "server RSS MB",
        "gen CPU %",
        "machine busy %",
    ]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def markdown_row(r: dict[str, Any]) -> str:
    c = r["config"]
    cells = [
        r["server"]["name"],
        "wss" if c["tls"] else "ws",
        f"{r['viewers_connected']}/{c['viewers']}",
        f"{c['subs']}/{c['devices']}",
        f"{c['rate']:g}",
        str(c["size"]),
        f"{r['deliveries_per_s']:,.0f}",
        f"{r['loss_pct']:.3f}",
        str(r["latency_ms"]["p50"]),
        str(r["latency_ms"]["p99"]),
        f"{r['server']['cpu_pct']:.0f}",
        f"{r['server']['rss_mb']:.0f}",
        f"{r['generator']['cpu_pct']:.0f}",
        f"{r['machine']['busy_pct']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------- the rig

CHANNELS_VENV = BENCH / ".venv-channels"
CHANNELS_REQUIREMENTS = BENCH / "channels_relay" / "requirements.txt"


def channels_python() -> Path:
    """The Python of bench/.venv-channels, created and filled on first use."""
    python = CHANNELS_VENV / "bin" / "python"
    stamp = CHANNELS_VENV / ".requirements"
    wanted = CHANNELS_REQUIREMENTS.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating {CHANNELS_VENV} (Channels, daphne, channels_redis)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CHANNELS_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(CHANNELS_REQUIREMENTS)],
        check=True,
    )
    stamp.write_text(wanted)
    return python


def redis_reachable(host: str = "127.0.0.1", port: int = 6379) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it): 10 000 sockets."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


@dataclass
class ServerSpec:
    """What to run: a preset (bridge, ceiling, channels) or a command template."""

    kind: str
    tls: bool = False
    cmd: str | None = None
    label: str | None = None
    provision: str = "auto"
    permission: str = "read"
    # Send the server SIGUSR2 when a measurement opens and SIGUSR1 when it closes
    # (bench/profile_bridge.py profiles exactly that window).
    signal_window: bool = False

    @property
    def name(self) -> str:
        return self.label or (self.kind if self.cmd is None else "custom")

    @property
    def template(self) -> str:
        return self.cmd or SERVER_PRESETS[self.kind]

    @property
    def provision_mode(self) -> str:
        if self.provision == "auto" and not (self.cmd is None and self.kind == "bridge"):
            return "none"
        return self.provision


@dataclass
class Gens:
    """Load generator processes sharing one plan (viewer v is in slices[v % procs])."""

    children: list[Child]
    slices: list[list[int]]
    plan: list[list[str]]

    def send(self, obj: dict[str, Any]) -> None:
        for gen in self.children:
            gen.send(obj)

    @property
    def pids(self) -> list[int]:
        return [g.popen.pid for g in self.children]


class Rig:
    """One server under test with its stand-in upstream, data dir and generators.

    ``bench/fanout.py`` uses it for one measurement; ``bench/suite.py`` for
    several in a row on the same server (fan-out, commands, the ramp's steps).
    """

    def __init__(
        self,
        spec: ServerSpec,
        python: str,
        n_devices: int,
        data_dir: str | None = None,
        keep: bool = False,
        n_users: int = 40,
    ) -> None:
        self.spec = spec
        self.n_users = n_users
        self._user_cursor = 0
        self.minter: Child | None = None
        self.tokens: dict[str, str] = {}
        self.live_gens: list[Gens] = []
        self.python = python
        self.n_devices = n_devices
        self.keep = keep
        self.own_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="fanout-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logdir = self.data_dir / "bench-logs"
        self.logdir.mkdir(exist_ok=True)
        self.children: list[Child] = []
        self.password = "bench-" + os.urandom(8).hex()
        self.devices: list[str] = []
        self.standin: Child | None = None
        self.server: Child | None = None
        self.server_argv: list[str] = []
        self.base = ""
        self.ws_url = ""
        self.extra_pids: dict[str, list[int]] = {}
        self._gen_count = 0
        self.profile_dumps = 0
        node = shutil.which("node")
        if node is None:
            raise BenchError("node is not on PATH")
        self.node = node
        if not (BENCH / "node_modules" / "ws").is_dir():
            log("installing the ws package (npm ci in bench/)")
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH, check=True)
        log(f"data dir {self.data_dir}")

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ setting up

    def prepare(self) -> list[str]:
        mode = self.spec.provision_mode
        if mode == "none":
            self.devices = [f"dev-{i:04d}" for i in range(self.n_devices)]
        else:
            self.devices = provision(
                self.python,
                self.data_dir,
                self.n_devices,
                self.password,
                mode,
                self.spec.permission,
                self.n_users,
            )
        (self.logdir / "devices.json").write_text(json.dumps(self.devices))
        return self.devices

    def start_standin(self, rate: float, size: int) -> str:
        standin = spawn(
            "standin",
            [
                self.python,
                str(BENCH / "upstream_standin.py"),
                "--port",
                "0",
                "--devices-file",
                str(self.logdir / "devices.json"),
                "--rate",
                str(rate),
                "--size",
                str(size),
            ],
            self.logdir,
            json_events=True,
            stdin=True,
        )
        self.children.append(standin)
        self.standin = standin
        uport = standin.wait_event("listening", 30)["port"]
        return f"ws://127.0.0.1:{uport}/ws/bridge"

    def start_server(
        self, nodered: str, timeout: float, env: dict[str, str] | None = None
    ) -> float:
        """Start the server; returns the seconds from spawn to its ``listening on`` line."""
        twistd = str(Path(self.python).parent / "twistd")
        template = self.spec.template
        fields = {
            "python": self.python,
            "twistd": twistd,
            "data_dir": self.data_dir,
            "nodered": nodered,
            "tls": "--tls" if self.spec.tls else "",
            "bench": BENCH,
            "repo": REPO,
            "devices": self.n_devices,
        }
        if "{channels_python}" in template:
            fields["channels_python"] = channels_python()
            if not redis_reachable():
                raise BenchError("the Channels peer needs Redis at 127.0.0.1:6379")
            redis_pid = find_process("redis-server")
            if redis_pid is not None:
                self.extra_pids["redis"] = [redis_pid]
        argv = shlex.split(template.format(**fields))
        # Each measurement starts a fresh server: sessions an earlier server in the
        # same data dir kept for RESUME (sessions.json) would otherwise be restored,
        # held in memory until they expire, and counted against this one.
        (self.data_dir / "sessions.json").unlink(missing_ok=True)
        found: queue.Queue[tuple[float, re.Match[str]]] = queue.Queue()

        def watch(line: str) -> None:
            m = LISTENING.search(line)
            if m:
                found.put((time.monotonic(), m))
            elif line.startswith("profile_bridge:") and "written to" in line:
                self.profile_dumps += 1

        server_env = project_env()
        server_env.update(env or {})
        started = time.monotonic()
        server = spawn(
            "server", argv, self.logdir, env=server_env, merge_stderr=True, on_line=watch
        )
        self.children.append(server)
        self.server = server
        self.server_argv = argv
        try:
            at, m = found.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(
                f"server printed no 'listening on' line within {timeout} s "
                f"(exit code {server.popen.poll()}){server.tail_text()}"
            ) from None
        scheme, host, port = m.group(1), m.group(2), int(m.group(3))
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        self.base = f"{scheme}://{host}:{port}/"
        self.ws_url = f"{'wss' if scheme == 'https' else 'ws'}://{host}:{port}/ws/"
        log(f"server listening on {self.base} after {at - started:.2f} s")
        return at - started

    def wait_link(self, timeout: float) -> None:
        assert self.standin is not None
        self.standin.wait_event("link", timeout, lambda e: bool(e.get("connected")))

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.children.remove(self.server)
            self.server = None

    def token(self) -> str:
        if self.spec.provision_mode == "none":
            return "bench"
        return run_admin(self.python, self.data_dir, ["token", USERNAME]).strip().split()[-1]

    def user_tokens(self) -> dict[str, str]:
        """Fresh tokens of every bench user, kept fresh by one minting process."""
        if self.minter is None:
            minter = spawn(
                "minter",
                admin_argv(
                    self.python,
                    self.data_dir,
                    ["shell", "-c", MINT_SCRIPT.format(group=GROUP)],
                ),
                self.logdir,
                env=project_env(),
                json_events=True,
            )
            self.children.append(minter)
            self.minter = minter
            self.tokens = minter.wait_event("tokens", 60)["tokens"]
            if not self.tokens:
                raise BenchError("the token minter found no bench users")
            threading.Thread(target=self._forward_tokens, daemon=True).start()
        return self.tokens

    def _forward_tokens(self) -> None:
        minter = self.minter
        while minter is not None and minter.popen.poll() is None:
            try:
                event = minter.wait_event("tokens", 3600)
            except BenchError:
                return
            self.tokens = event["tokens"]
            for gens in list(self.live_gens):
                for gen in gens.children:
                    if gen.popen.poll() is None:
                        try:
                            gen.send({"cmd": "tokens", "tokens": self.tokens})
                        except (OSError, ValueError):
                            pass

    def assign_users(self, n: int) -> list[str]:
        """Users for n new connections, PER_USER each, continuing where the last left."""
        if self.spec.provision_mode == "none":
            return []
        users = bench_users(self.n_users)
        first = self._user_cursor
        need = (n + PER_USER - 1) // PER_USER
        if need > len(users):
            raise BenchError(
                f"{n} connections need {need} users of {PER_USER} connections; "
                f"only {len(users)} were provisioned"
            )
        self._user_cursor = (first + need) % len(users)
        return [users[(first + i // PER_USER) % len(users)] for i in range(n)]

    def server_pids(self) -> dict[str, list[int]]:
        assert self.server is not None
        return {"server": [self.server.popen.pid], **self.extra_pids}

    def signal_server(self, signum: int) -> None:
        """SIGUSR2 opens a profiling window, SIGUSR1 closes it and waits for the dump."""
        if not self.spec.signal_window or self.server is None:
            return
        server = self.server
        before = self.profile_dumps
        try:
            os.kill(server.popen.pid, signum)
        except ProcessLookupError:
            return
        if signum != signal.SIGUSR1:
            return
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.popen.poll() is None:
            if self.profile_dumps > before:
                return
            time.sleep(0.2)
        log("the server wrote no profile within 300 s of SIGUSR1")

    def server_memory(self) -> dict[str, float]:
        assert self.server is not None
        mem = tree_memory_kb(self.server.popen.pid)
        return {"rss_mb": round(mem["VmRSS"] / 1024, 1), "hwm_mb": round(mem["VmHWM"] / 1024, 1)}

    # ------------------------------------------------------------ generators

    def spawn_loadgen(self, name: str, cfg: dict[str, Any]) -> Any:
        """One loadgen.mjs process reading ``cfg``; stopped with the rig."""
        path = self.logdir / f"{name}.json"
        path.write_text(json.dumps(cfg))
        gen = spawn(
            name,
            [self.node, str(BENCH / "loadgen.mjs"), str(path)],
            self.logdir,
            json_events=True,
            stdin=True,
        )
        self.children.append(gen)
        return gen

    def start_gens(
        self,
        plan: list[list[str]],
        procs: int = 1,
        concurrency: int = 50,
        token_refresh: float = 40,
        deflate: bool = False,
        connect_timeout_ms: int = 30000,
    ) -> Gens:
        users = self.assign_users(len(plan))
        tokens = self.user_tokens() if users else {}
        token = tokens.get(users[0], "") if users else self.token()
        procs = max(1, min(procs, len(plan)))
        slices = [list(range(g, len(plan), procs)) for g in range(procs)]
        children: list[Child] = []
        for indices in slices:
            g = self._gen_count
            self._gen_count += 1
            cfg = {
                "id": g,
                "url": self.ws_url,
                "token": token,
                "token_url": self.base + "api/token/"
                if self.spec.provision_mode != "none"
                else None,
                "username": USERNAME,
                "password": self.password,
                "viewers": [plan[v] for v in indices],
                "users": [users[v] for v in indices] if users else None,
                "tokens": tokens,
                "concurrency": max(1, concurrency // procs),
                "connect_timeout_ms": connect_timeout_ms,
                "token_refresh_s": token_refresh,
                "deflate": deflate,
            }
            children.append(self.spawn_loadgen(f"loadgen-{g}", cfg))
        gens = Gens(children, slices, plan)
        self.live_gens.append(gens)
        return gens

    def wait_ready(self, gens: Gens, timeout: float) -> dict[str, Any]:
        readies = [g.wait_event("ready", timeout) for g in gens.children]
        connected = sum(int(r["connected"]) for r in readies)
        ramp = max(float(r["ramp_s"]) for r in readies)

        def worst(key: str) -> float | None:
            values = [float(r[key]) for r in readies if r.get(key) is not None]
            return round(max(values), 1) if values else None

        return {
            "connected": connected,
            "failed": sum(int(r.get("failed", 0)) for r in readies),
            "ramp_s": round(ramp, 2),
            "connected_per_s": round(connected / ramp, 1) if ramp > 0 else None,
            "connect_ms_p50": worst("connect_ms_p50"),
            "connect_ms_p99": worst("connect_ms_p99"),
            "connect_ms_max": worst("connect_ms_max"),
            "errors": [e for r in readies for e in r.get("errors", [])][:10],
        }

    def stop_gens(self, gens: Gens) -> None:
        if gens in self.live_gens:
            self.live_gens.remove(gens)
        for gen in gens.children:
            try:
                gen.send({"cmd": "quit"})
            except OSError:
                pass
        for gen in gens.children:
            try:
                gen.popen.wait(10)
            except subprocess.TimeoutExpired:
                gen.stop()
            if gen in self.children:
                self.children.remove(gen)

    # ------------------------------------------------------------ measuring

    def measure(
        self,
        gens: Gens,
        duration: float,
        warmup: float,
        grace: float,
        keep: bool = False,
        during: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """One window of the status stream: loss, latency, CPU and memory.

        ``during`` runs in a thread while the window is open (commands under load).
        """
        assert self.standin is not None and self.server is not None
        standin, server = self.standin, self.server
        plan = gens.plan
        t0_ms = time.time_ns() / 1e6 + warmup * 1000
        t1_ms = t0_ms + duration * 1000
        gens.send(
            {
                "cmd": "window",
                "t0_ms": t0_ms,
                "t1_ms": t1_ms,
                "grace_ms": grace * 1000,
                "keep": keep,
            }
        )
        pids = {**self.server_pids(), "generator": gens.pids, "standin": [standin.popen.pid]}
        time.sleep(max(0.0, t0_ms / 1000 - time.time()))
        side: threading.Thread | None = None
        if during is not None:
            side = threading.Thread(target=during, daemon=True)
            side.start()
        self.signal_server(signal.SIGUSR2)
        first = take_sample(pids, everyone=True)
        log(f"measuring for {duration:g} s")
        peak_rss = 0
        per_second: list[float] = []
        prev = first
        while time.time() < t1_ms / 1000:
            time.sleep(min(1.0, max(0.0, t1_ms / 1000 - time.time())))
            now = take_sample(pids)
            if now.at - prev.at > 0.2:
                per_second.append(cpu_pct(prev, now, "server"))
            prev = now
            peak_rss = max(peak_rss, tree_memory_kb(server.popen.pid)["VmRSS"])
            if server.popen.poll() is not None:
                raise BenchError(f"server died during the run{server.tail_text()}")
        last = take_sample(pids, everyone=True)
        self.signal_server(signal.SIGUSR1)
        memory = tree_memory_kb(server.popen.pid)

        standin.send({"cmd": "counts", "t0_ms": t0_ms, "t1_ms": t1_ms})
        counts: dict[str, int] = standin.wait_event("counts", 30)["counts"]
        results = [g.wait_event("result", grace + 60) for g in gens.children]
        standin.send({"cmd": "stats"})
        stand_stats = standin.wait_event("stats", 10)
        if side is not None:
            side.join(60)

        seconds = len(results[0]["per_second"]["count"])
        sec_count = [0] * seconds
        sec_sum = [0.0] * seconds
        sec_max = [0.0] * seconds
        for res in results:
            ps = res["per_second"]
            for i in range(seconds):
                sec_count[i] += ps["count"][i]
                sec_sum[i] += ps["sum_ms"][i]
                sec_max[i] = max(sec_max[i], ps["max_ms"][i])
        hist: dict[int, int] = {}
        n = len(plan)
        per_viewer: list[int] = [0] * n
        ready: list[int] = [0] * n
        totals: dict[str, int] = {}
        closes: dict[str, int] = {}
        errors: list[str] = []
        for indices, res in zip(gens.slices, results, strict=True):
            for index, count in res["hist"]:
                hist[index] = hist.get(index, 0) + count
            for local, v in enumerate(indices):
                per_viewer[v] = res["per_viewer_in_window"][local]
                ready[v] = res["per_viewer_ready"][local]
            for key in (
                "status_frames",
                "in_window",
                "arrived_in_window",
                "foreign_status",
                "unexpected_device",
                "seq_violations",
                "seq_gaps",
                "seq_dups",
                "negative_latency",
                "hb_sent",
                "hb_acks",
                "bad_frames",
            ):
                totals[key] = totals.get(key, 0) + int(res[key])
            for code, k in res["closes"].items():
                closes[code] = closes.get(code, 0) + k
            errors.extend(res["errors"][:5])

        window = (t1_ms - t0_ms) / 1000
        # Viewers that never got subscribed are reported (viewers_connected), not counted
        # as loss; a viewer that dropped out later is loss.
        expected_per_viewer = [
            sum(counts.get(d, 0) for d in plan[v]) if ready[v] else 0 for v in range(n)
        ]
        expected = sum(expected_per_viewer)
        received = totals["in_window"]
        loss = expected - received
        worst = max(
            ((e - r) / e for e, r in zip(expected_per_viewer, per_viewer, strict=True) if e > 0),
            default=0.0,
        )
        ours = sum(cpu_pct(first, last, name) for name in pids)
        cut = int(window + 0.999)
        server_figures: dict[str, Any] = {
            "name": self.spec.name,
            "cmd": shlex.join(self.server_argv),
            "cpu_pct": cpu_pct(first, last, "server"),
            "cpu_pct_per_second": per_second,
            "rss_mb": round(memory["VmRSS"] / 1024, 1),
            "rss_peak_sampled_mb": round(peak_rss / 1024, 1),
            "hwm_mb": round(memory["VmHWM"] / 1024, 1),
        }
        for name in self.extra_pids:
            server_figures[f"{name}_cpu_pct"] = cpu_pct(first, last, name)
        return {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "server": server_figures,
            "viewers_connected": sum(ready),
            "statuses_sent": sum(counts.values()),
            "expected": expected,
            "received": received,
            "loss": loss,
            "loss_pct": round(100 * loss / expected, 4) if expected else 0.0,
            "worst_viewer_loss_pct": round(100 * worst, 3),
            "deliveries_per_s": round(received / window, 1),
            "arrivals_per_s": round(totals["arrived_in_window"] / window, 1),
            "latency_ms": percentiles(hist, (50, 90, 99, 99.9)),
            "latency_by_second": {
                "note": "by send time; a mean that keeps growing means a growing backlog",
                "count": sec_count[:cut],
                "mean_ms": [
                    round(t / c, 2) if c else None for t, c in zip(sec_sum, sec_count, strict=True)
                ][:cut],
                "max_ms": [round(m, 1) for m in sec_max][:cut],
            },
            "checks": {
                **{
                    k: totals[k]
                    for k in (
                        "seq_violations",
                        "seq_gaps",
                        "seq_dups",
                        "unexpected_device",
                        "foreign_status",
                        "negative_latency",
                        "bad_frames",
                        "hb_sent",
                        "hb_acks",
                    )
                },
                "closes": closes,
            },
            "generator": {
                "cpu_pct": cpu_pct(first, last, "generator"),
                "self_reported_cpu_pct": [r.get("cpu_pct") for r in results],
                "event_loop_utilization": [r.get("event_loop_utilization") for r in results],
                "loop_delay_ms": [r.get("loop_delay_ms") for r in results],
            },
            "standin": {"cpu_pct": cpu_pct(first, last, "standin"), **stand_stats},
            "machine": machine_figures(first, last, ours),
            "errors": errors[:20],
        }

    # ------------------------------------------------------------ tearing down

    def close(self) -> None:
        for child in reversed(self.children):
            if child.name.startswith("loadgen") or child.name == "standin":
                if child.popen.stdin:
                    try:
                        child.popen.stdin.close()
                    except OSError:
                        pass
            child.stop()
        self.children.clear()
        if self.keep:
            log(f"kept {self.data_dir} (logs in {self.logdir})")
        elif self.own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------- the run


def spec_from_args(args: argparse.Namespace) -> ServerSpec:
    return ServerSpec(
        kind=args.server,
        tls=args.tls,
        cmd=args.server_cmd,
        label=args.label,
        provision=args.provision,
        signal_window=args.profile_window,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = spec_from_args(args)
    n_users = max(40, (args.viewers + PER_USER - 1) // PER_USER + 1)
    with Rig(spec, args.python, args.devices, args.data_dir, args.keep, n_users) as rig:
        devices = rig.prepare()
        plan = assign(args.viewers, args.subs, devices)
        nodered = rig.start_standin(args.rate, args.size)
        rig.start_server(nodered, args.start_timeout)
        log("waiting for the server's upstream link")
        rig.wait_link(args.start_timeout)
        assert rig.standin is not None
        rig.standin.send({"cmd": "start"})
        gens = rig.start_gens(
            plan, args.gen_procs, args.concurrency, args.token_refresh, args.deflate
        )
        ready = rig.wait_ready(gens, args.ready_timeout)
        log(f"{ready['connected']}/{args.viewers} viewers subscribed in {ready['ramp_s']:.1f} s")
        if ready["connected"] == 0:
            raise BenchError(f"no viewer got through: {ready['errors'][:3]}")
        result = rig.measure(gens, args.duration, args.warmup, args.grace)
        rig.standin.send({"cmd": "stop"})
        result = {
            "when": result["when"],
            "config": {
                "viewers": args.viewers,
                "devices": args.devices,
                "subs": args.subs,
                "rate": args.rate,
                "size": args.size,
                "duration": args.duration,
                "warmup": args.warmup,
                "grace": args.grace,
                "tls": args.tls,
                "gen_procs": len(gens.children),
                "deflate": args.deflate,
                "provision": spec.provision_mode,
            },
            **result,
            "ramp_s": ready["ramp_s"],
            "target_deliveries_per_s": args.rate * args.viewers * args.subs / args.devices,
            "data_dir": str(rig.data_dir) if args.keep else None,
        }
        return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--subs", type=int, default=5, help="devices per viewer")
    parser.add_argument("--rate", type=float, default=1000, help="statuses/s from upstream")
    parser.add_argument("--size", type=int, default=200, help="status payload bytes")
    parser.add_argument("--duration", type=float, default=20, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5, help="seconds before measuring")
    parser.add_argument("--grace", type=float, default=3, help="seconds to wait for stragglers")
    parser.add_argument("--tls", action="store_true", help="serve and connect over wss")
    parser.add_argument("--server", choices=sorted(SERVER_PRESETS), default="bridge")
    parser.add_argument(
        "--server-cmd",
        help="command template run instead of --server; placeholders {python} {twistd} "
        "{data_dir} {nodered} {tls} {bench} {repo} {devices} {channels_python}; it must "
        "print 'listening on URL'",
    )
    parser.add_argument("--label", help="name of the server in the results")
    parser.add_argument(
        "--profile-window",
        action="store_true",
        help="send the server SIGUSR2 when the window opens and SIGUSR1 when it closes "
        "(for bench/profile_bridge.py)",
    )
    parser.add_argument(
        "--provision",
        choices=["auto", "shell", "cli", "none"],
        default="auto",
        help="auto: one `bridge-admin shell` process for the bridge (CLI per device if "
        "that fails), none for other servers (ids dev-NNNN, any token)",
    )
    parser.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--concurrency", type=int, default=50, help="viewers connecting at once")
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    parser.add_argument(
        "--token-refresh",
        type=float,
        default=40,
        help="seconds after which connecting viewers fetch a fresh token (POST /api/token/)",
    )
    parser.add_argument("--start-timeout", type=float, default=60)
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--python", default=sys.executable, help="python of the venv")
    parser.add_argument("--data-dir", help="use (and keep) this data dir instead of a temp one")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir and logs")
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    raise_fd_limit()

    try:
        result = run(args)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown_header())
    print(markdown_row(result))
    if not args.no_save:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        c = result["config"]
        name = (
            f"{time.strftime('%Y%m%d-%H%M%S')}-{result['server']['name']}-"
            f"{'wss' if c['tls'] else 'ws'}-{c['viewers']}v-{c['subs']}of{c['devices']}-"
            f"{c['rate']:g}r.json"
        )
        (out / name).write_text(text + "\n")
        log(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
