"""A real ``twistd bridge --tls`` for the security tests, and the attacker's tools.

Each test module builds one :class:`World` lazily (a provisioned data
directory, optionally a recording Node-RED stand-in, the bridge process) and
shares it between its tests; every process is killed at exit.  Next to the
WebSocket client of :mod:`tests.wsclient` this module has the blunt tools an
attacker would use: a raw TLS socket that writes a handshake by hand, and a
small synchronous HTTPS client with a cookie jar (blocking is fine: the
server under test is another process).
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.server import BridgeProcess, admin, admin_sync, kill_on_exit
from tests.wsclient import Client, connect

PASSWORD = "correct-horse-battery-42"
HERE = Path(__file__).resolve().parent

# Users, devices and grants are created in one Django process: dozens of
# bridge-admin start-ups would cost a second each.  Plain ORM saves, so the
# signal handlers run exactly as they do for the admin and bridge-admin.
_PROVISION = """
import json
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from bridge.devices.models import Device, Grant
spec = json.loads({spec!r})
User = get_user_model()
for name, opts in spec["users"].items():
    u = User(username=name, is_superuser=opts.get("superuser", False),
             is_staff=opts.get("staff", False) or opts.get("superuser", False),
             is_active=opts.get("active", True))
    u.set_password(spec["password"])
    u.save()
    for g in opts.get("groups", []):
        u.groups.add(Group.objects.get_or_create(name=g)[0])
ids = {{}}
for label, opts in spec["devices"].items():
    d = Device.objects.create(name=label, kind=opts.get("kind", "toggle"),
                              public=opts.get("public", False),
                              history_size=opts.get("history", 5),
                              command_timeout=opts.get("timeout", 5.0),
                              enabled=opts.get("enabled", True))
    ids[label] = d.id
for kind, who, label, perm in spec["grants"]:
    if kind == "user":
        Grant.objects.create(device_id=ids[label], user=User.objects.get(username=who),
                             permission=perm)
    else:
        Grant.objects.create(device_id=ids[label], group=Group.objects.get_or_create(name=who)[0],
                             permission=perm)
print("IDS=" + json.dumps(ids))
from bridge.identity import make_token
tokens = {{u.username: make_token(u) for u in User.objects.filter(is_active=True)}}
print("TOKENS=" + json.dumps(tokens))
"""


@dataclass
class Spec:
    """Who and what a world starts with; every user's password is PASSWORD."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ("user" | "group", name, device label, "read" | "change")
    grants: list[tuple[str, str, str, str]] = field(default_factory=list)


