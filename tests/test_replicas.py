"""Several real ``twistd bridge --redis`` replicas behind one stand-in Node-RED.

The replicas share a PostgreSQL database (created for the run, dropped at the
end), a Redis key prefix unique to the run, and the Django secret key (each
replica has its own data directory with a copy of the same ``secret_key``), so
a token from ``bridge-admin token`` works on any replica.  The stand-in
Node-RED (``bench/upstream_standin.py``) runs in the test's own reactor, so the
test both drives statuses and sees every command and link that reaches it.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from bench.upstream_standin import LINK_PATH, Standin
from tests.server import BIN, BridgeProcess, _env
from tests.support import require

REDIS_SERVER = "/usr/bin/redis-server"
PG = "host=127.0.0.1 port=5432 user=postgres"
RUN = secrets.token_hex(4)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg


def require_components() -> None:
    require(_listening(6379), "Redis at 127.0.0.1:6379")
    require(_listening(5432), "PostgreSQL at 127.0.0.1:5432")
    require(_psycopg() is not None, "psycopg (pip install 'psycopg[binary]')")


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class RecordingStandin(Standin):
    """The bench's stand-in, keeping every command it received."""

    def __init__(self, devices: list[str]) -> None:
        super().__init__(devices, rate=0)
        self.received: list[dict[str, Any]] = []
        self.opened = 0
        # False: commands are recorded but not answered until reply().
        self.answer = True

    def link_opened(self, link: Any) -> None:
        self.opened += 1
        super().link_opened(link)

    def command_received(self, raw: bytes) -> None:
        self.received.append(json.loads(raw))
        if self.answer:
            super().command_received(raw)

    def reply(self, command: dict[str, Any]) -> None:
        """Answer a command held back while ``answer`` was False."""
        super().command_received(json.dumps(command).encode())

    def open(self, port: int = 0) -> int:
        """Listen (again, on the same port: the replicas redial it)."""
        self.port = self.listen(port)
        return self.port

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Stop listening and drop the links: trial wants a clean reactor per test."""
        yield self._port.stopListening()
        for link in list(self.links):
            link.dropConnection(abort=True)
        deadline = time.monotonic() + 5
        while self.links and time.monotonic() < deadline:
            yield sleep(0.05)

    def send(self, device: str, payload: Any) -> int:
        """One status to every link; how many links it went to."""
        body = json.dumps({"group_id": device, "payload": payload}).encode()
        for link in self.links:
            link.sendMessage(body)
        return len(self.links)


class Database:
    """A PostgreSQL database of this run, dropped at exit."""

    def __init__(self) -> None:
        self.name = f"bridge_test_replicas_{RUN}"
        psycopg = _psycopg()
        with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = f"postgres://postgres@127.0.0.1:5432/{self.name}"
        atexit.register(self.drop)

    def drop(self) -> None:
        psycopg = _psycopg()
        with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class RedisServer:
    """A redis-server of our own, to kill and restart (never the machine's)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bridge-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Cluster:
    """Replicas sharing a database, a secret key, a Redis prefix and one stand-in."""

    def __init__(self, db: Database, redis_url: str, n: int = 2) -> None:
        self.db = db
        self.redis_url = redis_url
        self.prefix = f"bridge-test-{RUN}-{secrets.token_hex(3)}"
        self.base = Path(tempfile.mkdtemp(prefix="bridge-replicas-"))
        atexit.register(shutil.rmtree, self.base, True)
        self.secret = secrets.token_urlsafe(50).encode()
        self.standin: RecordingStandin | None = None
        self.replicas = [self._replica(i) for i in range(n)]
        atexit.register(self.kill_all)

    def _replica(self, i: int) -> BridgeProcess:
        data = self.base / f"r{i}"
        data.mkdir(mode=0o700)
        secret = data / "secret_key"
        secret.write_bytes(self.secret)
        secret.chmod(0o600)
        return BridgeProcess(data, tls=False, env={"DATABASE_URL": self.db.url})

    def attach(self, standin: RecordingStandin, port: int) -> None:
        self.standin = standin
        url = f"ws://127.0.0.1:{port}{LINK_PATH}"
        for replica in self.replicas:
            replica.args = ["--redis", self.redis_url, "--redis-prefix", self.prefix]
            replica.args += ["--nodered", url]

    def admin(self, *args: str, stdin: str | None = None) -> tuple[str, str]:
        proc = subprocess.run(
            [str(BIN / "bridge-admin"), "--data-dir", str(self.replicas[0].data_dir), *args],
            input=(stdin + "\n").encode() if stdin is not None else None,
            capture_output=True,
            env=_env({"DATABASE_URL": self.db.url}),
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().strip(), proc.stderr.decode().strip()

    @defer.inlineCallbacks
    def admin_async(self, *args: str) -> Any:
        argv = ["--data-dir", str(self.replicas[0].data_dir), *args]
        env = _env({"DATABASE_URL": self.db.url})
        out, err, code = yield getProcessOutputAndValue(str(BIN / "bridge-admin"), argv, env=env)
        assert code == 0, err.decode()
        return out.decode().strip()

    def token(self, username: str) -> str:
        return self.admin("token", username)[0]

    @defer.inlineCallbacks
    def start(self) -> Any:
        yield defer.gatherResults([r.start(60) for r in self.replicas if r.proc is None])

    def kill_all(self) -> None:
        for replica in self.replicas:
            replica.stop(signal.SIGKILL)

    @defer.inlineCallbacks
    def health(self, replica: BridgeProcess) -> Any:
        response = yield treq.get(replica.url + "healthz", timeout=5, persistent=False)
        body = yield response.json()
        return body

    @defer.inlineCallbacks
    def leader(self, timeout: float = 15.0) -> Any:
        """(leader, followers) once exactly one replica leads with its link up."""
        deadline = time.monotonic() + timeout
        while True:
            live = [r for r in self.replicas if r.proc is not None]
            healths = yield defer.gatherResults([self.health(r) for r in live])
            leaders = [r for r, h in zip(live, healths, strict=True) if h["role"] == "leader"]
            if (
                len(leaders) == 1
                and all(h["upstream"]["state"] == "up" for h in healths)
                and all(h["redis"]["state"] == "up" for h in healths)
            ):
                return leaders[0], [r for r in live if r is not leaders[0]]
            if time.monotonic() > deadline:
                raise AssertionError(f"no single leader with links up: {healths}")
            yield sleep(0.2)


class World:
    """Database, users, devices and the main two-replica cluster (machine Redis)."""

    def __init__(self) -> None:
        self.db = Database()
        self.cluster = Cluster(self.db, "redis://127.0.0.1:6379/0")
        c = self.cluster
        c.admin("migrate")
        for name in ("op", "viewer"):
            c.admin("adduser", name, "--password-stdin", stdin="pw-" + secrets.token_hex(8))
        self.ids = {
            name: c.admin("adddevice", name, "--kind", "toggle", "--history", "50")[0]
            for name in ("lamp", "fan", "door")
        }
        for device in self.ids.values():
            c.admin("grant", "--user", "op", device, "change")
            c.admin("grant", "--user", "viewer", device, "read")
        self.standin = RecordingStandin(list(self.ids.values()))
        self.port = free_port()
        c.attach(self.standin, self.port)
        # A device driven by its own client (a key), not by the stand-in.
        self.robot = c.admin("adddevice", "robot", "--kind", "toggle", "--history", "50")[0]
        c.admin("grant", "--user", "op", self.robot, "change")
        c.admin("grant", "--user", "viewer", self.robot, "read")
        self.robot_key = c.admin("devicekey", self.robot)[0]
        assert self.robot_key.startswith("bdk_")

    def audit_result(self, command_id: str) -> str | None:
        psycopg = _psycopg()
        with psycopg.connect(f"{PG} dbname={self.db.name}") as conn:
            row = conn.execute(
                "SELECT result FROM bridge_auditentry WHERE command_id = %s AND action = 'command'",
                (command_id,),
            ).fetchone()
        return None if row is None else str(row[0])


_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
    return _world


class ReplicaTestCase(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def viewer(
        self, cluster: Cluster, replica: BridgeProcess, user: str, devices: list[str]
    ) -> Any:
        from tests.wsclient import connect

        c = yield connect(replica.ws_url)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        hello = yield c.next()
        self.assertEqual(hello["op"], 0)
        c.send({"op": 3, "d": {"token": cluster.token(user)}})
        yield c.event("READY")
        c.send({"op": 7, "d": {"devices": devices, "history": True}})
        subscribed = []
        for _ in devices:
            frame = yield c.event("SUBSCRIBED")
            subscribed.append(frame)
        c.subscribed = subscribed
        c.hello = hello
        return c

    @defer.inlineCallbacks
    def device_client(self, replica: BridgeProcess, key: str) -> Any:
        from tests.wsclient import connect

        c = yield connect(replica.ws_url)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send({"op": 3, "d": {"device_key": key}})
        ready = yield c.event("READY")
        self.assertEqual(ready["d"]["role"], "device")
        return c

    @defer.inlineCallbacks
    def online(self, c: Any, device: str, online: bool, timeout: float = 10.0) -> Any:
        """Frames until DEVICE_STATE says ``online`` for ``device``; seconds it took."""
        started = time.monotonic()
        yield c.until(
            lambda f: (
                f.get("t") == "DEVICE_STATE" and f["d"] == {"device": device, "online": online}
            ),
            timeout=timeout,
        )
        return time.monotonic() - started

    @defer.inlineCallbacks
    def collect(self, c: Any, count: int, timeout: float = 10.0) -> Any:
        """The next ``count`` STATUS frames (other frames fail the test)."""
        frames: list[dict[str, Any]] = []
        while len(frames) < count:
            frame = yield c.next(timeout)
            self.assertEqual(frame["op"], 5, frame)
            frames.append(frame)
        return frames

    def assertGapFree(self, frames: list[dict[str, Any]]) -> None:
        seqs = [f["s"] for f in frames]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))


class RunningClusterTestCase(ReplicaTestCase):
    """The shared two-replica cluster, started, with one leader and its link up."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        require_components()
        self.world = world()
        self.cluster = self.world.cluster
        self.standin = self.world.standin
        self.standin.open(self.world.port)
        self.addCleanup(self.standin.close)
        yield self.cluster.start()
        self.leader, self.followers = yield self.cluster.leader()

    @defer.inlineCallbacks
    def resume_on(self, replica: BridgeProcess, client: Any, user: str) -> Any:
        """A new connection to ``replica`` that RESUMEs ``client``'s session."""
        from tests.wsclient import connect

        c = yield connect(replica.ws_url)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        resume = {
            "session_id": client.hello["d"]["session_id"],
            "seq": client.last_s,
            "token": self.cluster.token(user),
        }
        c.send({"op": 9, "d": resume})
        return c

    def pump(self, device: str, every: float) -> tuple[str, LoopingCall]:
        """Statuses ``{"run", "n"}`` for ``device`` from the stand-in, until the test ends."""
        run = secrets.token_hex(4)
        counter = iter(range(1_000_000))
        pump = LoopingCall(lambda: self.standin.send(device, {"run": run, "n": next(counter)}))
        pump.start(every)
        self.addCleanup(lambda: pump.running and pump.stop())
        return run, pump


class ClusterTests(RunningClusterTestCase):
    def test_one_link_per_cluster(self) -> None:
        self.assertEqual(len(self.standin.links), 1)

    @defer.inlineCallbacks
    def test_fanout_exactly_once_in_order_on_every_replica(self) -> Any:
        lamp = self.world.ids["lamp"]
        viewers = []
        for replica in self.cluster.replicas:
            c = yield self.viewer(self.cluster, replica, "viewer", [lamp])
            viewers.append(c)
        run = secrets.token_hex(4)
        n = 300
        for i in range(n):
            self.assertEqual(self.standin.send(lamp, {"run": run, "n": i}), 1)
            if i % 25 == 24:
                yield sleep(0.01)
        for c in viewers:
            frames = yield self.collect(c, n)
            self.assertEqual(
                [f["d"]["payload"] for f in frames], [{"run": run, "n": i} for i in range(n)]
            )
            self.assertGapFree(frames)
            self.assertTrue(all(f["d"]["device"] == lamp for f in frames))
        yield sleep(0.5)
        for c in viewers:
            self.assertEqual(c.factory.frames.pending, [], "no duplicates")

    @defer.inlineCallbacks
    def test_history_on_a_follower_shows_the_leaders_statuses(self) -> Any:
        fan = self.world.ids["fan"]
        run = secrets.token_hex(4)
        on_leader = yield self.viewer(self.cluster, self.leader, "viewer", [fan])
        for i in range(5):
            self.standin.send(fan, {"run": run, "n": i})
        yield self.collect(on_leader, 5)
        for follower in self.followers:
            c = yield self.viewer(self.cluster, follower, "viewer", [fan])
            history = c.subscribed[0]["d"]["history"]
            self.assertEqual(
                [h["payload"] for h in history[-5:]], [{"run": run, "n": i} for i in range(5)]
            )

    @defer.inlineCallbacks
    def test_command_from_a_follower_is_sent_once_and_confirmed(self) -> Any:
        door = self.world.ids["door"]
        follower = self.followers[0]
        op = yield self.viewer(self.cluster, follower, "op", [door])
        watcher = yield self.viewer(self.cluster, self.leader, "viewer", [door])
        op.send({"op": 4, "d": {"device": door, "payload": {"open": True}, "id": "c-1"}})
        frames = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        results = [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual(results, ["sent", "confirmed"])
        statuses = [f for f in frames if f["op"] == 5]
        self.assertEqual(len(statuses), 1)
        command_id = frames[-1]["d"]["command_id"]
        self.assertEqual(statuses[0]["d"]["command_id"], command_id)
        self.assertEqual(statuses[0]["d"]["by"], "op")
        seen = yield watcher.next()
        self.assertEqual(seen["d"]["command_id"], command_id)
        yield sleep(0.5)
        sent = [c for c in self.standin.received if c.get("command_id") == command_id]
        self.assertEqual(len(sent), 1, "exactly once to Node-RED")
        self.assertEqual(sent[0]["user"], "op")

    @defer.inlineCallbacks
    def test_revocation_reaches_a_viewer_on_another_replica_within_a_second(self) -> Any:
        fan = self.world.ids["fan"]
        self.cluster.admin("adduser", "temp", "--password-stdin", stdin="pw-temp-123456")
        self.cluster.admin("grant", "--user", "temp", fan, "read")
        c = yield self.viewer(self.cluster, self.followers[0], "temp", [fan])
        yield self.cluster.admin_async("revoke", "--user", "temp", fan)
        revoked_at = time.monotonic()
        frame = yield c.event("DEVICE_REMOVED", timeout=5)
        elapsed = time.monotonic() - revoked_at
        self.assertEqual(frame["d"]["device"], fan)
        # Spec §5: within one second; a little slack for a loaded test machine.
        self.assertLess(elapsed, 1.5, f"revocation took {elapsed:.2f} s")

    @defer.inlineCallbacks
    def test_healthz_reports_redis_and_role(self) -> Any:
        healths = yield defer.gatherResults([self.cluster.health(r) for r in self.cluster.replicas])
        self.assertEqual(sorted(h["role"] for h in healths), ["follower", "leader"])
        for h in healths:
            self.assertEqual(h["redis"]["state"], "up")
            self.assertEqual(h["redis"]["prefix"], self.cluster.prefix)

    @defer.inlineCallbacks
    def test_resume_on_another_replica_hands_the_session_over_exactly(self) -> Any:
        """Any replica answers RESUME: the one holding the session hands it over."""
        lamp = self.world.ids["lamp"]
        run = secrets.token_hex(4)
        first = yield self.viewer(self.cluster, self.leader, "viewer", [lamp])
        for i in range(5):
            self.standin.send(lamp, {"run": run, "n": i})
        yield self.collect(first, 5)
        seen = first.last_s
        first.proto.dropConnection(abort=True)
        # Statuses while the client is away: the session keeps them.
        for i in range(5, 10):
            self.standin.send(lamp, {"run": run, "n": i})
        yield sleep(0.3)
        c = yield self.resume_on(self.followers[0], first, "viewer")
        frames = yield c.until(lambda f: f.get("t") == "RESUMED")
        self.assertNotIn("recovered", frames[-1]["d"])
        statuses = [f for f in frames if f["op"] == 5]
        self.assertEqual([f["d"]["payload"]["n"] for f in statuses], list(range(5, 10)))
        self.assertEqual(frames[0]["s"], seen + 1)
        self.assertGapFree(frames)
        # From now on the follower serves it: exactly once, numbered on.
        for i in range(10, 20):
            self.standin.send(lamp, {"run": run, "n": i})
        more = yield self.collect(c, 10)
        self.assertEqual([f["d"]["payload"]["n"] for f in more], list(range(10, 20)))
        self.assertGapFree(frames + more)
        yield sleep(0.3)
        self.assertEqual(c.factory.frames.pending, [], "no duplicates")
        # The session has moved: the first replica no longer answers for it.
        health = yield self.cluster.health(self.followers[0])
        self.assertGreaterEqual(health["sessions"]["counters"].get("claimed_handover", 0), 1)

    @defer.inlineCallbacks
    def test_a_command_in_flight_follows_its_session_to_another_replica(self) -> Any:
        door = self.world.ids["door"]
        op = yield self.viewer(self.cluster, self.followers[0], "op", [door])
        self.standin.answer = False
        self.addCleanup(setattr, self.standin, "answer", True)
        op.send({"op": 4, "d": {"device": door, "payload": {"open": 1}, "id": "moving"}})
        sent = yield op.event("COMMAND_RESULT")
        self.assertEqual(sent["d"]["result"], "sent")
        command_id = sent["d"]["command_id"]
        op.proto.dropConnection(abort=True)
        c = yield self.resume_on(self.leader, op, "op")
        yield c.event("RESUMED")
        # Node-RED confirms only now, after the session moved.
        yield sleep(0.2)
        [command] = [m for m in self.standin.received if m.get("command_id") == command_id]
        self.standin.reply(command)
        frames = yield c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")
        self.assertEqual(frames[-1]["d"]["id"], "moving")
        confirming = [f for f in frames if f["op"] == 5]
        self.assertEqual(confirming[-1]["d"]["command_id"], command_id)
        yield sleep(0.5)
        results = [f for f in c.factory.frames.pending if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual(results, [], "exactly one result")


class DeviceClientTestCase(RunningClusterTestCase):
    """A device client on one replica, its viewers and operators on the other."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.robot = self.world.robot

    @defer.inlineCallbacks
    def wait_offline_everywhere(self) -> Any:
        """The previous test's client is gone on every replica before this one starts."""
        deadline = time.monotonic() + 10
        while True:
            healths = yield defer.gatherResults(
                [self.cluster.health(r) for r in self.cluster.replicas]
            )
            if all(
                (h["device_clients"]["local"], h["device_clients"]["remote"]) == (0, 0)
                for h in healths
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(healths)
            yield sleep(0.2)


class DeviceClientTests(DeviceClientTestCase):
    @defer.inlineCallbacks
    def test_client_on_a_follower_serves_an_operator_on_the_leader(self) -> Any:
        yield self.wait_offline_everywhere()
        follower = self.followers[0]
        op = yield self.viewer(self.cluster, self.leader, "op", [self.robot])
        watcher = yield self.viewer(self.cluster, follower, "viewer", [self.robot])
        connected_at = time.monotonic()
        dev = yield self.device_client(follower, self.world.robot_key)
        yield self.online(op, self.robot, True)
        took = time.monotonic() - connected_at
        yield self.online(watcher, self.robot, True)
        print(f"\nonline on the other replica {took:.2f} s after the client connected")

        op.send({"op": 4, "d": {"device": self.robot, "payload": {"pos": 3}, "id": "m1"}})
        [command] = (yield dev.until(lambda f: f["op"] == 4))[-1:]
        command_id = command["d"]["id"]
        self.assertEqual(command["d"]["payload"], {"pos": 3})
        dev.send(
            {"op": 5, "d": {"device": self.robot, "payload": {"pos": 3}, "command_id": command_id}}
        )
        frames = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(
            [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"],
            ["sent", "confirmed"],
        )
        [status] = [f["d"] for f in frames if f["op"] == 5]
        self.assertEqual((status["command_id"], status["by"]), (command_id, "op"))
        seen = yield watcher.until(lambda f: f["op"] == 5)
        self.assertEqual(seen[-1]["d"]["command_id"], command_id)

        run = secrets.token_hex(4)
        for n in range(50):
            dev.send({"op": 5, "d": {"device": self.robot, "payload": {"run": run, "n": n}}})
        for c in (op, watcher):
            statuses = yield self.collect(c, 50)
            self.assertEqual(
                [f["d"]["payload"] for f in statuses], [{"run": run, "n": n} for n in range(50)]
            )
            self.assertGapFree(statuses)
        yield sleep(1.0)
        for c in (op, watcher, dev):
            self.assertEqual(c.factory.frames.pending, [], "nothing twice")
        # The operator's replica audited it; the client's replica did not add a row.
        self.assertEqual(self.world.audit_result(command_id), "confirmed")

    @defer.inlineCallbacks
    def test_client_dropping_out_ends_its_command_and_goes_offline_elsewhere(self) -> Any:
        yield self.wait_offline_everywhere()
        follower = self.followers[0]
        op = yield self.viewer(self.cluster, follower, "op", [self.robot])
        dev = yield self.device_client(self.leader, self.world.robot_key)
        yield self.online(op, self.robot, True)
        op.send({"op": 4, "d": {"device": self.robot, "payload": 1, "id": "m1"}})
        [command] = (yield dev.until(lambda f: f["op"] == 4))[-1:]
        dropped_at = time.monotonic()
        dev.proto.dropConnection(abort=True)
        frames = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(frames[-1]["d"]["result"], "upstream_unavailable")
        self.assertEqual(frames[-1]["d"]["command_id"], command["d"]["id"])
        offline = {"device": self.robot, "online": False}
        if not [f for f in frames if f.get("t") == "DEVICE_STATE" and f["d"] == offline]:
            yield self.online(op, self.robot, False)
        elapsed = time.monotonic() - dropped_at
        print(f"\noffline on the other replica {elapsed:.2f} s after the client dropped")
        self.assertLess(elapsed, 3.0)
        yield sleep(0.5)
        self.assertEqual(self.world.audit_result(command["d"]["id"]), "upstream_unavailable")
        op.send({"op": 4, "d": {"device": self.robot, "payload": 2, "id": "m2"}})
        frames = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(frames[-1]["d"]["result"], "upstream_unavailable")

    @defer.inlineCallbacks
    def test_second_client_on_another_replica_takes_over_and_closes_the_first_4011(self) -> Any:
        yield self.wait_offline_everywhere()
        follower = self.followers[0]
        op = yield self.viewer(self.cluster, self.leader, "op", [self.robot])
        first = yield self.device_client(self.leader, self.world.robot_key)
        yield self.online(op, self.robot, True)
        second = yield self.device_client(follower, self.world.robot_key)
        code, reason = yield first.closed(5)
        self.assertEqual(code, 4011, reason)
        op.send({"op": 4, "d": {"device": self.robot, "payload": 7, "id": "m1"}})
        [command] = (yield second.until(lambda f: f["op"] == 4))[-1:]
        second.send(
            {"op": 5, "d": {"device": self.robot, "payload": 7, "command_id": command["d"]["id"]}}
        )
        frames = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")
        states = [f["d"]["online"] for f in frames if f.get("t") == "DEVICE_STATE"]
        self.assertEqual(states, [], "the device never looked offline during the takeover")


class DeviceClientFailoverTests(DeviceClientTestCase):
    @defer.inlineCallbacks
    def test_sigkill_of_the_clients_replica_takes_it_offline_elsewhere(self) -> Any:
        yield self.wait_offline_everywhere()
        doomed = self.followers[0]
        op = yield self.viewer(self.cluster, self.leader, "op", [self.robot])
        dev = yield self.device_client(doomed, self.world.robot_key)
        yield self.online(op, self.robot, True)
        op.send({"op": 4, "d": {"device": self.robot, "payload": 1, "id": "m1"}})
        yield dev.until(lambda f: f["op"] == 4)
        killed_at = time.monotonic()
        doomed.stop(signal.SIGKILL)
        frames = yield op.until(
            lambda f: f.get("t") == "DEVICE_STATE" and f["d"]["online"] is False, timeout=10
        )
        elapsed = time.monotonic() - killed_at
        print(f"\noffline on the survivor {elapsed:.2f} s after SIGKILL of the client's replica")
        self.assertLess(elapsed, 5.0)
        rest = [f for f in frames if f.get("t") == "COMMAND_RESULT"]
        if not rest or rest[-1]["d"]["result"] == "sent":
            rest = yield op.until(lambda f: f.get("t") == "COMMAND_RESULT", timeout=2)
        self.assertEqual(rest[-1]["d"]["result"], "upstream_unavailable")
        yield doomed.start(60)
        yield self.cluster.leader()


class LeaderFailoverTests(RunningClusterTestCase):
    @defer.inlineCallbacks
    def test_sigkill_of_the_leader_hands_the_link_over(self) -> Any:
        lamp = self.world.ids["lamp"]
        survivor = self.followers[0]
        c = yield self.viewer(self.cluster, survivor, "viewer", [lamp])
        victim = yield self.viewer(self.cluster, self.leader, "viewer", [lamp])
        run, _ = self.pump(lamp, 0.05)
        yield self.collect(c, 5)
        # A checkpoint of the victim's session has been written meanwhile.
        had = yield self.collect(victim, 25)
        opened_before = self.standin.opened
        killed_at = time.monotonic()
        self.leader.stop(signal.SIGKILL)
        frames: list[dict[str, Any]] = []
        online_at = None
        link_at = None
        while True:
            frame = yield c.next(10)
            frames.append(frame)
            if link_at is None and self.standin.opened > opened_before:
                link_at = time.monotonic()
            if frame.get("t") == "DEVICE_STATE" and frame["d"]["online"]:
                online_at = time.monotonic()
            if online_at is not None and frame["op"] == 5:
                break
        handover = online_at - killed_at
        if link_at is None:
            link_at = online_at
        link_handover = link_at - killed_at
        kinds = [f.get("t") or f["op"] for f in frames]
        self.assertTrue(set(kinds) <= {5, "DEVICE_STATE"}, kinds)
        states = [f["d"]["online"] for f in frames if f.get("t") == "DEVICE_STATE"]
        self.assertIn(states, ([False, True], [True]), "at most offline then online")
        self.assertGapFree(frames)
        ns = [f["d"]["payload"]["n"] for f in frames if f["op"] == 5]
        self.assertEqual(ns, sorted(set(ns)), "no duplicates, in order")
        self.assertEqual(len(self.standin.links), 1)
        print(
            f"\nlink handed over {link_handover:.2f} s, "
            f"viewer online {handover:.2f} s after SIGKILL"
        )
        self.assertLess(link_handover, 5.0)
        self.assertLess(handover, 6.0)
        yield self.check_victim_recovers(victim, had, survivor, run, lamp)
        # The killed replica comes back as a follower.
        yield self.leader.start(60)
        leader, followers = yield self.cluster.leader()
        self.assertIs(leader, survivor)

    @defer.inlineCallbacks
    def check_victim_recovers(
        self,
        victim: Any,
        had: list[dict[str, Any]],
        survivor: BridgeProcess,
        run: str,
        lamp: str,
    ) -> Any:
        """The killed replica's viewer RESUMEs on the survivor: nothing history holds is missed."""
        while victim.factory.frames.pending:
            frame = yield victim.next()
            if frame["op"] == 5:
                had.append(frame)
        last = victim.last_s
        c = yield self.resume_on(survivor, victim, "viewer")
        frames = yield c.until(lambda f: f.get("t") in ("RESUMED", "INVALID_SESSION"), 10)
        self.assertEqual(frames[-1]["t"], "RESUMED", frames)
        self.assertTrue(frames[-1]["d"]["recovered"])
        self.assertEqual(frames[0]["s"], last + 1)
        self.assertGapFree(frames)
        # What the survivor's history holds of this run, from the victim's first status on.
        check = yield self.viewer(self.cluster, survivor, "viewer", [lamp])
        held = [
            h["payload"]["n"]
            for h in check.subscribed[0]["d"]["history"]
            if isinstance(h["payload"], dict) and h["payload"].get("run") == run
        ]
        later = yield c.until(lambda f: f["op"] == 5 and f["d"]["payload"]["n"] >= max(held))
        got = {f["d"]["payload"]["n"] for f in had + frames + later if f["op"] == 5}
        first = min(got)
        missing = [n for n in held if n >= first and n not in got]
        self.assertEqual(missing, [], "every status history holds reached the client")
        print(f"victim resumed on the survivor: {len(frames) - 1} frames replayed")


class GracefulStopTests(RunningClusterTestCase):
    @defer.inlineCallbacks
    def test_viewers_of_a_stopped_replica_resume_on_another_exactly(self) -> Any:
        """SIGTERM: 1001 to every client, sessions parked in Redis, RESUME elsewhere."""
        lamp = self.world.ids["lamp"]
        leaving = self.followers[0]
        c = yield self.viewer(self.cluster, leaving, "viewer", [lamp])
        _, pump = self.pump(lamp, 0.02)
        had = yield self.collect(c, 10)
        # SIGTERM without blocking this reactor: statuses keep flowing meanwhile.
        stopped = leaving.stop_async()
        code, _ = yield c.closed(15)
        self.assertEqual(code, 1001)
        yield stopped
        while c.factory.frames.pending:
            frame = yield c.next()
            if frame["op"] == 5:
                had.append(frame)
        yield sleep(0.3)  # statuses go on while the client reconnects
        r = yield self.resume_on(self.leader, c, "viewer")
        frames = yield r.until(lambda f: f.get("t") in ("RESUMED", "INVALID_SESSION"), 10)
        self.assertEqual(frames[-1]["t"], "RESUMED", frames)
        self.assertNotIn("recovered", frames[-1]["d"])
        more = yield self.collect(r, 10)
        pump.stop()
        ns = [f["d"]["payload"]["n"] for f in had + frames + more if f["op"] == 5]
        self.assertEqual(ns, list(range(ns[0], ns[0] + len(ns))), "no gap, no repeat")
        self.assertGapFree([f for f in frames + more])
        yield leaving.start(60)


class RedisRestartTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_redis_outage_and_return(self) -> Any:
        require_components()
        require(os.path.exists(REDIS_SERVER), f"{REDIS_SERVER}")
        w = world()
        redis = RedisServer()
        redis.start()
        cluster = Cluster(w.db, redis.url)
        self.addCleanup(cluster.kill_all)
        self.addCleanup(redis.stop)
        standin = RecordingStandin(list(w.ids.values()))
        cluster.attach(standin, standin.open())
        self.addCleanup(standin.close)
        yield cluster.start()
        leader, followers = yield cluster.leader()
        follower = followers[0]
        lamp, door = w.ids["lamp"], w.ids["door"]
        on_leader = yield self.viewer(cluster, leader, "viewer", [lamp])
        on_follower = yield self.viewer(cluster, follower, "op", [lamp, door])
        counter = iter(range(1_000_000))
        pump = LoopingCall(lambda: standin.send(lamp, {"n": next(counter)}))
        pump.start(0.05)
        self.addCleanup(lambda: pump.running and pump.stop())
        yield self.collect(on_follower, 3)

        redis.stop()
        # Followers: Node-RED-backed devices offline; commands refused at once.
        frames = yield on_follower.until(
            lambda f: f.get("t") == "DEVICE_STATE" and f["d"]["device"] == door, timeout=10
        )
        self.assertFalse(frames[-1]["d"]["online"])
        health = yield cluster.health(follower)
        self.assertEqual(health["redis"]["state"], "down")
        self.assertEqual(health["upstream"]["state"], "down")
        on_follower.send({"op": 4, "d": {"device": door, "payload": 1, "id": "x"}})
        frames = yield on_follower.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(frames[-1]["d"]["result"], "upstream_unavailable")
        # The leader keeps its link and its own viewers.
        health = yield cluster.health(leader)
        self.assertEqual(health["redis"]["state"], "down")
        self.assertEqual(health["upstream"]["state"], "up")
        frames = yield self.collect(on_leader, 20)
        self.assertGapFree(frames)

        redis.start()
        frames = yield on_follower.until(
            lambda f: f.get("t") == "DEVICE_STATE" and f["d"]["device"] == lamp, timeout=15
        )
        self.assertTrue(frames[-1]["d"]["online"])
        yield cluster.leader(15)
        statuses = yield on_follower.until(lambda f: f["op"] == 5, timeout=10)
        self.assertEqual(statuses[-1]["d"]["device"], lamp)
        # The leader's viewers saw at most one offline/online while it re-acquired.
        rest = []
        while on_leader.factory.frames.pending:
            rest.append((yield on_leader.next()))
        kinds = {f.get("t") or f["op"] for f in rest}
        self.assertTrue(kinds <= {5, "DEVICE_STATE"}, kinds)
        self.assertEqual(len(standin.links), 1)
