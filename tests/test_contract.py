"""The wire contract, statement by statement, against a real ``twistd bridge``.

Outside checks are written against shared/spec/protocol.md by people who have
not read this code, so these tests read only that text (and docs/protocol.md
where it is silent): each docstring quotes the sentence it holds the process
to. They complement tests/test_e2e.py and tests/security/, which pin the rest
of the contract, and use nothing but the process's public surface: sockets,
HTTP, ``bridge-admin`` and the log line ``--port 0`` promises.

Two bridges serve the whole module, started once: ``main`` dials a Node-RED
stand-in the tests steer (tests/security/fake_nodered.py ``--control``),
with anonymous access on; ``brisk`` runs the simulator with a one-second
heartbeat and a short resume window. Two tests start a process of their own
(a project's own settings, ``--demo``); two stop and restart a shared one.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import ssl
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from tests.security.world import (
    PASSWORD,
    SecurityTestCase,
    Spec,
    World,
    https,
    login,
    sleep,
    tls_context,
)
from tests.server import admin
from tests.support import require
from tests.wsclient import Client

METRICS_TOKEN = "contract-metrics-token-5d1f"

MAIN = Spec(
    users={
        "op": {},
        "viewer": {},
        "member": {"groups": ["line1", "crew"]},
        "root": {"superuser": True},
        "boss": {"staff": True},
        "nobody": {},
        "leaver": {},
    },
    devices={
        "lamp": {"kind": "toggle", "history": 3},
        "sensor": {"kind": "sensor"},
        "public": {"kind": "dimmer", "public": True},
        "pubchange": {"kind": "dimmer", "public": True},
        "secret": {},
        "quick": {"timeout": 1.0},
        "slowpoke": {},
        "mixed": {},
        "doomed": {},
        "offduty": {"enabled": False},
        "retired": {},
        "renamed": {},
        "burst": {"kind": "sensor"},
        "detach": {},
        "robot": {"kind": "arm"},
    },
    grants=[
        ("user", "op", "lamp", "change"),
        ("user", "op", "sensor", "read"),
        ("user", "op", "quick", "change"),
        ("user", "op", "slowpoke", "change"),
        ("user", "op", "pubchange", "change"),
        ("user", "op", "burst", "read"),
        ("user", "op", "robot", "change"),
        ("user", "viewer", "lamp", "read"),
        ("user", "viewer", "doomed", "read"),
        ("user", "viewer", "offduty", "read"),
        ("user", "viewer", "retired", "read"),
        ("user", "viewer", "renamed", "read"),
        ("user", "viewer", "burst", "read"),
        ("user", "member", "mixed", "read"),
        ("group", "crew", "mixed", "change"),
        ("group", "line1", "sensor", "read"),
        ("user", "leaver", "detach", "read"),
    ],
)
BRISK = Spec(users={"ann": {}}, devices={"lamp": {}}, grants=[("user", "ann", "lamp", "change")])
PG_SPEC = Spec(users={"pat": {}}, devices={"lamp": {}}, grants=[("user", "pat", "lamp", "change")])
PG = "host=127.0.0.1 port=5432 user=postgres"
HEARTBEAT = 1.0
RESUME_WINDOW = 1.0

# Tokens are minted once per world and reused (docs: a token may be used more
# than once while it is valid), so the bridges accept them for ten minutes.
TOKEN_ENV = {"BRIDGE_TOKEN_MAX_AGE": "600"}
_worlds: dict[str, World] = {}
_tokens: dict[str, dict[str, str]] = {}
_booted: defer.Deferred[None] | None = None


def gather(*calls: defer.Deferred[Any]) -> defer.Deferred[list[Any]]:
    """Results of Deferreds run side by side (bridge-admin costs a Django start each)."""
    return defer.gatherResults(list(calls), consumeErrors=True)


def _postgres() -> Any:
    """psycopg, when it is installed and PostgreSQL listens on 127.0.0.1:5432."""
    try:
        import psycopg

        psycopg.connect(f"{PG} dbname=postgres", connect_timeout=2).close()
    except Exception:
        return None
    return psycopg


def _database() -> str:
    """A PostgreSQL database for this run, dropped at exit."""
    import atexit

    psycopg = _postgres()
    name = f"bridge_test_contract_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    atexit.register(drop)
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def _make(name: str) -> World:
    if name == "pg":
        world = World(PG_SPEC, env=TOKEN_ENV, database_url=_database())
    elif name == "main":
        world = World(
            MAIN,
            env={"BRIDGE_METRICS_TOKEN": METRICS_TOKEN, **TOKEN_ENV},
            nodered=True,
            nodered_control=True,
            args=["--anonymous"],
        )
    else:
        world = World(
            BRISK,
            env=TOKEN_ENV,
            args=["--heartbeat", str(HEARTBEAT), "--resume-window", str(RESUME_WINDOW)],
        )
    _tokens[name] = world.minted
    return world


def boot() -> defer.Deferred[None]:
    """Provision and start the bridges side by side, once (each takes seconds)."""
    global _booted
    if _booted is None:
        from twisted.internet import threads

        @defer.inlineCallbacks
        def every() -> Any:
            names = ["main", "brisk"] + (["pg"] if _postgres() else [])
            # The processes of their own start while the worlds are provisioned.
            others = gather(_start_demo(), _start_own_project())
            made = yield gather(*(threads.deferToThread(_make, n) for n in names))
            _worlds.update(zip(names, made, strict=True))
            yield gather(others, *(world.start() for world in made))

        _booted = every()
    d: defer.Deferred[None] = defer.Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(None)
        return result  # kept for every later caller

    _booted.addBoth(relay)
    return d


# Bridges a single test looks at, started by boot() with the worlds.
_own: dict[str, Any] = {}


def _start_demo() -> defer.Deferred[Any]:
    from tests.server import BridgeProcess, kill_on_exit

    server = BridgeProcess(args=["--demo"])
    kill_on_exit(server)
    _own["demo"] = server
    return server.start()


@defer.inlineCallbacks
def _start_own_project() -> Any:
    """A Django project of its own in a fresh directory, migrated and served."""
    import atexit
    import shutil
    import tempfile

    from twisted.internet.utils import getProcessOutputAndValue

    from tests.server import BIN, BridgeProcess, _env, kill_on_exit

    project = Path(tempfile.mkdtemp(prefix="bridge-own-project-"))
    atexit.register(shutil.rmtree, project, True)
    (project / "mysite").mkdir()
    (project / "mysite" / "__init__.py").write_text("")
    (project / "mysite" / "settings.py").write_text(_OWN_SETTINGS)
    (project / "mysite" / "urls.py").write_text(_OWN_URLS)
    # Run from the project's directory, as manage.py would be.
    argv = ["--data-dir", str(project), "--settings", "mysite.settings", "migrate", "-v", "0"]
    migrated = yield getProcessOutputAndValue(
        str(BIN / "bridge-admin"), argv, env=_env(), path=str(project)
    )
    _own["migrate"] = migrated
    _own["project"] = project
    if migrated[2] != 0:
        return
    # BridgeProcess runs twistd in the data directory: the project's own here.
    server = BridgeProcess(data_dir=project, args=["--settings", "mysite.settings"])
    kill_on_exit(server)
    _own["own"] = server
    yield server.start()


def main_world() -> World:
    return _worlds["main"]


def brisk_world() -> World:
    return _worlds["brisk"]


def pg_world() -> World:
    require(_postgres() is not None, "PostgreSQL at 127.0.0.1:5432 and psycopg")
    return _worlds["pg"]


def token(world: World, username: str) -> str:
    name = next(n for n, w in _worlds.items() if w is world)
    return _tokens[name][username]


def metrics(world: World) -> dict[str, float]:
    resp = https(world, "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status == 200, resp.status
    samples = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# ------------------------------------------------------- a hand-made client


class RawWS:
    """WebSocket frames written by hand over TLS: fragments, pings, anything.

    Blocking on purpose: the server is another process, and a test reading
    with a deadline is easier to follow than callbacks.
    """

    def __init__(self, world: World, path: str = "/ws/") -> None:
        sock = socket.create_connection(("127.0.0.1", world.port), timeout=5)
        self.sock = tls_context(world).wrap_socket(sock, server_hostname="localhost")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: localhost:{world.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            length = bytes([0x80 | n])
        elif n < 65536:
            length = bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            length = bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([(0x80 if fin else 0) | opcode]) + length + mask + masked)

    def text(self, data: Any) -> None:
        self.frame(1, data if isinstance(data, bytes) else json.dumps(data).encode())

    def _need(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def read(self, seconds: float = 2.0, count: int | None = None) -> list[Any]:
        """Frames until ``count`` of them, a close frame, EOF or ``seconds``.

        Text frames come back as JSON objects, the others as tuples.
        """
        deadline = time.monotonic() + seconds
        out: list[Any] = []
        try:
            while count is None or len(out) < count:
                self._need(2, deadline)
                opcode, n, offset = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
                if n == 126:
                    self._need(4, deadline)
                    n, offset = struct.unpack(">H", self.buf[2:4])[0], 4
                elif n == 127:
                    self._need(10, deadline)
                    n, offset = struct.unpack(">Q", self.buf[2:10])[0], 10
                self._need(offset + n, deadline)
                payload, self.buf = self.buf[offset : offset + n], self.buf[offset + n :]
                if opcode == 1:
                    out.append(json.loads(payload))
                elif opcode == 8:
                    out.append(("close", struct.unpack(">H", payload[:2])[0]))
                    return out
                else:
                    out.append(("opcode", opcode, payload))
        except (TimeoutError, ssl.SSLError, EOFError, ConnectionError):
            pass
        return out

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------ test case base


class ContractTestCase(SecurityTestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        yield boot()
        self.world = type(self).make_world()
        yield self.world.start()  # again after a test stopped it

    def token(self, username: str) -> str:
        return token(self.world, username)

    @defer.inlineCallbacks
    def ready(self, username: str, path: str = "ws/") -> Any:
        c, frame = yield self.identify(self.token(username), path)
        self.assertEqual(frame.get("t"), "READY", frame)
        return c, frame

    @defer.inlineCallbacks
    def anonymous(self, path: str = "ws/") -> Any:
        c = yield self.client(path)
        yield c.next()
        c.send({"op": 3, "d": {}})
        ready = yield c.next()
        return c, ready

    @defer.inlineCallbacks
    def settle(self, c: Client) -> Any:
        """Every frame that arrives before the answer to a HEARTBEAT sent now."""
        c.send({"op": 1, "d": None})
        frames = yield c.until(lambda f: f["op"] == 2)
        return frames[:-1]

    @defer.inlineCallbacks
    def subscribe(self, c: Client, *labels: str, history: bool = False) -> Any:
        ids = [self.world.ids[label] for label in labels]
        c.send({"op": 7, "d": {"devices": ids, "history": history}})
        subscribed = []
        for _ in ids:
            subscribed.append((yield c.event("SUBSCRIBED")))
        return subscribed

    def nodered(self, command: dict[str, Any]) -> None:
        assert self.world.nodered is not None
        self.world.nodered.control(command)

    def upstream_messages(self) -> list[Any]:
        assert self.world.nodered is not None
        return self.world.nodered.messages()

    @defer.inlineCallbacks
    def results(self, c: Client, client_id: str, timeout: float = 5.0) -> Any:
        """Frames up to the final COMMAND_RESULT of ``client_id``."""
        frames = yield c.until(
            lambda f: (
                f.get("t") == "COMMAND_RESULT"
                and f["d"]["id"] == client_id
                and f["d"]["result"] != "sent"
            ),
            timeout,
        )
        return frames

    @defer.inlineCallbacks
    def shell(self, code: str) -> Any:
        out, err, status = yield self.world.shell(code)
        self.assertEqual(status, 0, err)
        return out


class MainTestCase(ContractTestCase):
    make_world = staticmethod(main_world)


class BriskTestCase(ContractTestCase):
    make_world = staticmethod(brisk_world)


def kinds(frames: list[dict[str, Any]]) -> list[Any]:
    return [f.get("t", f["op"]) for f in frames]


# ------------------------------------------------------------ §1 endpoints


class EndpointTests(MainTestCase):
    def test_healthz_reports_upstream_and_redis_state_without_auth(self) -> None:
        """§1: "/healthz: 200 and a JSON body with upstream and redis state; no auth"."""
        resp = https(self.world, "GET", "/healthz")
        self.assertEqual(resp.status, 200)
        self.assertIn("application/json", resp.header("content-type") or "")
        body = json.loads(resp.body)
        self.assertEqual(body["upstream"]["state"], "up")
        self.assertEqual(body["redis"]["state"], "disabled")

    def test_metrics_for_a_staff_session_but_not_another_session(self) -> None:
        """§1: "/metrics: Prometheus text format; staff or a configured bearer token"."""
        staff = https(self.world, "GET", "/metrics", jar=login(self.world, "boss"))
        self.assertEqual(staff.status, 200)
        self.assertIn("text/plain", staff.header("content-type") or "")
        self.assertRegex(staff.body.decode(), r"(?m)^# TYPE bridge_connections gauge$")
        worker = https(self.world, "GET", "/metrics", jar=login(self.world, "viewer"))
        self.assertEqual(worker.status, 403)
        self.assertNotIn(b"bridge_connections", worker.body)

    @defer.inlineCallbacks
    def test_token_from_a_form_post(self) -> Any:
        """§1: "POST /api/token/: form or JSON {"username","password"} ... returns
        {"token": "...", "expires_in": <s>}, a short-lived signed token for IDENTIFY"."""
        resp = https(
            self.world,
            "POST",
            "/api/token/",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=f"username=op&password={PASSWORD}".encode(),
        )
        self.assertEqual(resp.status, 200, resp.body)
        body = json.loads(resp.body)
        self.assertEqual(set(body), {"token", "expires_in"})
        self.assertIsInstance(body["expires_in"], int)
        self.assertGreater(body["expires_in"], 0)
        c, ready = yield self.identify(body["token"])
        self.assertEqual((ready["t"], ready["d"]["user"]["username"]), ("READY", "op"))

    def test_token_request_with_credentials_that_are_not_text_is_a_clear_400(self) -> None:
        """Engineering rule: "Bad input gets a clear error (close code / HTTP status /
        message) and the process stays up": JSON may escape a lone surrogate, which no
        database takes; it was a 500 with a traceback in the log."""
        resp = https(
            self.world,
            "POST",
            "/api/token/",
            headers={"Content-Type": "application/json"},
            body=b'{"username": "\\ud800", "password": "x"}',
        )
        self.assertEqual(resp.status, 400, resp.body)
        self.assertIn("text", json.loads(resp.body)["error"])
        self.assertNotIn("UnicodeEncodeError", self.world.log_text())

    def test_sse_with_the_session_cookie(self) -> None:
        """§1: "/events/?devices=<id>,<id>: Server-Sent Events: read-only stream of the
        same STATUS/EVENT frames" (docs: the session cookie is a credential)."""
        lamp = self.world.ids["lamp"]
        cookie = {"Cookie": _cookie(login(self.world, "op"))}
        status, events = sse_events(self.world, f"/events/?devices={lamp}", cookie, 2)
        self.assertEqual(status, 200)
        self.assertEqual([(i, e["t"]) for i, e in events], [(1, "READY"), (2, "SUBSCRIBED")])
        self.assertEqual(events[0][1]["d"]["user"]["username"], "op")
        self.assertEqual(events[1][1]["d"]["device"], lamp)

    def test_sse_for_an_anonymous_viewer_of_a_public_device(self) -> None:
        """§5: the public flag gives read "also for anonymous connections when anonymous
        access is enabled"; SSE is the same session over HTTP."""
        public, secret = self.world.ids["public"], self.world.ids["secret"]
        status, events = sse_events(self.world, f"/events/?devices={public}", {}, 2)
        self.assertEqual(status, 200)
        self.assertEqual(events[0][1]["d"]["role"], "anonymous")
        self.assertEqual(events[1][1]["d"]["device"], public)
        self.assertEqual(sse_events(self.world, f"/events/?devices={secret}", {}, 1)[0], 403)


