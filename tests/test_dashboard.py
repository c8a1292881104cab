"""The site's pages (dashboard, wall, flows, audit, login) and the editor proxy.

Django views run through django.test.Client on the suite's temp database;
the Node-RED editor proxy (bridge.editor) runs in-process against a small
stand-in for Node-RED's HTTP and WebSocket endpoints.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from typing import Any, cast

from django.contrib.auth.models import Permission
from django.test import Client, override_settings
from django.utils import timezone
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from bridge.devices.models import AuditEntry, Device
from bridge.editor import Access, Decision, EditorResource, check_access, strip_cookies
from tests.support import make_user, reset_database

PASSWORD = "correct-horse-battery-42"


def client() -> Client:
    return Client(HTTP_HOST="localhost")


def logged_in(username: str, **flags: Any) -> tuple[Client, Any]:
    user = make_user(username, PASSWORD, **flags)
    c = client()
    c.force_login(user)
    return c, user


def grant_nodered(user: Any) -> None:
    user.user_permissions.add(Permission.objects.get(codename="use_nodered"))


class PageTestCase(unittest.TestCase):
    def setUp(self) -> None:
        reset_database()

    def assertContains(self, response: Any, text: str) -> None:
        body = response.content.decode()
        self.assertIn(text, body)


class DashboardViewTests(PageTestCase):
    def config_of(self, body: str) -> dict[str, Any]:
        start = body.index('<script id="dashboard-config" type="application/json">')
        start = body.index(">", start) + 1
        return dict(json.loads(body[start : body.index("</script>", start)]))

    def test_dashboard_needs_login_when_anonymous_access_is_off(self) -> None:
        with override_settings(BRIDGE_ANONYMOUS=False):
            response = client().get("/")
            self.assertEqual(response.status_code, 302)
            self.assertEqual(response["Location"], "/accounts/login/?next=/")
            self.assertEqual(client().get("/wall/").status_code, 302)

    def test_dashboard_for_a_user_connects_with_the_session(self) -> None:
        c, _ = logged_in("alice")
        response = c.get("/")
        self.assertEqual(response.status_code, 200)
        body = response.content.decode()
        config = self.config_of(body)
        self.assertEqual(config["mode"], "session")
        self.assertFalse(config["readOnly"])
        self.assertEqual(config["username"], "alice")
        self.assertIn('src="/static/django_site/dashboard.js"', body)
        self.assertIn('type="module"', body)
        self.assertIn('aria-live="polite"', body)
        self.assertIn('name="viewport"', body)
        # No Flows, Audit or Admin tabs for a plain user.
        self.assertNotIn('href="/flows/"', body)
        self.assertNotIn('href="/audit/"', body)
        self.assertIn("no-cache", response["Cache-Control"])

    def test_anonymous_dashboard_and_wall_when_enabled(self) -> None:
        with override_settings(BRIDGE_ANONYMOUS=True):
            for path, read_only in (("/", False), ("/wall/", True)):
                response = client().get(path)
                self.assertEqual(response.status_code, 200, path)
                config = self.config_of(response.content.decode())
                self.assertEqual(config["mode"], "anonymous")
                self.assertEqual(config["readOnly"], read_only)
            login = client().get("/accounts/login/").content.decode()
            self.assertIn('href="/wall/"', login)
        with override_settings(BRIDGE_ANONYMOUS=False):
            self.assertNotIn('href="/wall/"', client().get("/accounts/login/").content.decode())

    def test_wall_for_a_logged_in_user_is_read_only(self) -> None:
        c, _ = logged_in("alice")
        config = self.config_of(c.get("/wall/").content.decode())
        self.assertEqual((config["mode"], config["readOnly"]), ("session", True))

    def test_login_and_logout(self) -> None:
        make_user("alice", PASSWORD)
        c = client()
        page = c.get("/accounts/login/")
        self.assertContains(page, '<label for="id_username">')
        bad = c.post("/accounts/login/", {"username": "alice", "password": "nope"})
        self.assertContains(bad, 'role="alert"')
        good = c.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
        self.assertEqual(good.status_code, 302)
        self.assertEqual(c.get("/").status_code, 200)
        out = c.post("/accounts/logout/")
        self.assertEqual(out.status_code, 302)
        self.assertEqual(c.get("/").status_code, 302)


class FlowsViewTests(PageTestCase):
    def test_flows_tab_and_page_only_with_the_permission(self) -> None:
        with override_settings(BRIDGE_NODERED_EDITOR="/nodered/"):
            plain, _ = logged_in("plain")
            self.assertNotIn('href="/flows/"', plain.get("/").content.decode())
            self.assertEqual(plain.get("/flows/").status_code, 403)

            editor, user = logged_in("editor")
            grant_nodered(user)
            self.assertIn('href="/flows/"', editor.get("/").content.decode())
            page = editor.get("/flows/")
            self.assertEqual(page.status_code, 200)
            self.assertContains(
                page, '<iframe class="flows-frame" id="flows-frame" src="/nodered/"'
            )
            self.assertContains(page, 'title="Node-RED flow editor"')
            self.assertContains(page, 'aria-current="page">Flows')

            self.assertEqual(client().get("/flows/").status_code, 302)

    def test_no_flows_tab_when_the_editor_is_not_served(self) -> None:
        with override_settings(BRIDGE_NODERED_EDITOR=None):
            c, user = logged_in("editor")
            grant_nodered(user)
            self.assertNotIn('href="/flows/"', c.get("/").content.decode())
            self.assertEqual(c.get("/flows/").status_code, 404)


class AuditViewTests(PageTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.toggle = Device.objects.create(name="Press 1", kind="toggle")
        now = timezone.now()
        rows = [
            ("alice", self.toggle.id, "command", "confirmed", {"on": True}, now),
            ("bob", self.toggle.id, "command", "denied", {"on": False}, now),
            ("alice", "guessed-id", "subscribe", "denied", None, now - datetime.timedelta(days=3)),
            ("carol", self.toggle.id, "command", "timeout", "=HYPERLINK(1)", now),
        ]
        for username, device, action, result, payload, when in rows:
            e = AuditEntry.objects.create(
                username=username,
                device_id=device,
                action=action,
                result=result,
                payload=payload,
                detail="-x" if username == "carol" else "",
                remote_addr="127.0.0.1",
            )
            AuditEntry.objects.filter(pk=e.pk).update(time=when)

    def test_staff_only(self) -> None:
        self.assertEqual(client().get("/audit/").status_code, 302)
        plain, _ = logged_in("plain")
        self.assertEqual(plain.get("/audit/").status_code, 403)
        staff, _ = logged_in("staff", is_staff=True)
        page = staff.get("/audit/")
        self.assertEqual(page.status_code, 200)
        self.assertContains(page, "4 entries")
        self.assertContains(page, "Press 1")
        self.assertIn('href="/audit/"', staff.get("/").content.decode())

    def test_filters(self) -> None:
        staff, _ = logged_in("staff", is_staff=True)
        self.assertContains(staff.get("/audit/", {"user": "alice"}), "2 entries")
        self.assertContains(staff.get("/audit/", {"device": "guessed-id"}), "1 entry")
        today = timezone.localdate().isoformat()
        self.assertContains(staff.get("/audit/", {"from": today}), "3 entries")
        self.assertContains(staff.get("/audit/", {"to": today, "user": "alice"}), "2 entries")
        old = (timezone.localdate() - datetime.timedelta(days=3)).isoformat()
        self.assertContains(staff.get("/audit/", {"from": old, "to": old}), "1 entry")
        # A malformed date is ignored rather than an error.
        self.assertContains(staff.get("/audit/", {"from": "yesterday"}), "4 entries")

    def test_csv_export_follows_the_filters_and_defuses_formulas(self) -> None:
        staff, _ = logged_in("staff", is_staff=True)
        response = staff.get("/audit/", {"format": "csv", "device": self.toggle.id})
        self.assertEqual(response.status_code, 200)
        self.assertTrue(response["Content-Type"].startswith("text/csv"))
        self.assertIn("attachment;", response["Content-Disposition"])
        text = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
        rows = list(csv.DictReader(io.StringIO(text)))
        self.assertEqual(len(rows), 3)
        self.assertEqual(
            list(rows[0]),
            [
                "time",
                "username",
                "device_id",
                "action",
                "result",
                "command_id",
                "payload",
                "detail",
                "remote_addr",
            ],
        )
        by_user = {r["username"]: r for r in rows}
        self.assertEqual(json.loads(by_user["alice"]["payload"]), {"on": True})
        self.assertEqual(by_user["carol"]["payload"], '"=HYPERLINK(1)"')
        self.assertEqual(by_user["carol"]["detail"], "'-x")
        plain, _ = logged_in("plain")
        self.assertEqual(plain.get("/audit/", {"format": "csv"}).status_code, 403)


class CheckAccessTests(unittest.TestCase):
    """bridge.editor.check_access against real Django sessions."""

    def setUp(self) -> None:
        reset_database()

    def session_of(self, c: Client) -> str:
        return str(c.cookies["sessionid"].value)

    def test_decisions(self) -> None:
        self.assertEqual(check_access(None).access, Access.ANONYMOUS)
        self.assertEqual(check_access("no-such-session").access, Access.ANONYMOUS)
        self.assertEqual(check_access(None).login_url, "/accounts/login/")
        plain, _ = logged_in("plain")
        decision = check_access(self.session_of(plain))
        self.assertEqual((decision.access, decision.username), (Access.FORBIDDEN, "plain"))
        editor, user = logged_in("editor")
        grant_nodered(user)
        decision = check_access(self.session_of(editor))
        self.assertEqual((decision.access, decision.username), (Access.ALLOWED, "editor"))
        root, _ = logged_in("root", is_superuser=True)
        self.assertEqual(check_access(self.session_of(root)).access, Access.ALLOWED)
        user.is_active = False
        user.save()
        self.assertEqual(check_access(self.session_of(editor)).access, Access.ANONYMOUS)

    def test_strip_cookies(self) -> None:
        names = frozenset({b"sessionid", b"csrftoken"})
        self.assertEqual(
            strip_cookies(b"sessionid=abc; theme=dark; csrftoken=x;other=1", names),
            b"theme=dark; other=1",
        )
        self.assertEqual(strip_cookies(b"sessionid=abc", names), b"")


# ---------------------------------------------------------------- proxy


class _SyncPool:
    """Stands in for PoolService: runs the 'ORM' call at once."""

    def orm(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(fn, *args)


class _Upstream(resource.Resource):
    """Node-RED's HTTP side: echoes what it got, redirects, streams."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        path = request.path
        if path == b"/nodered/redirect":
            request.setResponseCode(302)
            host = request.getHeader(b"host") or b""
            request.setHeader(b"location", b"http://" + host + b"/nodered/elsewhere")
            return b""
        if path == b"/nodered/big":
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * 1_000_000
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"set-cookie", b"nr=1; Path=/nodered/")
        headers = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        return json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": headers,
                "body": request.content.read().decode() if request.content else "",
            }
        ).encode()


