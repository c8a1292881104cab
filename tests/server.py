"""A real ``twistd bridge`` process for end-to-end tests, and bridge-admin calls."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import REPO

BIN = Path(sys.executable).parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("BRIDGE_DATA_DIR", None)
    env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    # Every test connects from 127.0.0.1 and many fail on purpose; the
    # throttle has its own test with a low limit.
    env.setdefault("BRIDGE_LOGIN_FAILURE_LIMIT", "100000")
    env.update(extra or {})
    return env


class BridgeProcess:
    """Starts twistd, waits for its 'listening on' line, and stops it."""

    def __init__(
        self,
        data_dir: Path | None = None,
        tls: bool = True,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="bridge-e2e-"))
            import atexit
            import shutil

            atexit.register(shutil.rmtree, data_dir, True)
        self.data_dir = data_dir
        self.tls = tls
        self.args = args or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = self.data_dir / "twistd.log"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "ws/"

    @property
    def ca_pem(self) -> bytes:
        return (self.data_dir / "tls" / "cert.pem").read_bytes()

    @defer.inlineCallbacks
    def start(self, timeout: float = 30.0) -> Any:
        cmd = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "bridge",
            "--port",
            "0",
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        if self.tls:
            cmd.append("--tls")
        self.log_file = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=_env(self.env),
            cwd=str(self.data_dir),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(
                rb"listening on (https?://[^\s]+/)", self.log_path.read_bytes()[offset:]
            )
            if match:
                self.url = match.group(1).decode()
                return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited: {self.log_path.read_text()[-3000:]}")
            yield task.deferLater(reactor, 0.1, lambda: None)
        raise RuntimeError(f"twistd did not listen in time: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if hasattr(self, "log_file"):
            self.log_file.close()

    @defer.inlineCallbacks
    def stop_async(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Any:
        """Signal the process and wait for it without blocking the reactor."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                yield task.deferLater(reactor, 0.05, lambda: None)
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, *args: str, stdin: str | None = None) -> defer.Deferred[tuple[str, str, int]]:
        return admin(self.data_dir, *args, stdin=stdin)


@defer.inlineCallbacks
def admin(
    data_dir: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> Any:
    """Run bridge-admin without blocking the reactor: (stdout, stderr, exit code).

    ``env`` adds variables, e.g. the ``DATABASE_URL`` of a bridge on PostgreSQL.
    """
    argv = ["--data-dir", str(data_dir), *args]
    if stdin is not None:
        # getProcessOutputAndValue has no stdin; a shell pipe keeps it simple.
        import shlex

        cmd = (
            f"printf '%s\\n' {shlex.quote(stdin)} | {shlex.quote(str(BIN / 'bridge-admin'))} "
            + " ".join(shlex.quote(a) for a in argv)
        )
        out, err, code = yield getProcessOutputAndValue("/bin/sh", ["-c", cmd], env=_env(env))
    else:
        out, err, code = yield getProcessOutputAndValue(
            str(BIN / "bridge-admin"), argv, env=_env(env)
        )
    return out.decode().strip(), err.decode().strip(), code


def admin_sync(
    data_dir: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> tuple[str, str, int]:
    proc = subprocess.run(
        [str(BIN / "bridge-admin"), "--data-dir", str(data_dir), *args],
        input=(stdin + "\n").encode() if stdin is not None else None,
        capture_output=True,
        env=_env(env),
        timeout=60,
    )
    return proc.stdout.decode().strip(), proc.stderr.decode().strip(), proc.returncode


def kill_on_exit(proc: BridgeProcess) -> None:
    import atexit

    atexit.register(proc.stop, signal.SIGKILL)


_ = REPO