def _cookie(jar: dict[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in jar.items())


def sse_events(
    world: World, path: str, headers: dict[str, str], count: int, seconds: float = 5.0
) -> tuple[int, list[tuple[int | None, dict[str, Any]]]]:
    """The first ``count`` events of an SSE response: (status, [(id, data)])."""
    conn = http.client.HTTPSConnection(
        "localhost", world.port, context=tls_context(world), timeout=seconds
    )
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, []
        events: list[tuple[int | None, dict[str, Any]]] = []
        event_id: int | None = None
        while len(events) < count:
            line = resp.readline().decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                events.append((event_id, json.loads(line[6:])))
                event_id = None
        return resp.status, events
    finally:
        conn.close()


# --------------------------------------------------------------- §2 frames


class FrameTests(MainTestCase):
    @defer.inlineCallbacks
    def test_hello_is_the_first_frame_with_its_three_fields(self) -> Any:
        """§2: "HELLO | server | first frame on every connection. d = {"heartbeat_interval":
        <ms>, "session_id": "<opaque>", "protocol": 1}"; HELLO carries no s and no t."""
        c = yield self.client()
        hello = yield c.next()
        self.assertEqual(set(hello), {"op", "d"})
        self.assertEqual(hello["op"], 0)
        self.assertEqual(set(hello["d"]), {"heartbeat_interval", "session_id", "protocol"})
        self.assertEqual(hello["d"]["protocol"], 1)
        self.assertEqual(hello["d"]["heartbeat_interval"], 30_000)  # the default, in ms
        self.assertIsInstance(hello["d"]["session_id"], str)

    @defer.inlineCallbacks
    def test_s_is_on_every_op5_and_op6_frame_and_grows_by_one(self) -> Any:
        """§2: "s is the connection's dispatch sequence number, present on every server
        frame with op 5 or op 6 and strictly increasing by one per connection. t is
        present on op 6 only"."""
        lamp = self.world.ids["lamp"]
        c, ready = yield self.ready("op")
        frames = [ready]
        c.send({"op": 7, "d": {"devices": [lamp], "history": True}})
        c.send({"op": 4, "d": {"device": lamp, "payload": {"on": True}, "id": "seq"}})
        frames += yield self.results(c, "seq")
        c.send({"op": 1, "d": c.last_s})
        c.send({"op": 8, "d": {"devices": [lamp]}})
        frames += yield c.until(lambda f: f.get("t") == "UNSUBSCRIBED")
        c.send({"op": 6})  # server-only op after READY: ERROR, then the close
        frames += yield c.until(lambda f: f.get("t") == "ERROR")
        numbered = [f for f in frames if f["op"] in (5, 6)]
        self.assertEqual([f["s"] for f in numbered], list(range(1, len(numbered) + 1)))
        self.assertEqual(
            kinds(numbered),
            ["READY", "SUBSCRIBED", "COMMAND_RESULT", 5, "COMMAND_RESULT", "UNSUBSCRIBED", "ERROR"],
        )
        for f in frames:
            self.assertIsInstance(f["op"], int)
            self.assertEqual("t" in f, f["op"] == 6, f)
        self.assertIn({"op": 2}, frames)  # the ack: no s, no t

    @defer.inlineCallbacks
    def test_heartbeat_is_answered_at_once_before_and_after_ready(self) -> Any:
        """§2: "HEARTBEAT | d = last s received, or null. The receiver answers op 2 at once"."""
        c = yield self.client()
        yield c.next()
        for d in (None, 0):
            c.send({"op": 1, "d": d})
            self.assertEqual((yield c.next()), {"op": 2})
        c.send({"op": 3, "d": {"token": self.token("op")}})
        ready = yield c.next()
        for beat in ({"op": 1, "d": ready["s"]}, {"op": 1, "d": None}, {"op": 1}):
            c.send(beat)
            self.assertEqual((yield c.next()), {"op": 2})

    @defer.inlineCallbacks
    def test_heartbeat_d_of_the_wrong_type_is_a_decode_error(self) -> Any:
        """§6: "4002 decode error: not JSON, not an object, wrong field types"; a
        heartbeat's d is "last s received, or null"."""
        for d in ("5", 5.0, True, [1], {"s": 1}):
            c, _ = yield self.ready("op")
            c.send({"op": 1, "d": d})
            yield self.closed_with(c, 4002)

    @defer.inlineCallbacks
    def test_op_must_be_an_integer(self) -> Any:
        """§2: "op (integer) is always present"; §6: 4002 for wrong field types, 4001 for
        an unknown op."""
        cases: list[tuple[bytes, int]] = [
            (b'{"op": 1.0, "d": null}', 4002),
            (b'{"op": "1"}', 4002),
            (b'{"op": true}', 4002),
            (b'{"d": null}', 4002),
            (b'{"op": 10}', 4001),
            (b'{"op": -1}', 4001),
            (b'{"op": 100000000000000000000000000000}', 4001),
        ]
        for data, code in cases:
            c, _ = yield self.ready("op")
            c.send(data)
            yield self.closed_with(c, code)

    @defer.inlineCallbacks
    def test_unusual_but_valid_json_is_accepted(self) -> Any:
        """§2: "Every frame is one UTF-8 JSON object": escapes, whitespace and big
        numbers are JSON too."""
        c, _ = yield self.ready("op")
        for data in (
            b' \r\n\t{ "op" : 1 ,\n "d" : null }\n ',
            b'{"\\u006f\\u0070": 1, "\\u0064": null}',
            b'{"op": 1, "d": 12345678901234567890123456789}',
            b'{"op": 1, "d": null, "extra": {"\\u00e9\\ud83d\\ude00": [1e300, -0.0, 1E-5]}}',
        ):
            c.send(data)
            self.assertEqual((yield c.next()), {"op": 2}, data)

    @defer.inlineCallbacks
    def test_payloads_cross_the_bridge_as_any_json(self) -> Any:
        """§2: COMMAND "payload": <any JSON>; §7: the same payload reaches Node-RED and
        comes back in STATUS unchanged."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        yield self.subscribe(c, "lamp")
        payloads: list[Any] = [
            None,
            0,
            -12345678901234567890123456789,
            1.5e300,
            "é😀\u2028\u0000",
            [True, False, None, {"a": []}],
            {"nested": {"deep": [1, {"x": "y"}]}, "": "empty key"},
        ]
        for i, payload in enumerate(payloads):
            c.send({"op": 4, "d": {"device": lamp, "payload": payload, "id": f"any-{i}"}})
            frames = yield self.results(c, f"any-{i}")
            self.assertEqual(frames[-1]["d"]["result"], "confirmed", payload)
            [status] = [f["d"] for f in frames if f["op"] == 5]
            self.assertEqual(status["payload"], payload)
            [sent] = [
                m for m in self.upstream_messages() if m.get("command_id") == status["command_id"]
            ]
            self.assertEqual(sent["payload"], payload)

    @defer.inlineCallbacks
    def test_command_id_of_128_characters_is_accepted_and_129_is_not(self) -> Any:
        """§2 COMMAND "id": "<client-chosen id>"; docs: "id (string of at most 128
        characters)", anything else is 4002."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        c.send({"op": 4, "d": {"device": lamp, "payload": 1, "id": "x" * 128}})
        frames = yield self.results(c, "x" * 128)
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")
        c.send({"op": 4, "d": {"device": lamp, "payload": 1, "id": "x" * 129}})
        yield self.closed_with(c, 4002)

    @defer.inlineCallbacks
    def test_d_missing_or_null(self) -> Any:
        """§2 gives every op but HEARTBEAT an object d (docs: "anything else is 4002");
        HEARTBEAT's d may be null or absent."""
        for frame in (
            {"op": 3},
            {"op": 3, "d": None},
            {"op": 4},
            {"op": 4, "d": None},
            {"op": 7},
            {"op": 7, "d": None},
            {"op": 8, "d": None},
            {"op": 7, "d": {"devices": None}},
            {"op": 7, "d": {"devices": ["a"], "history": None}},
        ):
            c, _ = yield self.ready("op")
            if frame["op"] == 3:
                # After READY a second IDENTIFY is 4005 whatever its shape (see
                # CheckOrderTests); on a fresh connection the shape decides.
                c = yield self.client()
                yield c.next()
            c.send(frame)
            yield self.closed_with(c, 4002)

    @defer.inlineCallbacks
    def test_subscribe_to_no_device_and_unsubscribe_from_unknown_ones(self) -> Any:
        """§3: "for each device the server answers EVENT SUBSCRIBED" (none for an empty
        list); docs: "UNSUBSCRIBE is never an error. Each listed id gets an UNSUBSCRIBED,
        whether or not it was subscribed"."""
        c, _ = yield self.ready("viewer")
        c.send({"op": 7, "d": {"devices": []}})
        self.assertEqual((yield self.settle(c)), [])
        c.send({"op": 8, "d": {"devices": ["never-subscribed", self.world.ids["secret"]]}})
        frames = yield self.settle(c)
        self.assertEqual(
            [f["d"] for f in frames],
            [{"device": "never-subscribed"}, {"device": self.world.ids["secret"]}],
        )
        c.send({"op": 8, "d": {"devices": []}})
        self.assertEqual((yield self.settle(c)), [])

    def test_a_message_in_continuation_frames_is_one_frame(self) -> None:
        """§2: "Every frame is one UTF-8 JSON object in a text WebSocket message": a
        message may come in fragments, with a ping between them (RFC 6455 §5.4)."""
        raw = RawWS(self.world)
        try:
            self.assertEqual(raw.status, 101)
            self.assertEqual(raw.read(count=1)[0]["op"], 0)
            message = json.dumps({"op": 3, "d": {"token": self.token("viewer")}}).encode()
            raw.frame(1, message[:7], fin=False)
            raw.frame(9, b"ping!")
            raw.frame(0, message[7:20], fin=False)
            raw.frame(0, message[20:], fin=True)
            frames = raw.read(count=2)
            self.assertEqual(frames[0], ("opcode", 10, b"ping!"))
            self.assertEqual(frames[1]["t"], "READY")
            raw.frame(10, b"unsolicited pong")
            raw.text({"op": 1, "d": None})
            self.assertEqual(raw.read(count=1), [{"op": 2}])
        finally:
            raw.close()

    def test_a_message_too_large_in_fragments_is_4010(self) -> None:
        """§6: "4010 frame too large" (docs: messages over 64 KiB), however it is split."""
        raw = RawWS(self.world)
        try:
            raw.read(count=1)  # HELLO
            for i in range(12):
                raw.frame(1 if i == 0 else 0, b" " * 8000, fin=False)
            frames = raw.read(2.0)
            self.assertEqual(frames[-2]["d"]["code"], 4010)
            self.assertEqual(frames[-1], ("close", 4010))
        finally:
            raw.close()

    def test_binary_message_is_a_decode_error(self) -> None:
        """§2: frames are JSON "in a text WebSocket message"; §6: 4002 decode error."""
        raw = RawWS(self.world)
        try:
            raw.read(count=1)  # HELLO
            raw.frame(2, b'{"op": 1, "d": null}')
            frames = raw.read(1.0)
            self.assertEqual((frames[-2]["t"], frames[-2]["d"]["code"]), ("ERROR", 4002))
            self.assertEqual(frames[-1], ("close", 4002))
        finally:
            raw.close()

    def test_close_right_after_the_handshake_is_answered(self) -> None:
        """A client that closes before reading HELLO gets the closing handshake, and the
        process stays up (engineering rule: bad input gets a clear error)."""
        raw = RawWS(self.world)
        try:
            raw.frame(8, struct.pack(">H", 1000))
            frames = raw.read(2.0)
            self.assertEqual(frames[-1], ("close", 1000))
        finally:
            raw.close()
        self.assertEqual(https(self.world, "GET", "/healthz").status, 200)


