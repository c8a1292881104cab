"""A real ``twistd bridge`` on a PostgreSQL of its own that is stopped and started again.

The cluster is made for the run (``initdb`` into a temporary directory, a free
port, trust authentication) so that it can be stopped without touching the
machine's PostgreSQL.  The issue's promise under test: database connections
are bounded by the thread pools and survive a database restart, without
restarting the bridge.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.server import BIN, BridgeProcess, _env
from tests.support import require
from tests.test_replicas import _psycopg, free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DB = "bridge"
# Threads of the ORM pool and of the WSGI pool (bridge.service).
POOL_CONNECTIONS = 4 + 10
PASSWORD = "pw-op-123456"


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class PrivatePostgres:
    """initdb, pg_ctl start and stop -m fast; as the postgres user when we are root."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            os.chown(self.dir, pwd.getpwnam("postgres").pw_uid, -1)
            self._as = ["runuser", "-u", "postgres", "--"]
        atexit.register(self.destroy)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @staticmethod
    def available() -> bool:
        if not (PG_BIN / "initdb").exists():
            return False
        if os.geteuid() != 0:
            return True
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return shutil.which("runuser") is not None

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(PG_BIN / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{DB}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.dir / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        psycopg = _psycopg()
        with psycopg.connect(f"{self.dsn} dbname={DB}", autocommit=True) as conn:
            return list(conn.execute(sql, args).fetchall())

    def bridge_connections(self) -> int:
        """Server connections to the bridge's database, other than this query's own."""
        [(n,)] = self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'",
            DB,
        )
        return int(n)


class DatabaseRestartTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        require(_psycopg() is not None, "psycopg (pip install 'psycopg[binary]')")
        require(PrivatePostgres.available(), f"PostgreSQL 15 binaries in {PG_BIN}")
        self.pg = PrivatePostgres()
        self.pg.start()
        psycopg = _psycopg()
        with psycopg.connect(f"{self.pg.dsn} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DB}"')
        self.server = BridgeProcess(tls=False, env={"DATABASE_URL": self.pg.url})
        self.addCleanup(self.server.stop, signal.SIGKILL)
        yield self.admin("migrate")
        for name in ("op", "temp"):
            yield self.admin("adduser", name, "--password-stdin", stdin=f"pw-{name}-123456")
        self.lamp = yield self.admin("adddevice", "lamp", "--kind", "toggle", "--history", "500")
        yield self.admin("grant", "--user", "op", self.lamp, "change")
        yield self.admin("grant", "--user", "temp", self.lamp, "read")
        yield self.server.start(60)

    @defer.inlineCallbacks
    def admin(self, *args: str, stdin: str | None = None) -> Any:
        out, err, code = yield admin_with_db(self.server.data_dir, self.pg.url, *args, stdin=stdin)
        self.assertEqual(code, 0, err)
        return out

    @defer.inlineCallbacks
    def health(self) -> Any:
        response = yield treq.get(self.server.url + "healthz", timeout=5, persistent=False)
        body = yield response.json()
        return body

    @defer.inlineCallbacks
    def token_api(self) -> Any:
        """POST /api/token/ (Django, on the WSGI pool): (status, token or None)."""
        response = yield treq.post(
            self.server.url + "api/token/",
            json={"username": "op", "password": PASSWORD},
            timeout=15,
            persistent=False,
        )
        body = yield response.content()
        token = None
        if response.code == 200:
            import json

            token = json.loads(body)["token"]
        return response.code, token

    @defer.inlineCallbacks
    def connect(self, user: str, token: str | None = None) -> Any:
        from tests.wsclient import connect

        c = yield connect(self.server.ws_url)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        if token is None:
            token = yield self.admin("token", user)
        c.send({"op": 3, "d": {"token": token}})
        return c

    @defer.inlineCallbacks
    def viewer(self, user: str) -> Any:
        c = yield self.connect(user)
        yield c.event("READY")
        c.send({"op": 7, "d": {"devices": [self.lamp], "history": False}})
        yield c.event("SUBSCRIBED")
        return c

    @defer.inlineCallbacks
    def command(self, c: Any, payload: Any, client_id: str) -> Any:
        c.send({"op": 4, "d": {"device": self.lamp, "payload": payload, "id": client_id}})
        frames = yield c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent", timeout=10
        )
        result = frames[-1]["d"]
        self.assertEqual(result["result"], "confirmed", result)
        return result["command_id"]

    def audited(self, command_id: str) -> str | None:
        rows = self.pg.query(
            "SELECT result FROM bridge_auditentry WHERE command_id = %s AND action = 'command'",
            command_id,
        )
        self.assertLessEqual(len(rows), 1, "one audit row per command")
        return str(rows[0][0]) if rows else None

    @defer.inlineCallbacks
    def eventually(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = yield defer.maybeDeferred(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            yield sleep(0.2)

    @defer.inlineCallbacks
    def test_restart_of_the_database_costs_nothing_but_the_outage(self) -> Any:
        op = yield self.viewer("op")
        temp = yield self.viewer("temp")
        before = yield self.command(op, True, "before")
        yield self.eventually(lambda: self.audited(before) == "confirmed", 5, "audit before")
        # Tokens for after the restart are made now: bridge-admin needs the database.
        token = yield self.admin("token", "op")

        self.pg.stop("fast")
        stopped_at = time.monotonic()
        # IDENTIFY fails closed, and quickly, while the database is away.
        refused = yield self.connect("op", token)
        frames = yield refused.until(lambda f: f.get("t") == "ERROR", timeout=10)
        self.assertEqual(frames[-1]["d"]["code"], 4000)
        self.assertEqual(frames[-1]["d"]["message"], "authentication unavailable, try again")
        code, _ = yield refused.closed(5)
        self.assertEqual(code, 4000)
        # Live sessions go on: commands are confirmed; history and audit wait.
        during = yield self.command(op, False, "during")
        health = yield self.health()
        self.assertGreaterEqual(health["store_backlog"], 2, health)
        self.assertEqual(health["database"]["state"], "down", health)
        code, _ = yield self.token_api()
        self.assertEqual(code, 500)
        yield sleep(max(0.0, 3.0 - (time.monotonic() - stopped_at)))
        self.assertIsNone(self.server.proc.poll() if self.server.proc else 0, "still running")

        self.pg.start()
        restarted_at = time.monotonic()

        @defer.inlineCallbacks
        def drained() -> Any:
            health = yield self.health()
            return health["store_backlog"] == 0

        yield self.eventually(drained, 15, "history and audit written after the restart")
        self.assertEqual(self.audited(during), "confirmed", "the outage's audit was kept")
        [(statuses,)] = self.pg.query(
            "SELECT count(*) FROM bridge_statusrecord WHERE command_id = %s", during
        )
        self.assertEqual(statuses, 1, "the outage's status was kept, once")
        drain = time.monotonic() - restarted_at

        health = yield self.health()
        self.assertEqual(health["database"]["state"], "up", health)
        # New IDENTIFYs (with a token made before and one from the token API,
        # on the WSGI pool), audited commands and revocations work again.
        again = yield self.connect("op", token)
        yield again.event("READY", timeout=10)
        code, fresh = yield self.token_api()
        self.assertEqual(code, 200)
        again = yield self.connect("op", fresh)
        yield again.event("READY", timeout=10)
        after = yield self.command(op, True, "after")
        yield self.eventually(lambda: self.audited(after) == "confirmed", 5, "audit after")
        yield self.admin("revoke", "--user", "temp", self.lamp)
        revoked_at = time.monotonic()
        removed = yield temp.event("DEVICE_REMOVED", timeout=5)
        self.assertEqual(removed["d"]["device"], self.lamp)
        revocation = time.monotonic() - revoked_at
        self.assertLess(revocation, 1.5, f"revocation took {revocation:.2f} s")
        print(f"\nbacklog written {drain:.2f} s after the restart; revocation {revocation:.2f} s")
        # The outage is said once, and its end once: no traceback per retry.
        text = self.server.log_text()
        self.assertEqual(text.count("database unavailable ("), 1, text[-3000:])
        self.assertEqual(text.count("database reachable again"), 1, text[-3000:])
        self.assertNotIn("reading changes failed", text)
        self.assertNotIn("could not write", text)
        self.assertNotIn("authentication could not be checked", text)

    @defer.inlineCallbacks
    def test_connections_stay_within_the_pools_through_a_burst_and_a_restart(self) -> Any:
        tokens = []
        for _ in range(3):
            token = yield self.admin("token", "op")
            tokens.append(token)
        peak = 0

        def sample() -> None:
            nonlocal peak
            peak = max(peak, self.pg.bridge_connections())

        @defer.inlineCallbacks
        def burst(n: int) -> Any:
            """n IDENTIFYs (ORM pool) and n/3 token requests (WSGI pool) at once."""
            clients = yield defer.gatherResults(
                [self.connect("op", tokens[i % len(tokens)]) for i in range(n)]
            )
            sample()
            api = defer.gatherResults([self.token_api() for _ in range(n // 3)])
            yield defer.gatherResults([c.event("READY", timeout=60) for c in clients])
            sample()
            answers = yield api
            self.assertEqual({code for code, _ in answers}, {200})
            sample()
            for c in clients:
                c.proto.dropConnection(abort=True)

        yield burst(60)
        self.pg.stop("fast")
        self.pg.start()
        tokens = []
        for _ in range(3):
            token = yield self.admin("token", "op")
            tokens.append(token)
        yield burst(60)
        for _ in range(10):
            sample()
            yield sleep(0.1)
        print(f"\npeak server connections of the bridge: {peak}")
        self.assertGreater(peak, 0)
        self.assertLessEqual(peak, POOL_CONNECTIONS)


@defer.inlineCallbacks
def admin_with_db(data_dir: Path, url: str, *args: str, stdin: str | None = None) -> Any:
    """bridge-admin against this test's database, without blocking the reactor."""
    argv = [str(BIN / "bridge-admin"), "--data-dir", str(data_dir), *args]
    env = _env({"DATABASE_URL": url})
    if stdin is None:
        out, err, code = yield getProcessOutputAndValue(argv[0], argv[1:], env=env)
    else:
        script = f"printf '%s\\n' {shlex.quote(stdin)} | " + " ".join(map(shlex.quote, argv))
        out, err, code = yield getProcessOutputAndValue("/bin/sh", ["-c", script], env=env)
    return out.decode().strip(), err.decode().strip(), code