class _EchoWS(protocol.Protocol):
    """After a handshake-looking request, echo every byte back (a raw stand-in)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.open = False

    def dataReceived(self, data: bytes) -> None:
        if self.open:
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            self.factory.heads.append(head)  # type: ignore[attr-defined]
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            self.open = True
            if rest:
                self.transport.write(rest.upper())


class _RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("timed out")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class EditorProxyTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.decision = Decision(Access.ALLOWED, "editor")
        upstream_site = server.Site(_Upstream())
        self.upstream_port = reactor.listenTCP(0, upstream_site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.upstream_port.stopListening)
        up = self.upstream_port.getHost().port
        self.editor = EditorResource(
            reactor,
            cast(Any, _SyncPool()),
            f"http://127.0.0.1:{up}/nodered/",
            recheck_interval=0.2,
            access=lambda key: self.decision,
        )
        self.addCleanup(self.editor.pool.closeCachedConnections)
        root = resource.Resource()
        root.putChild(b"nodered", self.editor)
        self.front = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.front.stopListening)
        self.base = f"http://127.0.0.1:{self.front.getHost().port}"
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)

    async def get(
        self,
        path: str,
        method: bytes = b"GET",
        headers: dict[bytes, list[bytes]] | None = None,
        body: bytes | None = None,
    ) -> tuple[Any, bytes]:
        from twisted.web.client import FileBodyProducer

        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        response = await self.agent.request(
            method, (self.base + path).encode(), Headers(headers or {}), producer
        )
        content = await readBody(response)
        return response, content

    async def test_anonymous_is_sent_to_login_and_forbidden_gets_403(self) -> None:
        self.decision = Decision(Access.ANONYMOUS)
        response, _ = await self.get("/nodered/red/main.js?v=1")
        self.assertEqual(response.code, 302)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"),
            [b"/accounts/login/?next=/nodered/red/main.js%3Fv%3D1"],
        )
        self.decision = Decision(Access.FORBIDDEN, "plain")
        response, body = await self.get("/nodered/")
        self.assertEqual(response.code, 403)
        self.assertIn(b"permission", body)
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"SAMEORIGIN"])

    async def test_proxied_request_and_response(self) -> None:
        response, body = await self.get(
            "/nodered/settings?x=%2F1",
            headers={
                b"cookie": [b"sessionid=secret; csrftoken=tok; theme=dark"],
                b"x-forwarded-for": [b"6.6.6.6"],
                b"x-bridge-user": [b"mallory"],
                b"accept": [b"application/json"],
            },
        )
        self.assertEqual(response.code, 200)
        echoed = json.loads(body)
        self.assertEqual(echoed["uri"], "/nodered/settings?x=%2F1")
        headers = echoed["headers"]
        self.assertEqual(headers["cookie"], ["theme=dark"])
        self.assertEqual(headers["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(headers["x-bridge-user"], ["editor"])
        self.assertEqual(headers["x-forwarded-prefix"], ["/nodered"])
        self.assertEqual(headers["accept"], ["application/json"])
        # The bridge's framing rule wins over Node-RED's.
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"SAMEORIGIN"])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"nr=1; Path=/nodered/"])

    async def test_post_needs_same_origin_and_keeps_its_body(self) -> None:
        payload = json.dumps({"flows": [1, 2, 3]}).encode()
        response, _ = await self.get(
            "/nodered/flows",
            b"POST",
            {b"content-type": [b"application/json"], b"origin": [b"http://evil.example"]},
            payload,
        )
        self.assertEqual(response.code, 403)
        response, _ = await self.get("/nodered/flows", b"POST", {}, payload)
        self.assertEqual(response.code, 403)  # neither Origin nor Referer
        host = self.base.split("//")[1].encode()
        response, body = await self.get(
            "/nodered/flows",
            b"POST",
            {
                b"content-type": [b"application/json"],
                b"origin": [self.base.encode()],
                b"host": [host],
            },
            payload,
        )
        self.assertEqual(response.code, 200)
        echoed = json.loads(body)
        self.assertEqual(echoed["method"], "POST")
        self.assertEqual(echoed["body"], payload.decode())
        self.assertEqual(echoed["headers"]["content-length"], [str(len(payload))])

    async def test_slash_redirect_location_rewrite_and_streaming(self) -> None:
        response, _ = await self.get("/nodered?a=b")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/nodered/?a=b"])
        response, _ = await self.get("/nodered/redirect")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/nodered/elsewhere"])
        response, body = await self.get("/nodered/big")
        self.assertEqual(len(body), 1_000_000)

    async def test_upstream_down_is_502(self) -> None:
        await self.upstream_port.stopListening()
        await self.editor.pool.closeCachedConnections()
        response, body = await self.get("/nodered/")
        self.assertEqual(response.code, 502)
        self.assertIn(b"not reachable", body)

    async def _raw(self, request: bytes) -> _RawClient:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        raw = _RawClient()
        self.addCleanup(self._close, raw)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.front.getHost().port)
        await connectProtocol(endpoint, raw)
        raw.transport.write(request)  # type: ignore[union-attr]
        return raw

    async def _close(self, raw: _RawClient) -> None:
        if not raw.lost.called:
            raw.transport.loseConnection()  # type: ignore[union-attr]
            await raw.lost

    def _handshake(self, origin: str) -> bytes:
        host = self.base.split("//")[1]
        return (
            f"GET /nodered/comms HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nOrigin: {origin}\r\nCookie: sessionid=s; a=b\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    async def test_websocket_is_spliced_after_the_check_and_closed_on_revocation(self) -> None:
        factory = protocol.Factory.forProtocol(_EchoWS)
        factory.heads = []  # type: ignore[attr-defined]
        port = self.upstream_port.getHost().port
        await self.upstream_port.stopListening()
        self.upstream_port = reactor.listenTCP(  # type: ignore[attr-defined]
            port, factory, interface="127.0.0.1"
        )
        self.addCleanup(self.upstream_port.stopListening)

        foreign = await self._raw(self._handshake("http://evil.example"))
        await _until(lambda: foreign.received)
        self.assertTrue(foreign.received.startswith(b"HTTP/1.1 403"))

        self.decision = Decision(Access.ANONYMOUS)
        anonymous = await self._raw(self._handshake(self.base))
        await _until(lambda: anonymous.received)
        self.assertTrue(anonymous.received.startswith(b"HTTP/1.1 401"))

        self.decision = Decision(Access.ALLOWED, "editor")
        raw = await self._raw(self._handshake(self.base))
        await _until(lambda: b"\r\n\r\n" in raw.received)
        self.assertTrue(raw.received.startswith(b"HTTP/1.1 101"))
        head = factory.heads[-1]  # type: ignore[attr-defined]
        self.assertTrue(head.startswith(b"GET /nodered/comms HTTP/1.1\r\n"))
        sent = dict(
            (name.strip().lower(), value.strip())
            for name, value in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        )
        self.assertEqual(sent[b"upgrade"], b"websocket")
        self.assertEqual(sent[b"sec-websocket-key"], b"dGhlIHNhbXBsZSBub25jZQ==")
        self.assertEqual(sent[b"cookie"], b"a=b")
        self.assertEqual(sent[b"x-bridge-user"], b"editor")
        self.assertNotIn(b"sessionid", head)
        raw.received = b""
        raw.transport.write(b"hello frames")  # type: ignore[union-attr]
        await _until(lambda: raw.received == b"HELLO FRAMES")

        # Access withdrawn: the splice closes within the recheck interval.
        self.decision = Decision(Access.FORBIDDEN, "editor")
        await raw.lost
