"""Cross-site WebSocket hijacking and handshake paths (spec §6 last line, §1).

A page on another site can open a WebSocket to the bridge and the browser
attaches the victim's session cookie: the ``Origin`` check is what stops it.
It must refuse with HTTP 403 before any WebSocket frame, cookie or not, and
under ``--tls`` an ``http://`` page of the same host is another origin.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from tests.security.world import (
    SecurityTestCase,
    Spec,
    World,
    login,
    raw_handshake,
)

SPEC = Spec(
    users={"alice": {}},
    devices={"lamp": {}},
    grants=[("user", "alice", "lamp", "read")],
)

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World(SPEC)
    return _world


class OriginTests(SecurityTestCase):
    make_world = staticmethod(world)

    def assertRefused(self, origin: str, headers: dict[str, str] | None = None) -> None:
        sent = {"Origin": origin, **(headers or {})}
        result = raw_handshake(self.world, "/ws/", sent)
        self.assertEqual(result.status, 403, f"{origin!r}: {result}")
        self.assertNotIn("sec-websocket-accept", result.headers)
        self.assertNotIn("upgrade", result.headers)
        # Nothing after the HTTP response: no HELLO, no frame of any kind.
        self.assertEqual(result.after_headers, b"", origin)

    def assertAccepted(self, origin: str | None, headers: dict[str, str] | None = None) -> None:
        sent = dict(headers or {})
        if origin is not None:
            sent["Origin"] = origin
        result = raw_handshake(self.world, "/ws/", sent)
        self.assertEqual(result.status, 101, f"{origin!r}: {result}")
        self.assertIn("sec-websocket-accept", result.headers)
        # HELLO follows at once: a text frame (0x81) carrying op 0.
        self.assertTrue(result.after_headers.startswith(b"\x81"), result.after_headers[:40])
        self.assertIn(b'"op":0', result.after_headers)

    def test_same_origin_and_no_origin_are_accepted(self) -> None:
        # Positive controls: the refusals below are about the Origin, nothing else.
        self.assertAccepted(self.world.origin)
        self.assertAccepted(None)

    def test_foreign_origin_gets_403_before_any_frame(self) -> None:
        self.assertRefused("https://evil.example")

    def test_foreign_origin_with_a_valid_session_cookie_gets_403(self) -> None:
        jar = login(self.world, "alice")
        cookie = {"Cookie": f"sessionid={jar['sessionid']}"}
        self.assertRefused("https://evil.example", cookie)
        # The same cookie from the bridge's own origin works (READY right after HELLO).
        self.assertAccepted(self.world.origin, cookie)

    @defer.inlineCallbacks
    def test_cookie_from_own_origin_gets_ready_but_foreign_origin_does_not(self) -> Any:
        jar = login(self.world, "alice")
        cookie = {"Cookie": f"sessionid={jar['sessionid']}"}
        c = yield self.client(headers=cookie, origin=self.world.origin)
        hello = yield c.next()
        self.assertEqual(hello["op"], 0)
        ready = yield c.next()
        self.assertEqual(ready.get("t"), "READY")
        self.assertEqual(ready["d"]["user"]["username"], "alice")
        d = self.client(headers=cookie, origin="https://evil.example")
        failure = yield self.assertFailure(d, ConnectionError)
        self.assertIn("403", str(failure))

    def test_http_scheme_of_the_same_host_is_refused_under_tls(self) -> None:
        port = self.world.port
        for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}"):
            self.assertRefused(origin)

    def test_look_alike_origins_are_refused(self) -> None:
        port = self.world.port
        for origin in (
            "https://localhost",  # default port 443, not the bridge's
            f"https://localhost:{port + 1}",
            f"https://evil.example/https://localhost:{port}",
            f"https://localhost.evil.example:{port}",
            f"https://user@localhost:{port}",
            f"wss://localhost:{port}",
            f"ftp://localhost:{port}",
            f"//localhost:{port}",
        ):
            self.assertRefused(origin)

    def test_null_and_file_origins_get_403(self) -> None:
        # Sandboxed iframes, file: pages and some redirects send "Origin: null" (Chrome
        # sends file://): a cross-site page can always arrange that, so it is as
        # disallowed as evil.example and gets the same answer (spec §6).
        for origin in ("null", "file://", "file:///home/victim/attack.html"):
            self.assertRefused(origin)

    def test_malformed_origins_are_refused(self) -> None:
        # Not URLs at all: a 400 ("Origin header invalid") is as good as a 403.
        port = self.world.port
        for origin in ("", f"https://localhost:{port}.evil.example", "https://:443"):
            result = raw_handshake(self.world, "/ws/", {"Origin": origin})
            self.assertIn(result.status, (400, 403), f"{origin!r}: {result}")
            self.assertEqual(result.after_headers, b"")

    def test_foreign_origin_on_the_device_path_is_refused_too(self) -> None:
        device = self.world.ids["lamp"]
        result = raw_handshake(
            self.world, f"/ws/devices/{device}/", {"Origin": "https://evil.example"}
        )
        self.assertEqual(result.status, 403)
        self.assertEqual(result.after_headers, b"")


class DevicePathTests(SecurityTestCase):
    make_world = staticmethod(world)

    def test_malformed_device_ids_get_404_at_the_handshake(self) -> None:
        for path in (
            "/ws/devices/" + "a" * 65 + "/",
            "/ws/devices/bad%20id/",
            "/ws/devices/bad!id/",
            "/ws/devices/%2e%2e/",
            "/ws/devices/../",
            "/ws/devices/a/b/",
            "/ws/devices/a.b/",
            "/ws/devices/%00/",
            "/ws/devices//",
            "/ws/devices/",
            "/ws/nope/",
        ):
            result = raw_handshake(self.world, path, {"Origin": self.world.origin})
            self.assertEqual(result.status, 404, f"{path}: {result}")
            self.assertNotIn("sec-websocket-accept", result.headers)
            self.assertNotIn(b'"op"', result.after_headers)

    def test_well_formed_unknown_id_is_accepted_at_the_handshake(self) -> None:
        # Whether it exists is only decided after READY (4003, see test_permissions):
        # the handshake must not tell a guessed id from a real one.
        for device in (self.world.ids["lamp"], "A" * 22, "x" * 64):
            result = raw_handshake(
                self.world, f"/ws/devices/{device}/", {"Origin": self.world.origin}
            )
            self.assertEqual(result.status, 101, device)
