"""How many statuses/s the Node-RED link carries into the hub, with no viewers.

Starts the fast Node-RED stand-in at a given rate over 100 devices and a
bridge that dials it, then reads the hub's ``bridge_statuses_total`` from
/metrics over a window: the rate the link and the hub really took in.

    python bench/link_intake.py --rate 25000 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKEN = "link-intake-bench"


def admin(data: Path, *args: str) -> str:
    out = subprocess.run(
        [str(BIN / "bridge-admin"), "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def statuses(url: str) -> float:
    req = urllib.request.Request(url + "metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return float(re.search(r"^bridge_statuses_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=25_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="link-intake-"))
    admin(data, "migrate", "-v", "0")
    ids = []
    for i in range(args.devices):
        ids.append(admin(data, "adddevice", f"d{i}", "--kind", "sensor", "--history", "10"))
    (data / "devices.json").write_text(json.dumps(ids))
    standin = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "upstream_standin.py"),
            "--port",
            "0",
            "--devices-file",
            str(data / "devices.json"),
            "--rate",
            str(args.rate),
            "--size",
            str(args.size),
            "--autostart",
            "--no-stdin",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = standin.stdout.readline()  # type: ignore[union-attr]
    port = json.loads(line)["port"]
    env = dict(os.environ, BRIDGE_METRICS_TOKEN=TOKEN)
    log = open(data / "twistd.log", "w")
    bridge = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "bridge",
            "--port",
            "0",
            "--data-dir",
            str(data),
            "--nodered",
            f"ws://127.0.0.1:{port}/ws/bridge",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(data),
    )
    try:
        url = ""
        for _ in range(200):
            found = re.search(r"listening on (http://\S+/)", (data / "twistd.log").read_text())
            if found:
                url = found.group(1)
                break
            time.sleep(0.1)
        time.sleep(3.0)  # link up, warm
        start_n, start_t = statuses(url), time.monotonic()
        cpu0 = sum(map(int, open(f"/proc/{bridge.pid}/stat").read().split()[13:15]))
        time.sleep(args.duration)
        end_n, end_t = statuses(url), time.monotonic()
        cpu1 = sum(map(int, open(f"/proc/{bridge.pid}/stat").read().split()[13:15]))
        rate = (end_n - start_n) / (end_t - start_t)
        cpu = (cpu1 - cpu0) / os.sysconf("SC_CLK_TCK") / (end_t - start_t) * 100
        result = {
            "offered_per_s": args.rate,
            "taken_in_per_s": round(rate),
            "server_cpu_pct": round(cpu),
        }
        print(json.dumps(result))
    finally:
        bridge.terminate()
        standin.terminate()
        bridge.wait(60)


if __name__ == "__main__":
    main()
