"""The HTTP surface under ``--tls``: security headers, cookies, /healthz, static files.

The bridge here runs with a Node-RED link secret and a payload key, so that
what /healthz and the log show can be checked against real secrets.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
from typing import Any

from twisted.internet import defer

from tests.security.world import (
    PASSWORD,
    SecurityTestCase,
    Spec,
    World,
    https,
    login,
)

SPEC = Spec(
    users={"worker": {}, "boss": {"staff": True}},
    devices={"lamp": {}},
    grants=[("user", "worker", "lamp", "read")],
)
LINK_SECRET = "link-" + secrets.token_urlsafe(24)
PAYLOAD_KEY = os.urandom(32)

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World(SPEC, nodered=True, link_secret=LINK_SECRET, payload_key=PAYLOAD_KEY)
    return _world


REFERRER_POLICIES = {
    "no-referrer",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
}
ONE_YEAR = 31536000


class HttpTestCase(SecurityTestCase):
    make_world = staticmethod(world)

    def secrets(self) -> list[str]:
        return [
            LINK_SECRET,
            PAYLOAD_KEY.hex(),
            base64.b64encode(PAYLOAD_KEY).decode().rstrip("="),
            base64.urlsafe_b64encode(PAYLOAD_KEY).decode().rstrip("="),
            (self.world.data_dir / "secret_key").read_text().strip(),
            PASSWORD,
        ]


class SecurityHeaderTests(HttpTestCase):
    def assertSecurityHeaders(self, method: str, path: str, expected_status: int) -> None:
        body = b"{}" if method == "POST" else None
        headers = {"Content-Type": "application/json"} if method == "POST" else {}
        resp = https(self.world, method, path, headers=headers, body=body)
        self.assertEqual(resp.status, expected_status, f"{method} {path}")
        where = f"{method} {path} ({resp.status})"
        hsts = resp.all("strict-transport-security")
        self.assertEqual(len(hsts), 1, f"{where}: HSTS {hsts}")
        max_age = int(hsts[0].split("max-age=")[1].split(";")[0])
        self.assertGreaterEqual(max_age, ONE_YEAR, where)
        self.assertEqual(resp.all("x-content-type-options"), ["nosniff"], where)
        policies = resp.all("referrer-policy")
        self.assertEqual(len(policies), 1, f"{where}: {policies}")
        self.assertIn(policies[0], REFERRER_POLICIES, where)
        frames = resp.all("x-frame-options")
        self.assertEqual(len(frames), 1, f"{where}: {frames}")
        self.assertIn(frames[0].upper(), ("DENY", "SAMEORIGIN"), where)

    def test_django_pages(self) -> None:
        self.assertSecurityHeaders("GET", "/accounts/login/", 200)
        self.assertSecurityHeaders("GET", "/admin/login/", 200)
        self.assertSecurityHeaders("GET", "/no-such-page/", 404)
        self.assertSecurityHeaders("POST", "/api/token/", 401)

    def test_static_files(self) -> None:
        self.assertSecurityHeaders("GET", "/static/admin/js/core.js", 200)
        self.assertSecurityHeaders("GET", "/static/admin/css/base.css", 200)
        self.assertSecurityHeaders("GET", "/static/no-such-file.js", 404)

    def test_healthz(self) -> None:
        self.assertSecurityHeaders("GET", "/healthz", 200)

    def test_static_files_carry_their_own_type(self) -> None:
        # nosniff only helps when the type is right: a script is never text/html.
        resp = https(self.world, "GET", "/static/admin/js/core.js")
        self.assertEqual(resp.status, 200)
        self.assertIn("javascript", resp.header("content-type") or "")

    def test_session_and_csrf_cookies_are_secure(self) -> None:
        page = https(self.world, "GET", "/accounts/login/")
        csrf = page.cookies()["csrftoken"]
        self.assertTrue(csrf["secure"])
        jar = login(self.world, "worker")
        self.assertIn("sessionid", jar)
        # Log in again to see the Set-Cookie header itself.
        from urllib.parse import urlencode

        token = page.body.split(b'name="csrfmiddlewaretoken" value="')[1].split(b'"')[0]
        resp = https(
            self.world,
            "POST",
            "/accounts/login/",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": self.world.origin,
                "Referer": self.world.origin + "/accounts/login/",
            },
            body=urlencode(
                {"username": "worker", "password": PASSWORD, "csrfmiddlewaretoken": token}
            ).encode(),
            jar={"csrftoken": csrf.value},
        )
        self.assertEqual(resp.status, 302)
        session = resp.cookies()["sessionid"]
        self.assertTrue(session["secure"])
        self.assertTrue(session["httponly"])
        self.assertIn(session["samesite"].lower(), ("lax", "strict"))


class HealthzTests(HttpTestCase):
    def test_healthz_needs_no_auth_and_leaks_no_secret(self) -> None:
        resp = https(self.world, "GET", "/healthz")
        self.assertEqual(resp.status, 200)
        self.assertIn("no-store", resp.header("cache-control") or "")
        body = json.loads(resp.body)
        self.assertEqual(body["upstream"]["state"], "up")  # the link with the secret works
        self.assertLessEqual(
            set(body),
            {
                "status",
                "upstream",
                "redis",
                "database",
                "role",
                "connections",
                "devices",
                "store_backlog",
                "sessions",
            },
        )
        text = resp.body.decode()
        for secret in self.secrets():
            self.assertNotIn(secret, text)
        self.assertNotIn("Bearer", text)
        self.assertNotIn("authorization", text.lower())
        # No user names, device ids or paths of the data directory either.
        for name in ("worker", "boss", self.world.ids["lamp"], str(self.world.data_dir)):
            self.assertNotIn(name, text)

    def test_link_secret_and_keys_never_reach_the_log(self) -> None:
        log = self.world.log_text()
        self.assertIn("Node-RED link up", log)
        leaks = [line for line in log.splitlines() if any(s in line for s in self.secrets())]
        self.assertEqual(leaks, [])

    def test_the_link_secret_really_was_sent(self) -> None:
        # Guards the two tests above: the secret was configured and used.
        import hashlib

        assert self.world.nodered is not None
        expected = hashlib.sha256(f"Bearer {LINK_SECRET}".encode()).hexdigest()
        seen = [r["authorization_sha256"] for r in self.world.nodered.records() if "handshake" in r]
        self.assertIn(expected, seen)


class SurfaceTests(HttpTestCase):
    def test_static_files_cannot_escape_their_directories(self) -> None:
        # 400 or 404, never a file from outside and never a 500 (which also writes
        # a critical traceback to the log for every such request).
        for path in (
            "/static/../secret_key",
            "/static/..%2fsecret_key",
            "/static/%2e%2e/secret_key",
            "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "/static/bridge/../../../../../../etc/passwd",
            "/static/bridge/..%5c..%5csecret_key",
            "/static//etc/passwd",
            "/static/%2fetc%2fpasswd",
        ):
            resp = https(self.world, "GET", path)
            self.assertIn(resp.status, (400, 404), f"{path}: {resp.status}")
            for secret in self.secrets():
                self.assertNotIn(secret.encode(), resp.body)
            self.assertNotIn(b"root:", resp.body)

    def test_error_pages_show_no_debug_information(self) -> None:
        resp = https(self.world, "GET", "/no-such-page/")
        self.assertEqual(resp.status, 404)
        for needle in (b"Traceback", b"SECRET_KEY", b"URLconf", b"DEBUG", b"urlpatterns"):
            self.assertNotIn(needle, resp.body)

    def test_cleartext_http_on_the_tls_port_gets_no_page(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.world.port), timeout=5)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            try:
                while len(data) < 65536:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except (TimeoutError, OSError):
                pass
        finally:
            sock.close()
        self.assertFalse(data.startswith(b"HTTP/"), data[:200])
        self.assertNotIn(b'"status"', data)

    def test_audit_log_is_for_staff_only(self) -> None:
        anonymous = https(self.world, "GET", "/audit/")
        self.assertNotEqual(anonymous.status, 200)
        worker = https(self.world, "GET", "/audit/", jar=login(self.world, "worker"))
        self.assertIn(worker.status, (302, 403))
        boss = https(self.world, "GET", "/audit/", jar=login(self.world, "boss"))
        self.assertEqual(boss.status, 200)

    @defer.inlineCallbacks
    def test_admin_needs_staff(self) -> Any:
        resp = https(self.world, "GET", "/admin/", jar=login(self.world, "worker"))
        self.assertEqual(resp.status, 302)
        self.assertIn("/admin/login/", resp.header("location") or "")
        yield defer.succeed(None)