class FakeNodeRed:
    """tests/security/fake_nodered.py in a subprocess: records what reaches Node-RED."""

    def __init__(
        self, directory: Path, secret_file: Path | None = None, control: bool = False
    ) -> None:
        self.log_path = directory / "nodered-received.jsonl"
        argv = [sys.executable, str(HERE / "fake_nodered.py"), "--log", str(self.log_path)]
        if secret_file is not None:
            argv += ["--secret-file", str(secret_file)]
        if control:
            argv.append("--control")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if control else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        atexit.register(self.stop)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fake Node-RED did not start")
        self.port = int(json.loads(line)["port"])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/bridge"

    def records(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def messages(self) -> list[Any]:
        return [r["message"] for r in self.records() if "message" in r]

    def received_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def control(self, command: dict[str, Any]) -> None:
        """One command for a stand-in started with ``control=True`` (see fake_nodered.py)."""
        assert self.proc.stdin is not None, "started without control=True"
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class World:
    """One provisioned bridge (and optionally a fake Node-RED) for one test module."""

    def __init__(
        self,
        spec: Spec,
        env: dict[str, str] | None = None,
        nodered: bool = False,
        link_secret: str | None = None,
        payload_key: bytes | None = None,
        args: list[str] | None = None,
        nodered_control: bool = False,
        database_url: str | None = None,
    ) -> None:
        data_dir = Path(tempfile.mkdtemp(prefix="bridge-sec-"))
        self.extra_dir = Path(tempfile.mkdtemp(prefix="bridge-sec-files-"))
        # Registered first, so it runs last: after the processes are killed.
        atexit.register(shutil.rmtree, data_dir, True)
        atexit.register(shutil.rmtree, self.extra_dir, True)
        argv = list(args or [])
        self.nodered: FakeNodeRed | None = None
        self.link_secret = link_secret
        self.payload_key = payload_key
        secret_file = None
        if link_secret is not None:
            secret_file = self.extra_dir / "link-secret"
            secret_file.write_text(link_secret + "\n")
            secret_file.chmod(0o600)
            argv += ["--nodered-secret-file", str(secret_file)]
        if payload_key is not None:
            key_file = self.extra_dir / "payload-key"
            key_file.write_text(payload_key.hex() + "\n")
            key_file.chmod(0o600)
            argv += ["--nodered-payload-key-file", str(key_file)]
        if nodered:
            self.nodered = FakeNodeRed(self.extra_dir, secret_file, control=nodered_control)
            argv += ["--nodered", self.nodered.url]
        # The bridge and every bridge-admin call share the database (default: SQLite).
        self.admin_env = {"DATABASE_URL": database_url} if database_url else None
        self.server = BridgeProcess(
            data_dir=data_dir, env={**(env or {}), **(self.admin_env or {})}, args=argv
        )
        kill_on_exit(self.server)
        payload = json.dumps(
            {
                "password": PASSWORD,
                "users": spec.users,
                "devices": spec.devices,
                "grants": spec.grants,
            }
        )
        out, err, code = admin_sync(
            data_dir, "shell", "-v", "0", "-c", _PROVISION.format(spec=payload), env=self.admin_env
        )
        assert code == 0, err
        marker = [line for line in out.splitlines() if line.startswith("IDS=")]
        assert marker, out
        self.ids: dict[str, str] = json.loads(marker[-1][4:])
        # One IDENTIFY token per active user, minted at provisioning (valid for
        # BRIDGE_TOKEN_MAX_AGE seconds, 60 by default).
        minted = [line for line in out.splitlines() if line.startswith("TOKENS=")]
        self.minted: dict[str, str] = json.loads(minted[-1][7:])

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    @property
    def port(self) -> int:
        match = re.search(r":(\d+)/$", self.server.url)
        assert match, self.server.url
        return int(match.group(1))

    @property
    def origin(self) -> str:
        """The page origin a browser on this bridge sends."""
        return f"https://localhost:{self.port}"

    @defer.inlineCallbacks
    def start(self) -> Any:
        if self.server.proc is not None:
            return
        yield self.server.start()
        if self.nodered is not None:
            deadline = time.monotonic() + 20
            while True:
                health = json.loads(https(self, "GET", "/healthz").body)
                if health["upstream"]["state"] == "up":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Node-RED link did not come up: {health}")
                yield sleep(0.1)

    def token(self, username: str) -> str:
        out, err, code = admin_sync(self.data_dir, "token", username, env=self.admin_env)
        assert code == 0, err
        return out

    def tokens(self, *usernames: str) -> dict[str, str]:
        """``bridge-admin token`` for several users in one Django start-up (about 1 s each)."""
        code = "from django.core.management import call_command\n" + "".join(
            f"call_command('token', {name!r})\n" for name in usernames
        )
        out, err, status = admin_sync(
            self.data_dir, "shell", "-v", "0", "-c", code, env=self.admin_env
        )
        assert status == 0, err
        lines = out.splitlines()[-len(usernames) :]
        return dict(zip(usernames, lines, strict=True))

    def shell(self, code: str) -> defer.Deferred[tuple[str, str, int]]:
        """Django code in a bridge-admin process, without blocking the reactor."""
        return admin(self.data_dir, "shell", "-v", "0", "-c", code, env=self.admin_env)

    def log_text(self) -> str:
        return self.server.log_text()


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


# ------------------------------------------------------------------- HTTPS


def tls_context(world: World) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=world.server.ca_pem.decode())
    return context


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def cookies(self) -> SimpleCookie:
        jar: SimpleCookie = SimpleCookie()
        for value in self.all("set-cookie"):
            jar.load(value)
        return jar


def https(
    world: World,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    jar: dict[str, str] | None = None,
) -> Response:
    """One request over verified TLS to ``localhost``; ``jar`` is read and updated."""
    conn = http.client.HTTPSConnection(
        "localhost", world.port, context=tls_context(world), timeout=15
    )
    sent = dict(headers or {})
    if jar:
        sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
    try:
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        response = Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()
    if jar is not None:
        for name, morsel in response.cookies().items():
            if morsel.value and morsel["max-age"] != "0":
                jar[name] = morsel.value
            else:
                jar.pop(name, None)
    return response


def login(world: World, username: str, password: str = PASSWORD) -> dict[str, str]:
    """Log in through the Django login form, like a browser: returns the cookie jar."""
    jar: dict[str, str] = {}
    page = https(world, "GET", "/accounts/login/", jar=jar)
    assert page.status == 200, page.status
    match = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
    assert match, page.body[:500]
    form = urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": match.group(1)}
    ).encode()
    done = https(
        world,
        "POST",
        "/accounts/login/",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": world.origin,
            "Referer": world.origin + "/accounts/login/",
        },
        body=form,
        jar=jar,
    )
    assert done.status == 302, (done.status, done.body[:500])
    assert "sessionid" in jar, jar
    return jar


