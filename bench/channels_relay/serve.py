"""Start the Channels relay: its upstream worker and daphne, as one command.

Run with the Python of ``bench/.venv-channels`` (``bench/suite.py`` creates it)::

    bench/.venv-channels/bin/python bench/channels_relay/serve.py --port 0 \\
        --nodered ws://127.0.0.1:8765/ws/bridge [--tls --data-dir DIR]

It clears the relay's keys (its own prefix, in its own Redis database) so that
groups left over by an earlier run cannot slow this one, starts
``django-admin relay_upstream`` and ``daphne channels_relay.asgi:application``,
and prints ``channels_relay listening on http(s)://host:port/`` once daphne
listens (the line ``bench/fanout.py`` waits for). SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
DAPHNE_LISTENING = re.compile(r"Listening on TCP address (\S+):(\d+)")


def clear_keys(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()
    return len(keys)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--nodered", required=True, help="ws:// URL of the upstream")
    parser.add_argument("--tls", action="store_true", help="serve wss (self-signed)")
    parser.add_argument("--data-dir", help="where tls/cert.pem and tls/key.pem live")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--prefix", default="bridge-bench-relay")
    parser.add_argument("--devices", type=int, default=100, help="ids dev-0000 ... in READY")
    parser.add_argument("--heartbeat-ms", type=int, default=30000)
    args = parser.parse_args(argv)

    cleared = clear_keys(args.redis, args.prefix)
    print(f"channels_relay: cleared {cleared} stale keys under {args.prefix!r}", flush=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["DJANGO_SETTINGS_MODULE"] = "channels_relay.settings"
    env["RELAY_REDIS_URL"] = args.redis
    env["RELAY_REDIS_PREFIX"] = args.prefix
    env["RELAY_DEVICES"] = str(args.devices)
    env["RELAY_HEARTBEAT_MS"] = str(args.heartbeat_ms)
    env["PYTHONUNBUFFERED"] = "1"

    if args.tls:
        from twisted.internet.endpoints import quoteStringArgument

        sys.path.insert(0, str(BENCH))
        from ceiling_autobahn import ensure_cert

        cert, key = ensure_cert(Path(args.data_dir or HERE / ".tls"))
        endpoint = (
            f"ssl:{args.port}:privateKey={quoteStringArgument(str(key))}"
            f":certKey={quoteStringArgument(str(cert))}:interface={args.interface}"
        )
        scheme = "https"
    else:
        endpoint = f"tcp:{args.port}:interface={args.interface}"
        scheme = "http"

    python = sys.executable
    worker = subprocess.Popen(
        [python, "-m", "django", "relay_upstream", "--nodered", args.nodered], env=env
    )
    # Access log off: the bridge writes none per WebSocket either.
    daphne = subprocess.Popen(
        [
            python,
            "-m",
            "daphne",
            "-e",
            endpoint,
            "--access-log",
            os.devnull,
            "channels_relay.asgi:application",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    children = {"relay_upstream": worker, "daphne": daphne}

    def pump() -> None:
        assert daphne.stdout is not None
        for raw in iter(daphne.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            print(line, flush=True)
            m = DAPHNE_LISTENING.search(line)
            if m:
                print(
                    f"channels_relay listening on {scheme}://{m.group(1)}:{m.group(2)}/",
                    flush=True,
                )

    threading.Thread(target=pump, daemon=True).start()

    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping.is_set():
        for name, child in children.items():
            if child.poll() is not None:
                print(f"channels_relay: {name} exited ({child.returncode})", flush=True)
                code = child.returncode or 1
                stopping.set()
        stopping.wait(0.5)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 10
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return code


if __name__ == "__main__":
    sys.exit(main())