class CheckOrderTests(MainTestCase):
    """docs/protocol.md: "Checks run in this order, and the first failure wins: decoding
    (4002), op an integer but not 0-9 (4001), the session's state (4006 before READY,
    4005 for a second IDENTIFY/RESUME), the payload's shape (4002), permission (4003)"."""

    @defer.inlineCallbacks
    def test_any_op_but_1_2_3_9_before_ready_is_4006_whatever_it_carries(self) -> Any:
        """§5: "any op other than 1, 2, 3 or 9 before READY gets EVENT ERROR and the
        connection is closed at once with ... 4006"."""
        for frame in ({"op": 7}, {"op": 4, "d": {}}, {"op": 5, "d": None}, {"op": 8, "d": []}):
            c = yield self.client()
            yield c.next()
            c.send(frame)
            yield self.closed_with(c, 4006)

    @defer.inlineCallbacks
    def test_a_second_identify_or_resume_is_4005_whatever_it_carries(self) -> Any:
        """§6: "4005 already authenticated"."""
        for frame in ({"op": 3, "d": 5}, {"op": 3}, {"op": 9, "d": {"seq": -1}}):
            c, _ = yield self.ready("op")
            c.send(frame)
            yield self.closed_with(c, 4005)


class UnstorableJsonTests(MainTestCase):
    """JSON that decodes in Python to what no frame, audit entry or history row holds."""

    @defer.inlineCallbacks
    def assertStoreStillWrites(self) -> Any:
        """A refusal now reaches the audit log: the bad frames did not wedge the store."""
        probe = "probe-" + uuid.uuid4().hex
        c, _ = yield self.ready("viewer")
        c.send({"op": 7, "d": {"devices": [probe]}})
        yield self.closed_with(c, 4003)
        rows = yield self.audit_rows(f"device_id={probe!r}")
        self.assertEqual([(r["username"], r["result"]) for r in rows], [("viewer", "denied")])
        health = json.loads(https(self.world, "GET", "/healthz").body)
        self.assertLess(health["store_backlog"], 50)

    @defer.inlineCallbacks
    def test_lone_surrogates_are_a_decode_error_and_harm_nothing(self) -> Any:
        """§2: "Every frame is one UTF-8 JSON object": an escaped lone surrogate names no
        character and has no UTF-8 form (RFC 8259 §8.2), so §6 "4002 decode error" - not a
        dropped connection, and not an audit entry the database refuses forever."""
        lamp = self.world.ids["lamp"]
        for data in (
            rb'{"op": 8, "d": {"devices": ["\ud800"]}}',
            b'{"op": 4, "d": {"device": "%s", "payload": 1, "id": "\\udfff"}}' % lamp.encode(),
            b'{"op": 4, "d": {"device": "%s", "payload": "\\ud83d", "id": "a"}}' % lamp.encode(),
            rb'{"op": 7, "d": {"devices": ["\udbff"]}}',
            rb'{"op": 1, "d": null, "\ud800": 0}',
        ):
            c, _ = yield self.ready("op")
            c.send(data)
            yield self.closed_with(c, 4002)
        yield self.assertStoreStillWrites()

    @defer.inlineCallbacks
    def test_a_number_no_double_holds_is_a_decode_error_and_harms_nothing(self) -> Any:
        """§2 COMMAND "payload": <any JSON>, but RFC 8259 §6 lets an implementation limit
        the range of numbers: 1e400 is past a double's, and was stored as Infinity, which
        SQLite's JSON check refuses - for an operator's COMMAND and for a viewer's refused
        one alike, after which no audit entry was written again."""
        lamp = self.world.ids["lamp"].encode()
        for who, data in (
            ("op", b'{"op": 4, "d": {"device": "%s", "payload": 1e400, "id": "big"}}' % lamp),
            ("viewer", b'{"op": 4, "d": {"device": "%s", "payload": [-1E999], "id": "b"}}' % lamp),
        ):
            c, _ = yield self.ready(who)
            c.send(data)
            yield self.closed_with(c, 4002)
        yield self.assertStoreStillWrites()