def session_token(world: World, jar: dict[str, str]) -> Response:
    """POST /api/token/ as the dashboard's JavaScript does: session cookie plus CSRF."""
    return https(
        world,
        "POST",
        "/api/token/",
        headers={
            "X-CSRFToken": jar.get("csrftoken", ""),
            "Origin": world.origin,
            "Referer": world.origin + "/",
        },
        jar=jar,
    )


def logout(world: World, jar: dict[str, str]) -> Response:
    return https(
        world,
        "POST",
        "/accounts/logout/",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": world.origin,
            "Referer": world.origin + "/",
        },
        body=urlencode({"csrfmiddlewaretoken": jar.get("csrftoken", "")}).encode(),
        jar=jar,
    )


# ------------------------------------------------------- raw WebSocket handshake


@dataclass
class RawHandshake:
    status: int
    headers: dict[str, str]
    after_headers: bytes


def raw_handshake(
    world: World,
    path: str = "/ws/",
    headers: dict[str, str] | None = None,
    wait: float = 1.0,
) -> RawHandshake:
    """Write a WebSocket upgrade by hand and read what comes back for ``wait`` seconds.

    No ``Origin`` header is sent unless given: that is what a non-browser
    client does.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: localhost:{world.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
        "",
        "",
    ]
    sock = socket.create_connection(("127.0.0.1", world.port), timeout=5)
    tls = tls_context(world).wrap_socket(sock, server_hostname="localhost")
    try:
        tls.sendall("\r\n".join(lines).encode())
        data = b""
        deadline = time.monotonic() + wait
        tls.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = tls.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLError, ConnectionError):
                break
            if not chunk:
                break
            data += chunk
    finally:
        tls.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    parsed = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            parsed[k.strip().lower()] = v.strip()
    return RawHandshake(status, parsed, rest)


# ------------------------------------------------------------ test case base


class SecurityTestCase(unittest.TestCase):
    """Starts the module's world before each test; WebSocket helpers."""

    timeout = 90
    make_world: Callable[[], World]

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.world = type(self).make_world()
        yield self.world.start()

    @defer.inlineCallbacks
    def client(
        self,
        path: str = "ws/",
        headers: dict[str, str] | None = None,
        origin: str | None = None,
    ) -> Any:
        # localhost, so that world.origin is this page's own origin.
        url = f"wss://localhost:{self.world.port}/{path}"
        c = yield connect(url, headers=headers, ca_pem=self.world.server.ca_pem, origin=origin)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        return c

    @defer.inlineCallbacks
    def identify(self, token: str, path: str = "ws/") -> Any:
        """HELLO, IDENTIFY with ``token``: the client and the first frame after HELLO."""
        c = yield self.client(path)
        hello = yield c.next()
        self.assertEqual(hello["op"], 0)
        c.send({"op": 3, "d": {"token": token}})
        frame = yield c.next()
        return c, frame

    @defer.inlineCallbacks
    def ready(self, username: str, path: str = "ws/") -> Any:
        c, frame = yield self.identify(self.world.token(username), path)
        self.assertEqual(frame.get("t"), "READY", frame)
        return c, frame

    @defer.inlineCallbacks
    def closed_with(self, c: Client, code: int, timeout: float = 5.0) -> Any:
        """Every frame up to the close, which must carry ``code`` after an ERROR with it."""
        frames: list[dict[str, Any]] = []
        while True:
            try:
                frame = yield c.next(timeout)
            except defer.CancelledError:
                break
            frames.append(frame)
            if frame.get("t") == "ERROR":
                break
        errors = [f for f in frames if f.get("t") == "ERROR"]
        self.assertTrue(errors, f"no ERROR before the close; frames: {frames}")
        self.assertEqual(errors[-1]["d"]["code"], code, errors[-1])
        closed_code, _ = yield c.closed(timeout)
        self.assertEqual(closed_code, code)
        return frames

    @defer.inlineCallbacks
    def audit_rows(self, where: str) -> Any:
        """Audit entries matching a Django filter expression, as dicts (after a flush)."""
        code = (
            "import json; from bridge.devices.models import AuditEntry as A;"
            f"print(json.dumps(list(A.objects.filter({where}).values("
            "'username','device_id','action','result','detail','payload','remote_addr'))))"
        )
        rows: list[dict[str, Any]] = []
        for _ in range(10):
            out, err, status = yield self.world.shell(code)
            self.assertEqual(status, 0, err)
            rows = json.loads(out.splitlines()[-1])
            if rows:
                break
            yield sleep(0.3)
        return rows


def token_seconds_left(token: str, max_age: float) -> float:
    """How long a signed token stays valid: Django stamps it in whole seconds."""
    from django.core.signing import b62_decode

    stamp = b62_decode(token.split(":")[-2])
    return stamp + max_age - time.time()