# ---------------------------------------------------------- §3 session life

DEVICE_KEYS = {"id", "name", "kind", "permission", "online", "history_size"}


class SessionLifeTests(MainTestCase):
    @defer.inlineCallbacks
    def test_ready_has_the_documented_shape(self) -> Any:
        """§3: READY is {"user": {"id", "username"} or null, "role": "operator" | "device" |
        "anonymous", "devices": [{"id", "name", "kind", "permission": "read" | "change",
        "online": bool, "history_size": int}], "session_id": "..."}."""
        c, ready = yield self.ready("op")
        d = ready["d"]
        self.assertEqual(set(d), {"user", "role", "devices", "session_id"})
        self.assertEqual(set(d["user"]), {"id", "username"})
        self.assertIsInstance(d["user"]["id"], int)
        self.assertEqual((d["user"]["username"], d["role"]), ("op", "operator"))
        for device in d["devices"]:
            self.assertEqual(set(device), DEVICE_KEYS)
            self.assertIn(device["permission"], ("read", "change"))
            self.assertIsInstance(device["online"], bool)
            self.assertIsInstance(device["history_size"], int)
        lamp = next(x for x in d["devices"] if x["id"] == self.world.ids["lamp"])
        self.assertEqual(
            (lamp["name"], lamp["kind"], lamp["permission"], lamp["online"], lamp["history_size"]),
            ("lamp", "toggle", "change", True, 3),
        )

    @defer.inlineCallbacks
    def test_anonymous_ready_lists_exactly_the_public_devices(self) -> Any:
        """§2 IDENTIFY "{} for an anonymous viewer (only when anonymous access is
        enabled)"; §5: the public flag gives read "also for anonymous connections"."""
        c, ready = yield self.anonymous()
        self.assertEqual(ready["t"], "READY")
        d = ready["d"]
        self.assertEqual((d["user"], d["role"]), (None, "anonymous"))
        self.assertEqual(
            {x["id"]: x["permission"] for x in d["devices"]},
            {self.world.ids["public"]: "read", self.world.ids["pubchange"]: "read"},
        )
        c.send({"op": 4, "d": {"device": self.world.ids["public"], "payload": 1, "id": "a"}})
        yield self.closed_with(c, 4003)
        c, _ = yield self.anonymous()
        c.send({"op": 7, "d": {"devices": [self.world.ids["secret"]]}})
        yield self.closed_with(c, 4003)

    @defer.inlineCallbacks
    def test_subscribed_history_is_oldest_first_and_at_most_history_size(self) -> Any:
        """§3: SUBSCRIBED {"device", "permission", "history": [{"payload", "ts", "by"}...]},
        oldest first, at most that device's history_size entries."""
        lamp = self.world.ids["lamp"]  # history_size 3
        c, _ = yield self.ready("op")
        for i in range(5):
            c.send({"op": 4, "d": {"device": lamp, "payload": {"n": i}, "id": f"h{i}"}})
            yield self.results(c, f"h{i}")
        v, _ = yield self.ready("viewer")
        [sub] = yield self.subscribe(v, "lamp", history=True)
        self.assertEqual(set(sub["d"]), {"device", "permission", "history"})
        self.assertEqual((sub["d"]["device"], sub["d"]["permission"]), (lamp, "read"))
        history = sub["d"]["history"]
        self.assertEqual([h["payload"] for h in history], [{"n": 2}, {"n": 3}, {"n": 4}])
        for entry in history:
            self.assertEqual(set(entry), {"payload", "ts", "by"})
            self.assertEqual(entry["by"], "op")
        self.assertEqual([h["ts"] for h in history], sorted(h["ts"] for h in history))
        v.send({"op": 7, "d": {"devices": [lamp], "history": False}})
        again = yield v.event("SUBSCRIBED")
        self.assertEqual(again["d"]["history"], [])

    @defer.inlineCallbacks
    def test_status_carries_server_time_by_and_command_id(self) -> Any:
        """§2 STATUS d = {"device", "payload", "ts": <ms since epoch, server clock>,
        "by": "<username>" or null, "command_id": "<id>" or null}."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        yield self.subscribe(c, "lamp")
        before = time.time() * 1000
        c.send({"op": 4, "d": {"device": lamp, "payload": {"on": False}, "id": "ts"}})
        frames = yield self.results(c, "ts")
        [status] = [f["d"] for f in frames if f["op"] == 5]
        self.assertEqual(set(status), {"device", "payload", "ts", "by", "command_id"})
        self.assertIsInstance(status["ts"], int)
        self.assertLessEqual(abs(status["ts"] - before), 5000)
        self.assertEqual(
            (status["by"], status["command_id"]), ("op", frames[-1]["d"]["command_id"])
        )
        # A status Node-RED sends on its own is nobody's.
        self.nodered({"send": {"group_id": lamp, "payload": {"on": True}}})
        own = yield c.until(lambda f: f["op"] == 5)
        self.assertEqual((own[-1]["d"]["by"], own[-1]["d"]["command_id"]), (None, None))


class HeartbeatTimeoutTests(BriskTestCase):
    @defer.inlineCallbacks
    def test_silence_for_twice_the_interval_closes_4009(self) -> Any:
        """§3: "The client sends HEARTBEAT at least every heartbeat_interval; a connection
        silent for twice that is closed with 4009"."""
        c, ready = yield self.ready("ann")
        hello_interval = HEARTBEAT  # announced as 1000 ms by --heartbeat 1
        started = time.monotonic()
        for _ in range(3):  # heartbeats keep it open past twice the interval
            yield sleep(hello_interval * 0.7)
            c.send({"op": 1, "d": None})
        self.assertFalse(c.factory.closed.called)
        quiet_from = time.monotonic()
        frames = yield self.closed_with(c, 4009, timeout=2 * hello_interval + 3)
        silent = time.monotonic() - quiet_from
        self.assertGreaterEqual(silent, 2 * hello_interval - 0.1)
        self.assertLess(silent, 2 * hello_interval + 3.0)  # a 1 s sweep, on a busy machine
        self.assertGreater(time.monotonic() - started, 2 * hello_interval)
        self.assertEqual(frames[-1]["d"]["code"], 4009)

    @defer.inlineCallbacks
    def test_hello_announces_the_configured_interval(self) -> Any:
        """§2 HELLO heartbeat_interval is in ms; the command line gives seconds."""
        c = yield self.client()
        hello = yield c.next()
        self.assertEqual(hello["d"]["heartbeat_interval"], int(HEARTBEAT * 1000))


# ------------------------------------------------------------------ RESUME


class ResumeTests(MainTestCase):
    @defer.inlineCallbacks
    def dropped_session(self, username: str, *labels: str) -> Any:
        """A READY session subscribed to ``labels`` whose connection was cut."""
        c, ready = yield self.ready(username)
        yield self.subscribe(c, *labels)
        yield self.settle(c)
        c.proto.dropConnection(abort=True)
        yield c.closed()
        return ready["d"]["session_id"], c.last_s

    @defer.inlineCallbacks
    def resume(self, session_id: str, seq: int, username: str) -> Any:
        r = yield self.client()
        yield r.next()
        r.send(
            {"op": 9, "d": {"session_id": session_id, "seq": seq, "token": self.token(username)}}
        )
        return r

    @defer.inlineCallbacks
    def test_replay_after_seq_with_the_numbers_they_would_have_had(self) -> Any:
        """§3: "the server restores the session's subscriptions, replays in order every
        STATUS and EVENT the session would have received after seq, carrying the sequence
        numbers they would have had (the first is seq + 1), then sends EVENT RESUMED"."""
        lamp = self.world.ids["lamp"]
        session_id, seq = yield self.dropped_session("viewer", "lamp")
        for n in range(3):
            self.nodered({"send": {"group_id": lamp, "payload": {"missed": n}}})
        yield sleep(0.3)
        r = yield self.resume(session_id, seq, "viewer")
        frames = yield r.until(lambda f: f.get("t") == "RESUMED")
        self.assertEqual(
            [f["d"]["payload"] for f in frames[:-1]], [{"missed": n} for n in range(3)]
        )
        self.assertEqual([f["s"] for f in frames], list(range(seq + 1, seq + 5)))
        self.assertEqual(frames[-1]["d"], {"session_id": session_id, "replayed": 3})
        # The subscription was restored: the next status arrives live, numbered on.
        self.nodered({"send": {"group_id": lamp, "payload": {"live": True}}})
        live = yield r.until(lambda f: f["op"] == 5)
        self.assertEqual((live[-1]["d"]["payload"], live[-1]["s"]), ({"live": True}, seq + 5))

    @defer.inlineCallbacks
    def test_resume_past_the_last_seq_is_4007(self) -> Any:
        """§6: "4007 invalid resume sequence" (docs: seq greater than the last number
        the session used)."""
        session_id, seq = yield self.dropped_session("viewer", "lamp")
        r = yield self.resume(session_id, seq + 10, "viewer")
        yield self.closed_with(r, 4007)

    @defer.inlineCallbacks
    def test_another_identity_or_unknown_session_is_invalid_then_identify_works(self) -> Any:
        """§3: "If it cannot (unknown or expired session, the gap no longer held, another
        identity), it sends EVENT INVALID_SESSION and the client must IDENTIFY and
        SUBSCRIBE again"; §4: INVALID_SESSION d is {}."""
        session_id, seq = yield self.dropped_session("viewer", "lamp")
        for sid, who in ((session_id, "op"), ("no-such-session", "viewer")):
            r = yield self.resume(sid, seq, who)
            invalid = yield r.next()
            self.assertEqual((invalid["t"], invalid["d"]), ("INVALID_SESSION", {}))
            r.send({"op": 3, "d": {"token": self.token(who)}})
            ready = yield r.event("READY")
            self.assertEqual(ready["d"]["user"]["username"], who)
            [sub] = yield self.subscribe(r, "lamp")
            self.assertEqual(sub["d"]["device"], self.world.ids["lamp"])

    @defer.inlineCallbacks
    def test_a_device_no_longer_readable_is_not_replayed_and_comes_back_removed(self) -> Any:
        """§3: "Permissions are checked again on resume: a device no longer readable is
        not replayed and comes back as DEVICE_REMOVED"."""
        detach = self.world.ids["detach"]
        session_id, seq = yield self.dropped_session("leaver", "detach")
        self.nodered({"send": {"group_id": detach, "payload": {"secret": "before revoke"}}})
        yield sleep(0.3)
        yield self.shell(
            "from bridge.devices.models import Grant;"
            f"Grant.objects.get(user__username='leaver', device_id={detach!r}).delete()"
        )
        try:
            yield sleep(1.0)  # the one-second rule
            self.nodered({"send": {"group_id": detach, "payload": {"secret": "after revoke"}}})
            yield sleep(0.3)
            r = yield self.resume(session_id, seq, "leaver")
            frames = yield r.until(lambda f: f.get("t") == "RESUMED")
            self.assertEqual([f for f in frames if f["op"] == 5], [])
            self.assertIn(
                {"device": detach}, [f["d"] for f in frames if f.get("t") == "DEVICE_REMOVED"]
            )
            self.assertNotIn("revoke", json.dumps(frames))
        finally:
            yield self.shell(
                "from django.contrib.auth.models import User;"
                "from bridge.devices.models import Grant;"
                "Grant.objects.create(user=User.objects.get(username='leaver'),"
                f" device_id={detach!r}, permission='read')"
            )


class ResumeWindowTests(BriskTestCase):
    @defer.inlineCallbacks
    def test_a_session_is_resumable_within_its_window_and_not_after(self) -> Any:
        """§3: "a session stays resumable for at least 60 s (configurable) after its
        connection drops" (here --resume-window 1); after it, INVALID_SESSION."""
        # The window is checked once a second: well past window + 1 s it has closed.
        for wait, expected in ((0.3, "RESUMED"), (RESUME_WINDOW + 1.6, "INVALID_SESSION")):
            c, ready = yield self.ready("ann")
            c.proto.dropConnection(abort=True)
            yield c.closed()
            yield sleep(wait)
            r = yield self.client()
            yield r.next()
            r.send(
                {
                    "op": 9,
                    "d": {
                        "session_id": ready["d"]["session_id"],
                        "seq": ready["s"],
                        "token": self.token("ann"),
                    },
                }
            )
            frame = yield r.next()
            self.assertEqual(frame["t"], expected, wait)


# --------------------------------------------------------------- §4 events


class CommandResultTests(MainTestCase):
    @defer.inlineCallbacks
    def test_sent_comes_first_then_exactly_one_other(self) -> Any:
        """§4: COMMAND_RESULT {"id", "command_id", "device", "result", "detail": str}.
        "sent comes first, then exactly one of the others"."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        c.send({"op": 4, "d": {"device": lamp, "payload": {"on": True}, "id": "once"}})
        frames = yield self.results(c, "once")
        frames += yield self.settle(c)
        yield sleep(0.3)
        frames += yield self.settle(c)
        results = [f["d"] for f in frames if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual([r["result"] for r in results], ["sent", "confirmed"])
        for r in results:
            self.assertEqual(set(r), {"id", "command_id", "device", "result", "detail"})
            self.assertEqual((r["id"], r["device"]), ("once", lamp))
            self.assertIsInstance(r["detail"], str)
        self.assertEqual(results[0]["command_id"], results[1]["command_id"])
        self.assertEqual(str(uuid.UUID(results[0]["command_id"])), results[0]["command_id"])


class RuntimeEventTests(MainTestCase):
    @defer.inlineCallbacks
    def timed_change(self, code: str) -> Any:
        """Run ORM code in bridge-admin; the wall-clock time it saved."""
        out = yield self.shell(f"import time\n{code}\nprint(repr(time.time()))")
        return float(out.splitlines()[-1])

    @defer.inlineCallbacks
    def test_configuration_change_is_device_changed_with_its_fields(self) -> Any:
        """§4: DEVICE_CHANGED {"device", "name", "kind", "history_size", "permission"}:
        configuration ... changed at runtime (docs: to every session that can read it)."""
        renamed = self.world.ids["renamed"]
        subscribed, _ = yield self.ready("viewer")
        yield self.subscribe(subscribed, "renamed")
        other, _ = yield self.ready("viewer")
        yield self.shell(
            "from bridge.devices.models import Device as D;"
            f"d = D.objects.get(pk={renamed!r}); d.name = 'Renamed'; d.kind = 'dimmer';"
            " d.history_size = 7; d.save()"
        )
        expected = {
            "device": renamed,
            "name": "Renamed",
            "kind": "dimmer",
            "history_size": 7,
            "permission": "read",
        }
        for c in (subscribed, other):
            changed = yield c.event("DEVICE_CHANGED", timeout=3)
            self.assertEqual(changed["d"], expected)

    @defer.inlineCallbacks
    def test_a_deleted_device_is_removed_within_one_second(self) -> Any:
        """§5: "a device's removal takes effect on live connections within one second";
        §4: DEVICE_REMOVED {"device"}: "the server has unsubscribed the connection"."""
        doomed = self.world.ids["doomed"]
        c, _ = yield self.ready("viewer")
        yield self.subscribe(c, "doomed")
        arrived: list[float] = []
        d = c.event("DEVICE_REMOVED", timeout=5)
        d.addCallback(lambda f: arrived.append(time.time()) or f)
        saved_at = yield self.timed_change(
            f"from bridge.devices.models import Device as D; D.objects.get(pk={doomed!r}).delete()"
        )
        removed = yield d
        self.assertEqual(removed["d"], {"device": doomed})
        self.assertLess(arrived[0] - saved_at, 1.0)
        # Unsubscribed: a later status for that id reaches nobody.
        self.nodered({"send": {"group_id": doomed, "payload": {"ghost": True}}})
        yield sleep(0.3)
        self.assertNotIn("ghost", json.dumps((yield self.settle(c))))

    @defer.inlineCallbacks
    def test_a_disabled_device_goes_offline_and_is_removed(self) -> Any:
        """§4: DEVICE_STATE {"device", "online": bool}: "... device disabled ..."; and
        DEVICE_REMOVED {"device"}: "deleted, disabled, or read permission withdrawn"."""
        retired = self.world.ids["retired"]
        subscribed, _ = yield self.ready("viewer")
        yield self.subscribe(subscribed, "retired")
        other, _ = yield self.ready("viewer")
        yield self.shell(
            "from bridge.devices.models import Device as D;"
            f"d = D.objects.get(pk={retired!r}); d.enabled = False; d.save()"
        )
        frames = yield subscribed.until(lambda f: f.get("t") == "DEVICE_REMOVED", timeout=3)
        self.assertEqual(
            [(f["t"], f["d"]) for f in frames if f.get("t", "").startswith("DEVICE_")],
            [
                ("DEVICE_STATE", {"device": retired, "online": False}),
                ("DEVICE_REMOVED", {"device": retired}),
            ],
        )
        frames = yield other.until(lambda f: f.get("t") == "DEVICE_REMOVED", timeout=3)
        self.assertEqual([f.get("t") for f in frames], ["DEVICE_REMOVED"])  # not subscribed

    @defer.inlineCallbacks
    def test_link_loss_and_return_are_device_state_and_commands_fail_at_once(self) -> Any:
        """§7: "While the link is down every Node-RED-backed device is online: false
        (DEVICE_STATE to subscribers) and commands for them end at once with
        upstream_unavailable"; §4: DEVICE_STATE {"device", "online": bool}."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        yield self.subscribe(c, "lamp", "sensor")
        self.nodered({"drop": True})
        try:
            states = []
            while len(states) < 2:
                states.append((yield c.event("DEVICE_STATE", timeout=5))["d"])
            self.assertEqual(
                sorted(states, key=lambda s: s["device"]),
                sorted(
                    [{"device": self.world.ids[x], "online": False} for x in ("lamp", "sensor")],
                    key=lambda s: s["device"],
                ),
            )
            started = time.monotonic()
            c.send({"op": 4, "d": {"device": lamp, "payload": 1, "id": "down"}})
            frames = yield self.results(c, "down")
            self.assertLess(time.monotonic() - started, 1.0)
            self.assertEqual(
                [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"],
                ["sent", "upstream_unavailable"],
            )
        finally:
            self.nodered({"accept": True})
        back = yield c.until(
            lambda f: f.get("t") == "DEVICE_STATE" and f["d"] == {"device": lamp, "online": True},
            timeout=15,
        )
        self.assertTrue(back[-1]["d"]["online"])
        while json.loads(https(self.world, "GET", "/healthz").body)["upstream"]["state"] != "up":
            yield sleep(0.1)


# ---------------------------------------------------------- §5 permissions


class PermissionTests(MainTestCase):
    @defer.inlineCallbacks
    def test_permission_is_the_highest_of_own_group_and_public(self) -> Any:
        """§5: "A device's permission for an identity is the highest of: superuser ...,
        the user's own grant, the grants of the user's groups, and the device's public
        flag"."""
        ids = self.world.ids
        _, member = yield self.ready("member")  # own read + group change on "mixed"
        self.assertEqual(
            {d["id"]: d["permission"] for d in member["d"]["devices"]},
            {
                ids["mixed"]: "change",
                ids["sensor"]: "read",
                ids["public"]: "read",
                ids["pubchange"]: "read",
            },
        )
        c, op = yield self.ready("op")  # own change on the public "pubchange"
        self.assertEqual(
            [d["permission"] for d in op["d"]["devices"] if d["id"] == ids["pubchange"]], ["change"]
        )
        c.send({"op": 4, "d": {"device": ids["pubchange"], "payload": 1, "id": "pub"}})
        frames = yield self.results(c, "pub")
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")

    @defer.inlineCallbacks
    def test_ops_before_ready_are_4006_and_audited(self) -> Any:
        """§5: "any op other than 1, 2, 3 or 9 before READY gets EVENT ERROR and the
        connection is closed at once with ... 4006 ... The attempt is written to the
        audit log"."""
        for op in (0, 2, 4, 5, 6, 7, 8):
            c = yield self.client()
            yield c.next()
            frame: dict[str, Any] = {"op": op}
            if op == 2:  # an ack is no request: ignored, the connection stays open
                c.send(frame)
                self.assertEqual((yield self.settle(c)), [])
                continue
            frame["d"] = (
                {"devices": []}
                if op in (7, 8)
                else {"device": self.world.ids["lamp"], "payload": 1, "id": "x"}
            )
            c.send(frame)
            yield self.closed_with(c, 4006)
        rows = yield self.audit_rows("action='before_ready'")
        self.assertGreaterEqual(len(rows), 6, rows)
        self.assertTrue(all(r["result"] == "denied" and r["remote_addr"] for r in rows), rows)

    @defer.inlineCallbacks
    def test_a_device_client_cannot_forge_who_or_when(self) -> Any:
        """§2 STATUS "ts": <ms since epoch, server clock>, "by": "<username>" or null: a
        device client's own by and ts are not taken."""
        robot = self.world.ids["robot"]
        out, err, code = yield admin(self.world.data_dir, "devicekey", robot)
        self.assertEqual(code, 0, err)
        viewer, _ = yield self.ready("op")
        yield self.subscribe(viewer, "robot")
        dev = yield self.client()
        yield dev.next()
        dev.send({"op": 3, "d": {"device_key": out.strip()}})
        ready = yield dev.event("READY")
        self.assertEqual((ready["d"]["role"], ready["d"]["user"]), ("device", None))
        dev.send(
            {
                "op": 5,
                "d": {
                    "device": robot,
                    "payload": {"pos": 1},
                    "by": "root",
                    "ts": 1,
                    "command_id": None,
                },
            }
        )
        status = yield viewer.until(lambda f: f["op"] == 5)
        d = status[-1]["d"]
        self.assertEqual((d["payload"], d["by"]), ({"pos": 1}, None))
        self.assertLess(abs(d["ts"] - time.time() * 1000), 5000)


# ------------------------------------------------------------ §7 Node-RED

COMMAND_KEYS = {"group_id", "payload", "user", "command_id", "ts"}


class NodeRedLinkTests(MainTestCase):
    @defer.inlineCallbacks
    def test_a_command_reaches_node_red_as_one_object_of_five_keys(self) -> Any:
        """§7: Bridge to Node-RED, one JSON object per command: {"group_id": "<device id>",
        "payload": <any JSON>, "user": "<username>", "command_id": "<uuid>", "ts": <ms>}."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        before = time.time() * 1000
        c.send({"op": 4, "d": {"device": lamp, "payload": {"shape": 1}, "id": "shape"}})
        frames = yield self.results(c, "shape")
        command_id = frames[-1]["d"]["command_id"]
        [sent] = [m for m in self.upstream_messages() if m.get("command_id") == command_id]
        self.assertEqual(set(sent), COMMAND_KEYS)
        self.assertEqual(
            (sent["group_id"], sent["payload"], sent["user"]), (lamp, {"shape": 1}, "op")
        )
        self.assertEqual(str(uuid.UUID(sent["command_id"])), sent["command_id"])
        self.assertIsInstance(sent["ts"], int)
        self.assertLess(abs(sent["ts"] - before), 5000)

    @defer.inlineCallbacks
    def test_other_keys_are_ignored(self) -> Any:
        """§7: "Other keys (_msgid, _session, topic, ...) are ignored"."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("viewer")
        yield self.subscribe(c, "lamp")
        self.nodered(
            {
                "send": {
                    "_msgid": "abc.123",
                    "_session": {"type": "websocket", "id": "1"},
                    "topic": "t",
                    "group_id": lamp,
                    "payload": {"extra": "keys"},
                    "by": "root",
                }
            }
        )
        status = yield c.until(lambda f: f["op"] == 5)
        self.assertEqual(
            status[-1]["d"],
            {**status[-1]["d"], "device": lamp, "payload": {"extra": "keys"}, "by": None},
        )

    @defer.inlineCallbacks
    def test_unknown_or_disabled_group_id_is_dropped_and_counted(self) -> Any:
        """§7: "A group_id that is not a known, enabled device is dropped and counted"."""
        before = metrics(self.world)['bridge_statuses_dropped_total{reason="unknown_device"}']
        c, _ = yield self.ready("root")
        yield self.subscribe(c, "lamp")
        for group_id in ("no-such-device", self.world.ids["offduty"]):
            self.nodered({"send": {"group_id": group_id, "payload": {"dropped": True}}})
        yield sleep(0.5)
        self.assertNotIn("dropped", json.dumps((yield self.settle(c))))
        after = metrics(self.world)['bridge_statuses_dropped_total{reason="unknown_device"}']
        self.assertEqual(after - before, 2)

    @defer.inlineCallbacks
    def test_without_command_id_the_first_status_confirms(self) -> Any:
        """§7: "if the flow drops command_id, the first status for that device after the
        command confirms it" and "its STATUS shows by and command_id"."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("op")
        yield self.subscribe(c, "lamp")
        c.send({"op": 4, "d": {"device": lamp, "payload": {"_reply": "no_command_id"}, "id": "n"}})
        frames = yield self.results(c, "n")
        result = frames[-1]["d"]
        self.assertEqual(result["result"], "confirmed")
        [status] = [f["d"] for f in frames if f["op"] == 5]
        self.assertEqual((status["by"], status["command_id"]), ("op", result["command_id"]))
        [sent] = [
            m for m in self.upstream_messages() if m.get("command_id") == result["command_id"]
        ]
        self.assertEqual(sent["payload"], {"_reply": "no_command_id"})

    @defer.inlineCallbacks
    def test_no_confirmation_in_time_is_timeout_and_changes_nothing(self) -> Any:
        """§7: "No confirmation within the device's command timeout ... ends the command with
        timeout. A device's state changes only when Node-RED (or its device client) says so:
        a command alone never changes what viewers see"."""
        quick = self.world.ids["quick"]  # command timeout 1 s
        c, _ = yield self.ready("op")
        v, _ = yield self.ready("root")
        yield self.subscribe(v, "quick")
        started = time.monotonic()
        c.send({"op": 4, "d": {"device": quick, "payload": {"_reply": "silent"}, "id": "t"}})
        frames = yield self.results(c, "t")
        elapsed = time.monotonic() - started
        self.assertEqual(frames[-1]["d"]["result"], "timeout")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3.5)
        self.assertEqual([f for f in (yield self.settle(v)) if f["op"] == 5], [])
        # A late status is an ordinary one (docs): it confirms nothing.
        self.nodered(
            {
                "send": {
                    "group_id": quick,
                    "payload": {"late": 1},
                    "command_id": frames[-1]["d"]["command_id"],
                }
            }
        )
        late = yield v.until(lambda f: f["op"] == 5)
        self.assertEqual((late[-1]["d"]["by"], late[-1]["d"]["command_id"]), (None, None))

    @defer.inlineCallbacks
    def test_the_default_command_timeout_is_five_seconds(self) -> Any:
        """§7: "the device's command timeout (default 5 s)"."""
        slowpoke = self.world.ids["slowpoke"]  # provisioned without a timeout
        c, _ = yield self.ready("op")
        started = time.monotonic()
        c.send({"op": 4, "d": {"device": slowpoke, "payload": {"_reply": "silent"}, "id": "d"}})
        frames = yield self.results(c, "d", timeout=8)
        elapsed = time.monotonic() - started
        self.assertEqual(frames[-1]["d"]["result"], "timeout")
        self.assertGreaterEqual(elapsed, 4.8)
        self.assertLess(elapsed, 7.5)


# --------------------------------------------------------- §5a slow viewers


class SlowViewerTests(MainTestCase):
    @defer.inlineCallbacks
    def test_a_slow_viewer_gets_the_newest_status_and_slows_nobody(self) -> Any:
        """§5a: "A viewer that cannot keep up gets, for each device, only the newest pending
        STATUS (older pending ones for that device are dropped, the newest never is) ...
        Other viewers and the Node-RED link are never slowed down by a slow viewer"."""
        burst = self.world.ids["burst"]
        count, pad = 400, 30_000  # 12 MB: more than the kernel buffers between us
        slow, _ = yield self.ready("viewer")
        fast, _ = yield self.ready("op")
        yield self.subscribe(slow, "burst")
        yield self.subscribe(fast, "burst")
        tcp = slow.proto.transport.transport  # under TLS
        tcp.stopReading()  # the slow viewer stops reading
        self.nodered({"burst": {"group_id": burst, "count": count, "pad": pad}})
        got = yield fast.until(
            lambda f: f["op"] == 5 and f["d"]["payload"]["i"] == count - 1, timeout=20
        )
        # The fast viewer reached the newest status while the slow one still held
        # back (it may itself skip some: this test process reads both ends).
        self.assertFalse(slow.factory.frames.pending)
        fast_numbers = [f["s"] for f in got]
        self.assertEqual(fast_numbers, list(range(fast_numbers[0], fast_numbers[0] + len(got))))
        tcp.startReading()
        frames = yield slow.until(
            lambda f: f["op"] == 5 and f["d"]["payload"]["i"] == count - 1, timeout=20
        )
        seen = [f["d"]["payload"]["i"] for f in frames if f["op"] == 5]
        self.assertEqual(seen, sorted(seen))
        self.assertEqual(seen[-1], count - 1)  # the newest is never dropped
        self.assertLess(len(seen), count)  # older pending ones were
        numbers = [f["s"] for f in frames]
        self.assertEqual(numbers, list(range(numbers[0], numbers[0] + len(numbers))))
        self.assertGreater(metrics(self.world)["bridge_slow_viewer_drops_total"], 0)


# ---------------------------------------------------- §8, §9: ids and admin


class AdminTests(MainTestCase):
    @defer.inlineCallbacks
    def test_adddevice_prints_a_random_url_safe_id_of_at_least_128_bits(self) -> Any:
        """§8: "Device ids are random, URL-safe and unguessable (at least 128 bits),
        generated by the bridge when a device is created ... An operator may import a
        chosen id"; §9: adddevice "prints the device id on stdout"."""
        d = self.world.data_dir
        runs = yield gather(
            admin(d, "adddevice", "Press 1", "--kind", "toggle"),
            admin(d, "adddevice", "Press 1", "--kind", "toggle"),
            admin(d, "adddevice", "Oven", "--kind", "sensor", "--id", "oven-1", "--history", "9"),
        )
        for _, err, code in runs:
            self.assertEqual((code, err), (0, ""))
        first, second, imported = (out for out, _, _ in runs)
        for generated in (first, second):
            self.assertRegex(generated, r"^[A-Za-z0-9_-]{22,}$")  # 22 base64url chars: 132 bits
        self.assertNotEqual(first, second)  # the name is separate from the id
        self.assertEqual(imported, "oven-1")
        c, ready = yield self.ready("root")
        oven = next(x for x in ready["d"]["devices"] if x["id"] == "oven-1")
        self.assertEqual((oven["name"], oven["kind"], oven["history_size"]), ("Oven", "sensor", 9))

    @defer.inlineCallbacks
    def test_adduser_grant_revoke_and_token_work_from_scripts(self) -> Any:
        """§9: "adduser USERNAME [--password-stdin] [--group GROUP]... [--staff]
        [--superuser] (a named group is created if it does not exist)", grant, revoke and
        "token USERNAME prints a fresh IDENTIFY token on stdout"."""
        d = self.world.data_dir
        lamp = self.world.ids["lamp"]
        made = yield gather(
            admin(
                d, "adduser", "scripted", "--password-stdin", "--group", "new-crew", stdin=PASSWORD
            ),
            admin(d, "adduser", "chief", "--password-stdin", "--staff", stdin=PASSWORD),
            admin(d, "adduser", "god", "--password-stdin", "--superuser", stdin=PASSWORD),
        )
        self.assertEqual([code for _, _, code in made], [0, 0, 0], made)
        out = yield self.shell(
            "from django.contrib.auth.models import User;"
            "users = User.objects.filter(username__in=['scripted', 'chief', 'god']);"
            "print([(u.username, u.is_staff, u.is_superuser, [g.name for g in u.groups.all()])"
            " for u in users.order_by('username')])"
        )
        self.assertEqual(
            out.splitlines()[-1],
            "[('chief', True, False, []), ('god', True, True, []),"
            " ('scripted', False, False, ['new-crew'])]",
        )
        granted = yield gather(
            admin(d, "grant", "--group", "new-crew", lamp, "change"),
            admin(d, "token", "scripted"),
        )
        self.assertEqual([code for _, _, code in granted], [0, 0], granted)
        c, ready = yield self.identify(granted[1][0])
        self.assertEqual(
            [x["permission"] for x in ready["d"]["devices"] if x["id"] == lamp], ["change"]
        )
        out, err, code = yield admin(d, "revoke", "--group", "new-crew", lamp)
        self.assertEqual(code, 0, err)
        removed = yield c.event("DEVICE_REMOVED", timeout=3)
        self.assertEqual(removed["d"], {"device": lamp})

    @defer.inlineCallbacks
    def test_unknown_user_group_or_device_exits_non_zero_with_one_line(self) -> Any:
        """§9: "Each exits non-zero with a one-line message on stderr for an unknown user,
        group or device"."""
        d, lamp = self.world.data_dir, self.world.ids["lamp"]
        runs = yield gather(
            admin(d, "grant", "--user", "ghost", lamp, "read"),
            admin(d, "grant", "--group", "ghosts", lamp, "read"),
            admin(d, "revoke", "--user", "op", "no-such-device"),
            admin(d, "token", "ghost"),
        )
        for out, err, code in runs:
            self.assertNotEqual(code, 0, err)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertRegex(err, r"unknown (user|group|device)")
            self.assertEqual(out, "")

    @defer.inlineCallbacks
    def test_a_bad_argument_exits_non_zero_with_one_line(self) -> Any:
        """§9: "Each exits non-zero with a one-line message on stderr for ... a bad
        argument"."""
        d, lamp = self.world.data_dir, self.world.ids["lamp"]
        runs = yield gather(
            admin(d, "adduser"),
            admin(d, "grant", "--user", "op", lamp, "write"),
            admin(d, "adddevice", "Fan", "--kind", "toggle", "--history", "many"),
            admin(d, "adddevice", "Fan", "--kind", "toggle", "--timeout", "nan"),
            admin(d, "--settings", "no_such_project.settings", "token", "op"),
            admin(d, "publish", "--to", "all", "--event", "e", "--data", '"\\ud800"'),
        )
        for out, err, code in runs:
            self.assertNotEqual(code, 0, err)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(out, "")


class CommandLineTests(MainTestCase):
    def test_port_0_logs_the_bound_url(self) -> None:
        """§9: "--port 0 binds a free port; the bound URL is then logged in a line that
        contains listening on and the full http(s)://host:port/ URL"."""
        lines = [line for line in self.world.log_text().splitlines() if "listening on" in line]
        self.assertEqual(len(lines), 1, lines)
        match = re.search(r"(https://[^\s/]+:(\d+)/)", lines[0])
        assert match is not None, lines[0]
        self.assertNotEqual(match.group(2), "0")
        self.assertEqual(int(match.group(2)), self.world.port)
        self.assertEqual(https(self.world, "GET", "/healthz").status, 200)

    def test_standalone_state_lives_in_the_data_directory(self) -> None:
        """§9: "Without --settings the bundled standalone site is used, with SQLite and
        every piece of state (database, generated secret key, generated certificates) in
        the data directory"."""
        d = self.world.data_dir
        with open(d / "db.sqlite3", "rb") as f:
            self.assertEqual(f.read(16), b"SQLite format 3\x00")
        self.assertTrue((d / "secret_key").read_text().strip())
        pem = (d / "tls" / "cert.pem").read_bytes()
        self.assertIn(b"-----BEGIN CERTIFICATE-----", pem)
        self.assertEqual(pem, self.world.server.ca_pem)


# ------------------------------------------------------- §6 close codes


class CloseCodeTests(MainTestCase):
    @defer.inlineCallbacks
    def test_a_flood_of_frames_is_4008(self) -> Any:
        """§6: "4008 rate limited" (docs: an inbound token bucket)."""
        c, _ = yield self.ready("nobody")
        for _ in range(400):
            c.send({"op": 1, "d": None})
        yield self.closed_with(c, 4008)


class ShutdownTests(BriskTestCase):
    @defer.inlineCallbacks
    def test_shutdown_closes_every_connection_with_1001(self) -> Any:
        """§6: "1001 server going away (shutdown or restart): the client should RESUME"."""
        a, _ = yield self.ready("ann")
        b = yield self.client()
        yield b.next()
        self.world.server.stop()  # SIGTERM; the next test starts it again
        for c in (a, b):
            code, _ = yield c.closed()
            self.assertEqual(code, 1001)


class RestartTests(MainTestCase):
    @defer.inlineCallbacks
    def test_resume_after_a_restart(self) -> Any:
        """§6 1001 "(shutdown or restart): the client should RESUME", and §3: "a session
        stays resumable for at least 60 s ... after its connection drops"."""
        c, ready = yield self.ready("viewer")
        yield self.subscribe(c, "lamp")
        yield self.settle(c)
        self.world.server.stop()
        yield c.closed()
        yield self.world.start()
        r = yield self.client()
        yield r.next()
        r.send(
            {
                "op": 9,
                "d": {
                    "session_id": ready["d"]["session_id"],
                    "seq": c.last_s,
                    "token": self.token("viewer"),
                },
            }
        )
        frames = yield r.until(lambda f: f.get("t") in ("RESUMED", "INVALID_SESSION"))
        self.assertEqual(frames[-1]["t"], "RESUMED", frames)
        numbers = [f["s"] for f in frames]
        self.assertEqual(numbers, list(range(c.last_s + 1, c.last_s + 1 + len(frames))))


_OWN_SETTINGS = """
from pathlib import Path
BASE = Path(__file__).resolve().parent.parent
SECRET_KEY = "own-project-" + "k" * 40
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
INSTALLED_APPS = [
    "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django.contrib.staticfiles", "bridge.devices",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "mysite.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(BASE / "own.db")}}
STATIC_URL = "/static/"
USE_TZ = True
"""
_OWN_URLS = """
from django.http import HttpResponse
from django.urls import include, path
urlpatterns = [
    path("hello/", lambda request: HttpResponse("hello from mysite")),
    path("", include("bridge.urls")),
]
"""


class OwnProjectTests(ContractTestCase):
    """A project of one's own, run from its directory as manage.py would be."""

    make_world = staticmethod(main_world)

    def test_with_settings_the_bridge_serves_the_users_own_project(self) -> None:
        """§9: "With --settings the bridge serves the user's own Django project, which lists
        the bridge app in INSTALLED_APPS", and bridge-admin "runs any Django management
        command against the same settings" (both run from the project's directory)."""
        out, err, code = _own["migrate"]
        self.assertEqual(code, 0, err)
        self.assertTrue((_own["project"] / "own.db").exists())  # its own database, migrated
        server = _own["own"]
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        context = ssl.create_default_context(cadata=server.ca_pem.decode())

        def get(method: str, path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        self.assertEqual(get("GET", "/hello/"), (200, b"hello from mysite"))
        status, body = get("GET", "/healthz")
        self.assertEqual((status, json.loads(body)["upstream"]["state"]), (200, "up"))
        self.assertEqual(get("POST", "/api/token/")[0], 401)  # bridge.urls, included


class DemoTests(ContractTestCase):
    make_world = staticmethod(main_world)

    @defer.inlineCallbacks
    def test_demo_provisions_users_devices_and_the_simulator(self) -> Any:
        """§9: twistd -n bridge [--tls] ... [--demo] (README: "create demo users, devices
        and grants once; runs the simulator unless --nodered"; the log prints the demo
        passwords)."""
        server = _own["demo"]
        found = dict(re.findall(r"demo user (\w+) password (\S+)", server.log_text()))
        self.assertEqual(set(found), {"admin", "operator", "viewer"})
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        context = ssl.create_default_context(cadata=server.ca_pem.decode())
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        body = json.dumps({"username": "operator", "password": found["operator"]})
        conn.request("POST", "/api/token/", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        minted = json.loads(resp.read())["token"]
        conn.close()
        from tests.wsclient import connect

        c = yield connect(server.url.replace("https", "wss", 1) + "ws/", ca_pem=server.ca_pem)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        yield c.next()
        c.send({"op": 3, "d": {"token": minted}})
        ready = yield c.event("READY")
        devices = {d["kind"]: d for d in ready["d"]["devices"]}
        self.assertEqual(set(devices), {"toggle", "dimmer", "sensor"})
        self.assertTrue(all(d["online"] for d in devices.values()))
        c.send({"op": 7, "d": {"devices": [devices["sensor"]["id"]], "history": False}})
        status = yield c.until(lambda f: f["op"] == 5, timeout=5)  # the simulator reports
        self.assertEqual(status[-1]["d"]["device"], devices["sensor"]["id"])


class PostgresStoreTests(ContractTestCase):
    make_world = staticmethod(pg_world)

    @defer.inlineCallbacks
    def test_a_nul_character_in_a_payload_does_not_stop_the_audit_log(self) -> Any:
        """§2 COMMAND "payload": <any JSON> ("\\u0000" is JSON and Unicode), §5 "The attempt
        is written to the audit log" and docs: "A command's audit entry is created when it
        is sent" - here on PostgreSQL, whose jsonb and text refuse NUL."""
        lamp = self.world.ids["lamp"]
        c, _ = yield self.ready("pat")
        c.send({"op": 4, "d": {"device": lamp, "payload": {"note": "a\u0000b"}, "id": "nul"}})
        frames = yield self.results(c, "nul")
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")  # the wire carries it
        probe = "probe-" + uuid.uuid4().hex
        c.send({"op": 7, "d": {"devices": [probe]}})
        yield self.closed_with(c, 4003)
        yield sleep(1.5)  # the store writes every 0.25 s
        out = yield self.shell(
            "from bridge.devices.models import AuditEntry as A;"
            f"print(A.objects.filter(device_id={probe!r}).count())"
        )
        self.assertEqual(out.splitlines()[-1], "1", "the refusal after it was never written")
