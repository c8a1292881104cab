"""The dashboard in a real browser: Debian's chromium driven by Playwright.

Everything runs against a real ``twistd bridge --tls`` (tests.server) over
wss with its self-signed certificate.  Playwright's sync API runs in a worker
thread (``deferToThread``), one browser per test, so Trial's reactor stays
free to run the bridge-admin calls and the Node-RED process.

Needs the ``playwright`` package and a chromium binary (``/usr/bin/chromium``
or ``BRIDGE_CHROMIUM``; never ``playwright install``).  The Node-RED editor
test also needs node-red (``.ci/install-nodered``) and a twistd bridge with
``--nodered-admin``.  Missing pieces skip, and fail under CI=true.

Set ``BRIDGE_SCREENSHOTS=docs/screenshots`` to refresh the documentation's
screenshots; otherwise they go to the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.server import BridgeProcess, admin_sync, kill_on_exit
from tests.support import REPO, require

T = TypeVar("T")

CHROMIUM = os.environ.get("BRIDGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct-horse-battery-42"
WAIT_MS = 10_000
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _playwright_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set BRIDGE_CHROMIUM)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PROVISION = """
import json
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from bridge.devices.models import Device, Grant
User = get_user_model()
users = {}
for name, staff in (("op", False), ("viewer", False), ("editor", False), ("plain", False),
                    ("boss", True)):
    user = User(username=name, is_staff=staff)
    user.set_password(PASSWORD)
    user.save()
    users[name] = user
users["editor"].user_permissions.add(Permission.objects.get(codename="use_nodered"))
devices = {
    "toggle": Device.objects.create(name="Press 1 power", kind="toggle", history_size=10),
    "dimmer": Device.objects.create(name="Hall lights", kind="dimmer", history_size=10),
    "sensor": Device.objects.create(name="Oven temperature", kind="sensor", history_size=40),
    "line": Device.objects.create(name="Line 2 state", kind="counter", history_size=5),
    "lobby": Device.objects.create(
        name="Lobby temperature", kind="sensor", history_size=30, public=True
    ),
}
for device, level in (("toggle", "change"), ("dimmer", "change"), ("sensor", "read"),
                      ("line", "change")):
    Grant.objects.create(device=devices[device], user=users["op"], permission=level)
for device in ("toggle", "dimmer", "sensor"):
    Grant.objects.create(device=devices[device], user=users["viewer"], permission="read")
print(json.dumps({k: d.id for k, d in devices.items()}))
"""


class World:
    """One provisioned bridge (anonymous access on) shared by this module's tests.

    It listens on a fixed port, so that a page stays on the same origin when
    the bridge is restarted under it (``--port 0`` would pick a new one).
    """

    def __init__(self) -> None:
        self.nodered_port = _free_port()
        args = ["--anonymous", "--nodered-admin", f"http://127.0.0.1:{self.nodered_port}/nodered/"]
        args += ["--port", str(_free_port())]
        self.server = BridgeProcess(args=args)
        kill_on_exit(self.server)
        data = self.server.data_dir
        out, err, code = admin_sync(data, "migrate", "-v", "0")
        assert code == 0, err
        script = PROVISION.replace("PASSWORD", repr(PASSWORD))
        out, err, code = admin_sync(data, "shell", "-v", "0", "-c", script)
        assert code == 0, err
        self.ids: dict[str, str] = json.loads(out.strip().splitlines()[-1])
        self.static_checked = False


_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
    return _world


def run_in_browser(fn: Callable[[Any], T]) -> defer.Deferred[T]:
    """Run ``fn(browser)`` on a worker thread with a fresh chromium."""

    def work() -> T:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                return fn(browser)
            finally:
                browser.close()

    return threads.deferToThread(work)


class BrowserTestCase(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        missing = _playwright_missing()
        require(missing is None, missing or "")
        self.world = world()
        if self.world.server.proc is None:
            yield self.world.server.start()
        self.url = self.world.server.url
        self.ids = self.world.ids
        if not self.world.static_checked:
            yield threads.deferToThread(self._check_client_library)
            self.world.static_checked = True

    def _check_client_library(self) -> None:
        """The dashboard imports bridge.js from the bridge itself: it must be served."""
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = self.url + "static/bridge/bridge.js"
        try:
            with urllib.request.urlopen(url, context=context, timeout=10) as response:
                ok = response.status == 200 and b"BridgeClient" in response.read()
        except OSError as e:
            ok, error = False, str(e)
        else:
            error = ""
        self.assertTrue(ok, f"{url} is not served ({error}): the dashboard cannot load")

    # Helpers below run on the browser thread.

    def context(self, browser: Any, viewport: dict[str, int] | None = None) -> Any:
        ctx = browser.new_context(ignore_https_errors=True, viewport=viewport or DESKTOP)
        ctx.set_default_timeout(WAIT_MS)
        return ctx

    def login(self, ctx: Any, username: str, path: str = "") -> Any:
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.js_errors = errors
        page.goto(self.url + "accounts/login/?next=/" + path)
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(self.url + path)
        if path == "":
            self.wait_live(page)
        return page

    def wait_live(self, page: Any) -> None:
        from playwright.sync_api import expect

        expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        expect(page.locator("#tiles")).to_have_attribute("aria-busy", "false")

    def tile(self, page: Any, device: str) -> Any:
        return page.locator(f'article.tile[data-device="{self.ids[device]}"]')

    def no_js_errors(self, page: Any) -> None:
        self.assertEqual(page.js_errors, [])


class OperatorAndViewerTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_operator_flips_toggle_viewer_sees_it_live_without_controls(self) -> Any:
        def scenario(browser: Any) -> None:
            from playwright.sync_api import expect

            op = self.login(self.context(browser), "op")
            viewer = self.login(self.context(browser), "viewer")

            # The viewer reads four devices (one public) and has no control at all.
            expect(viewer.locator("article.tile")).to_have_count(4)
            expect(viewer.locator("[role=switch], input[type=range], textarea")).to_have_count(0)
            expect(
                self.tile(viewer, "toggle").locator(".badge", has_text="read only")
            ).to_be_visible()
            expect(self.tile(viewer, "line")).to_have_count(0)

            # The operator has a labelled switch and a slider.
            toggle = self.tile(op, "toggle")
            switch = op.get_by_role("switch", name="Press 1 power")
            expect(switch).to_be_visible()
            expect(switch).to_be_enabled()
            before = switch.get_attribute("aria-checked") == "true"
            want, word = (not before), ("On" if not before else "Off")

            switch.click()
            progress = toggle.locator(".progress")
            expect(progress).to_have_attribute("data-result", "confirmed")
            expect(progress).to_contain_text("confirmed")
            expect(switch).to_have_attribute("aria-checked", str(want).lower())
            expect(switch).to_contain_text(word)
            expect(toggle.locator(".tile-meta .by")).to_have_text("op")
            expect(toggle.locator(".tile-meta time")).to_have_attribute(
                "datetime", re.compile(r"^\d{4}-")
            )

            # The viewer's tile follows, live, with who changed it.
            seen = self.tile(viewer, "toggle")
            expect(seen.locator(".state-value")).to_have_text(word)
            expect(seen.locator(".tile-meta .by")).to_have_text("op")

            # Keyboard: Space flips the focused switch back; End sets the dimmer to 100.
            switch.focus()
            op.keyboard.press("Space")
            expect(switch).to_have_attribute("aria-checked", str(not want).lower())
            expect(progress).to_have_attribute("data-result", "confirmed")
            expect(seen.locator(".state-value")).to_have_text("On" if before else "Off")

            slider = op.get_by_role("slider", name="Hall lights")
            slider.focus()
            op.keyboard.press("End")
            dimmer = self.tile(op, "dimmer")
            expect(dimmer.locator(".progress")).to_have_attribute("data-result", "confirmed")
            expect(dimmer.locator("output")).to_have_text("100 %")
            expect(self.tile(viewer, "dimmer").locator("meter")).to_have_attribute("value", "100")

            # A sensor draws its readings; the generic kind shows JSON and a command form.
            sensor = self.tile(op, "sensor")
            expect(sensor.locator(".reading .value")).not_to_have_text("–")
            expect(sensor.locator("svg.spark")).to_have_attribute(
                "aria-label", re.compile(r"^Chart of the")
            )
            line = self.tile(op, "line")
            line.get_by_text("Send a command").click()
            line.get_by_label("Command (JSON)").fill('{"count": 7}')
            line.get_by_role("button", name="Send").click()
            expect(line.locator(".progress")).to_have_attribute("data-result", "confirmed")
            expect(line.locator("pre.json")).to_contain_text('"count": 7')

            self.no_js_errors(op)
            self.no_js_errors(viewer)

        yield run_in_browser(scenario)

    @defer.inlineCallbacks
    def test_revoked_grant_removes_the_tile_live_and_a_new_grant_adds_it(self) -> Any:
        data_dir = self.world.server.data_dir
        toggle = self.ids["toggle"]

        def scenario(browser: Any) -> None:
            from playwright.sync_api import expect

            viewer = self.login(self.context(browser), "viewer")
            expect(self.tile(viewer, "toggle")).to_have_count(1)
            viewer.evaluate("window.__sameDocument = true")
            try:
                out, err, code = admin_sync(data_dir, "revoke", "--user", "viewer", toggle)
                self.assertEqual(code, 0, err)
                expect(self.tile(viewer, "toggle")).to_have_count(0, timeout=5000)
                expect(viewer.locator("article.tile")).to_have_count(3)
                expect(viewer.locator("#announcer")).to_contain_text("no longer available")
            finally:
                out, err, code = admin_sync(data_dir, "grant", "--user", "viewer", toggle, "read")
                self.assertEqual(code, 0, err)
            expect(self.tile(viewer, "toggle")).to_have_count(1, timeout=5000)
            expect(self.tile(viewer, "toggle")).to_have_attribute("data-permission", "read")
            # A permission raised at runtime brings the control; lowered, takes it away.
            switch = viewer.get_by_role("switch", name="Press 1 power")
            try:
                out, err, code = admin_sync(data_dir, "grant", "--user", "viewer", toggle, "change")
                self.assertEqual(code, 0, err)
                expect(switch).to_be_visible(timeout=5000)
            finally:
                out, err, code = admin_sync(data_dir, "grant", "--user", "viewer", toggle, "read")
                self.assertEqual(code, 0, err)
            expect(switch).to_have_count(0, timeout=5000)
            expect(self.tile(viewer, "toggle").locator(".state-value")).to_be_visible()
            # No reload happened: the page's own state survived.
            self.assertTrue(viewer.evaluate("window.__sameDocument === true"))
            self.no_js_errors(viewer)

        yield run_in_browser(scenario)


class WallAndScreenshotTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_anonymous_wall_shows_public_devices_read_only(self) -> Any:
        def scenario(browser: Any) -> None:
            from playwright.sync_api import expect

            page = self.context(browser).new_page()
            page.goto(self.url + "wall/")
            self.wait_live(page)
            expect(page.locator("article.tile")).to_have_count(1)
            lobby = self.tile(page, "lobby")
            expect(lobby.locator(".tile-title")).to_have_text("Lobby temperature")
            expect(lobby.locator(".reading .value")).not_to_have_text("–")
            expect(page.locator("button, input, textarea")).to_have_count(0)

        yield run_in_browser(scenario)

    @defer.inlineCallbacks
    def test_screenshots_at_desktop_and_phone_width(self) -> Any:
        target = Path(os.environ.get("BRIDGE_SCREENSHOTS") or self.mktemp())
        if not target.is_absolute():
            target = REPO / target
        target.mkdir(parents=True, exist_ok=True)

        def scenario(browser: Any) -> None:
            from playwright.sync_api import expect

            for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
                ctx = self.context(browser, viewport)
                page = self.login(ctx, "op")
                expect(page.locator("article.tile")).to_have_count(5)
                switch = page.get_by_role("switch", name="Press 1 power")
                switch.click()
                expect(self.tile(page, "toggle").locator(".progress")).to_have_attribute(
                    "data-result", "confirmed"
                )
                dimmer = self.tile(page, "dimmer")
                dimmer.get_by_role("slider").fill("65" if name == "desktop" else "40")
                expect(dimmer.locator("output")).to_have_text(re.compile(r"^(65|40) %$"))
                line = self.tile(page, "line")
                line.get_by_text("Send a command").click()
                line.get_by_label("Command (JSON)").fill('{"count": 1284, "state": "running"}')
                line.get_by_role("button", name="Send").click()
                expect(line.locator(".progress")).to_have_attribute("data-result", "confirmed")
                line.get_by_text("Send a command").click()  # fold the form again
                # A few readings make a chart (the simulator reports every second).
                page.wait_for_function(
                    """(id) => {
                        const line = document.querySelector(
                            `article[data-device="${id}"] svg.spark polyline`);
                        return line && line.getAttribute("points").split(" ").length >= 8;
                    }""",
                    arg=self.ids["sensor"],
                    timeout=15_000,
                )
                page.wait_for_timeout(400)  # let the switch's transition finish
                overflow = page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                self.assertLessEqual(overflow, 0, f"horizontal scroll at {name} width")
                page.screenshot(path=str(target / f"dashboard-{name}.png"), full_page=True)
                ctx.close()

        yield run_in_browser(scenario)
        for name in ("desktop", "phone"):
            self.assertGreater((target / f"dashboard-{name}.png").stat().st_size, 10_000)


FAKE_WEBSOCKET = """
window.__sockets = [];
window.WebSocket = class FakeWebSocket {
    constructor(url) {
        this.url = url; this.readyState = 1; this.sent = [];
        window.__sockets.push(this);
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() { this.readyState = 3; }
    serve(frame) { if (this.onmessage) this.onmessage({data: JSON.stringify(frame)}); }
    drop(code) { this.readyState = 3; if (this.onclose) this.onclose({code, reason: ""}); }
};
window.__serve = (frame) => window.__sockets[window.__sockets.length - 1].serve(frame);
"""


class DashboardLogicTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_offline_badge_failed_commands_notify_and_revocation_on_a_scripted_server(
        self,
    ) -> Any:
        """The dashboard's reactions to frames a simulator never sends, via a fake socket."""

        def scenario(browser: Any) -> None:
            from playwright.sync_api import expect

            ctx = self.context(browser)
            ctx.add_init_script(FAKE_WEBSOCKET)
            page = ctx.new_page()
            page.js_errors = []
            page.on("pageerror", lambda e: page.js_errors.append(str(e)))
            page.goto(self.url)  # anonymous access is on: the dashboard in anonymous mode
            page.wait_for_function("window.__sockets.length === 1")
            serve = lambda frame: page.evaluate("(f) => window.__serve(f)", frame)  # noqa: E731
            sent = lambda: page.evaluate("window.__sockets[0].sent")  # noqa: E731
            now = int(time.time() * 1000)
            serve({"op": 0, "d": {"heartbeat_interval": 60000, "session_id": "F", "protocol": 1}})
            self.assertEqual(sent()[0], {"op": 3, "d": {}})
            devices = [
                {
                    "id": "t1",
                    "name": "Fake toggle",
                    "kind": "toggle",
                    "permission": "change",
                    "online": False,
                    "history_size": 5,
                },
                {
                    "id": "s1",
                    "name": "Fake sensor",
                    "kind": "sensor",
                    "permission": "read",
                    "online": True,
                    "history_size": 5,
                },
            ]
            serve(
                {
                    "op": 6,
                    "t": "READY",
                    "s": 1,
                    "d": {"user": None, "role": "anonymous", "devices": devices, "session_id": "F"},
                }
            )
            self.assertEqual(sent()[1], {"op": 7, "d": {"devices": ["t1", "s1"], "history": True}})
            tile = page.locator('article[data-device="t1"]')
            switch = tile.get_by_role("switch", name="Fake toggle")
            expect(tile.locator(".badge.offline")).to_be_visible()
            expect(switch).to_be_disabled()
            serve(
                {
                    "op": 6,
                    "t": "SUBSCRIBED",
                    "s": 2,
                    "d": {
                        "device": "t1",
                        "permission": "change",
                        "history": [{"payload": {"on": False}, "ts": now, "by": "alice"}],
                    },
                }
            )
            expect(tile.locator(".tile-meta .by")).to_have_text("alice")
            expect(switch).to_have_attribute("aria-checked", "false")

            serve({"op": 6, "t": "DEVICE_STATE", "s": 3, "d": {"device": "t1", "online": True}})
            expect(tile.locator(".badge.offline")).to_be_hidden()
            expect(switch).to_be_enabled()

            progress = tile.locator(".progress")
            seq = 4
            for result, text in (
                ("timeout", "no answer from the device"),
                ("upstream_unavailable", "unreachable"),
                ("rejected", "refused"),
            ):
                switch.click()
                command = sent()[-1]
                self.assertEqual(command["op"], 4)
                self.assertEqual(command["d"]["payload"], {"on": True})
                d = {"id": command["d"]["id"], "command_id": "x", "device": "t1", "detail": "d"}
                serve({"op": 6, "t": "COMMAND_RESULT", "s": seq, "d": {**d, "result": "sent"}})
                expect(progress).to_have_attribute("data-result", "sent")
                serve({"op": 6, "t": "COMMAND_RESULT", "s": seq + 1, "d": {**d, "result": result}})
                expect(progress).to_have_attribute("data-result", result)
                expect(progress).to_contain_text(text)
                seq += 2
            # The state changes only with a STATUS.
            expect(switch).to_have_attribute("aria-checked", "false")

            serve({"op": 6, "t": "NOTIFY", "s": seq, "d": {"event": "shift", "data": {"n": 2}}})
            expect(page.locator(".toast")).to_contain_text('shift: {"n":2}')
            serve(
                {
                    "op": 6,
                    "t": "DEVICE_CHANGED",
                    "s": seq + 1,
                    "d": {
                        "device": "d9",
                        "name": "Added later",
                        "kind": "dimmer",
                        "history_size": 3,
                        "permission": "read",
                    },
                }
            )
            expect(page.locator('article[data-device="d9"] meter')).to_be_visible()
            self.assertEqual(sent()[-1], {"op": 7, "d": {"devices": ["d9"], "history": True}})
            serve({"op": 6, "t": "DEVICE_REMOVED", "s": seq + 2, "d": {"device": "s1"}})
            expect(page.locator('article[data-device="s1"]')).to_have_count(0)
            announcer = page.locator("#announcer")
            expect(announcer).to_contain_text("Fake sensor is no longer available")
            # A state told again (as after a recovered RESUME) is not announced again.
            state = {"device": "t1", "online": True}
            serve({"op": 6, "t": "DEVICE_STATE", "s": seq + 3, "d": state})
            page.wait_for_timeout(200)
            expect(announcer).to_contain_text("Fake sensor is no longer available")
            serve({"op": 6, "t": "DEVICE_STATE", "s": seq + 4, "d": {**state, "online": False}})
            expect(announcer).to_contain_text("Fake toggle is offline")

            # After a drop, the reconnect countdown gives way for good to "Live".
            connection = page.locator("#connection")
            page.evaluate("window.__sockets[0].drop(1006)")
            expect(connection).to_have_attribute("data-state", "reconnecting")
            page.wait_for_function("() => window.__sockets.length === 2")
            serve({"op": 0, "d": {"heartbeat_interval": 60000, "session_id": "G", "protocol": 1}})
            ready = {"user": None, "role": "anonymous", "devices": devices[:1], "session_id": "G"}
            serve({"op": 6, "t": "READY", "s": 1, "d": ready})
            expect(connection).to_have_attribute("data-state", "ready")
            page.wait_for_timeout(1200)  # past the countdown's next tick
            expect(connection).to_have_attribute("data-state", "ready")

            serve({"op": 6, "t": "ERROR", "s": 2, "d": {"code": 4011, "message": "x"}})
            page.evaluate("window.__sockets[1].drop(4011)")
            expect(page.locator("#banner")).to_contain_text("Your session has ended")
            expect(connection).to_have_attribute("data-state", "closed")
            self.assertEqual(page.evaluate("window.__sockets.length"), 2)
            self.no_js_errors(page)

        yield run_in_browser(scenario)


class BridgeJsTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_token_client_commands_and_resumes_against_the_bridge(self) -> Any:
        def scenario(browser: Any) -> dict[str, Any]:
            page = self.context(browser).new_page()
            # A page of the bridge's origin without a session cookie: token mode.
            page.goto(self.url + "accounts/login/")
            return dict(
                page.evaluate(
                    """async ({password, toggle, sensor}) => {
                const m = await import("/static/bridge/bridge.js");
                const client = new m.BridgeClient({
                    token: () => m.fetchToken({username: "op", password}),
                    initialDelay: 50,
                });
                const seqs = [];
                const track = (d, frame) => seqs.push(frame.s);
                client.on("status", track);
                client.on("event", track);
                const events = [];
                client.on("resumed", () => events.push("resumed"));
                client.on("ready", () => events.push("ready"));
                const ready = client.once("ready");
                client.connect();
                const info = await ready;
                client.subscribe([toggle, sensor]);
                await client.once("subscribed");
                const progress = [];
                const result = await client.command(toggle, {on: true}, {
                    onProgress: (d) => progress.push(d.result),
                });
                const firstSession = client.sessionId;
                await client.once("status");
                const resumed = client.once("resumed");
                client.reconnect();
                await resumed;
                await client.once("status");
                const again = await client.command(toggle, {on: false});
                client.close();
                let refused = null;
                try { await client.command(toggle, {on: true}); }
                catch (e) { refused = [e.name, e.result]; }
                return {role: info.role, result: result.result, progress, events,
                        sameSession: firstSession === client.sessionId || client.sessionId === null,
                        firstSession, seqs, again: again.result, refused,
                        state: client.state};
            }""",
                    {
                        "password": PASSWORD,
                        "toggle": self.ids["toggle"],
                        "sensor": self.ids["sensor"],
                    },
                )
            )

        out = yield run_in_browser(scenario)
        self.assertEqual(out["role"], "operator")
        self.assertEqual(out["result"], "confirmed")
        self.assertEqual(out["progress"], ["sent", "confirmed"])
        self.assertEqual(out["events"], ["ready", "resumed"])
        self.assertEqual(out["again"], "confirmed")
        self.assertEqual(out["refused"], ["CommandError", "not_connected"])
        self.assertEqual(out["state"], "closed")
        seqs = out["seqs"]
        # One numbering across the drop: nothing lost, nothing twice.
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))

    @defer.inlineCallbacks
    def test_client_logic_against_a_scripted_server(self) -> Any:
        """Backoff, heartbeats, RESUME, INVALID_SESSION and command outcomes, with a fake socket."""

        def scenario(browser: Any) -> dict[str, Any]:
            page = self.context(browser).new_page()
            page.goto(self.url + "accounts/login/")
            return dict(page.evaluate(FAKE_SERVER_SCRIPT))

        out = yield run_in_browser(scenario)
        self.assertEqual(out.pop("errors"), [])
        self.assertEqual(
            out["identify"],
            [
                {"op": 3, "d": {"token": "t1"}},
                {"op": 7, "d": {"devices": ["a"], "history": True}},
            ],
        )
        self.assertEqual(
            out["resume"], {"op": 9, "d": {"session_id": "S1", "seq": 10, "token": "t2"}}
        )
        self.assertEqual(out["resumed_state"], "ready")
        self.assertEqual(out["second_resume_seq"], 11)
        self.assertEqual(
            out["after_invalid"],
            [
                {"op": 3, "d": {"token": "t4"}},
                {"op": 7, "d": {"devices": ["a"], "history": True}},
            ],
        )
        self.assertEqual(
            out["results"], ["confirmed", "timeout", "upstream_unavailable", "rejected", "lost"]
        )
        self.assertEqual(out["anonymous_identify"], {"op": 3, "d": {}})
        self.assertEqual(out["heartbeat"], {"op": 1, "d": 1})
        self.assertEqual(out["dead_heartbeat_closed_with"], 4000)
        delays = out["delays"]
        self.assertEqual(len(delays), 6)
        self.assertLessEqual(delays[0], 40)
        for attempt, delay in enumerate(delays[1:], 1):
            ceiling = min(1000, 40 * 2 ** (attempt - 1))
            self.assertTrue(ceiling / 2 - 1 <= delay <= ceiling, (attempt, delays))
        self.assertEqual(out["fatal"], {"state": "closed", "sockets": 1, "reconnect": False})

    @defer.inlineCallbacks
    def test_resume_logic_against_a_scripted_server(self) -> Any:
        """RESUME after every drop, by cookie and by token; recovered replays; the probe."""

        def scenario(browser: Any) -> dict[str, Any]:
            page = self.context(browser).new_page()
            page.goto(self.url + "accounts/login/")
            return dict(page.evaluate(FAKE_RESUME_SCRIPT))

        out = yield run_in_browser(scenario)
        self.assertEqual(out.pop("errors"), [])
        subscribe_a = {"op": 7, "d": {"devices": ["a"], "history": True}}
        subscribe_b = {"op": 7, "d": {"devices": ["b"], "history": True}}
        # Session mode: nothing is sent before the cookie's READY, then RESUME at once,
        # without a token, from the old session's last s (not the new READY's).
        self.assertEqual(out["cookie_first"], [subscribe_a])
        self.assertEqual(out["cookie_before_ready"], {"sent": [], "state": "resuming"})
        self.assertEqual(out["cookie_resume"], [{"op": 9, "d": {"session_id": "S1", "seq": 4}}])
        self.assertEqual(out["held"], 1)
        self.assertEqual(out["cookie_command"], "confirmed")
        self.assertEqual(
            out["cookie_resumed"],
            {
                "events": ["ready", "resumed"],
                "state": "ready",
                "session": "S1",
                "seq": 7,
                "sent": 1,
                "seen": [{"on": True}, {"on": False}],
            },
        )
        self.assertEqual(
            out["resync"],
            [
                {"op": 9, "d": {"session_id": "S1", "seq": 7}},
                subscribe_b,
                {"op": 8, "d": {"devices": ["a"]}},
            ],
        )
        self.assertEqual(
            out["partial"], {"resume": {"op": 9, "d": {"session_id": "S1", "seq": 10}}, "seen": 2}
        )
        self.assertEqual(
            out["cookie_invalid"],
            {
                "command": "lost",
                "events": ["ready", "resumed", "resumed", "invalid_session", "ready"],
                "sent": [subscribe_b],
                "session": "C5",
                "seq": 3,
                "state": "ready",
                "notes": ["shift"],
                "sockets": 5,
            },
        )
        self.assertEqual(
            out["after_invalid_resume"], {"op": 9, "d": {"session_id": "C5", "seq": 3}}
        )
        self.assertEqual(out["old_server_resume"], [{"op": 9, "d": {"session_id": "O1", "seq": 1}}])
        self.assertEqual(
            out["old_server"],
            {"sent": [subscribe_a], "ready": ["O1", "O3"], "state": "ready", "resume": False},
        )
        # Token mode, recovered: three repeats dropped, the rest passed on in order.
        self.assertEqual(
            out["recovered_resume"], {"op": 9, "d": {"session_id": "R1", "seq": 5, "token": "t2"}}
        )
        self.assertEqual(
            out["recovered"],
            {
                "values": [2, 3, 4, 5],
                "repeated": 3,
                "recovered": True,
                "seq": 13,
                "command": "confirmed",
            },
        )
        self.assertEqual(out["exact"], {"values": [6], "repeated": 0, "seq": 15})
        self.assertEqual(out["probe_beats"], [{"op": 1, "d": 15}])
        self.assertEqual(out["probe_closed_with"], 4000)
        self.assertEqual(out["probe_resume"]["op"], 9)
        self.assertEqual(out["probe_resume"]["d"]["seq"], 15)
        self.assertEqual(out["probe_kept"], {"sockets": 0, "beats": 1, "state": "ready"})


class RestartTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_dashboard_resumes_after_the_bridge_restarts_without_a_reload(self) -> Any:
        """Spec §6: closed with 1001, the page RESUMEs its session on the restarted bridge."""
        server = self.world.server
        restarted: dict[str, Any] = {}

        def restart() -> None:
            # On the browser thread: SIGTERM and wait here, start on the reactor.
            server.stop()
            restarted["offset"] = server.log_path.stat().st_size
            restarted["at_ms"] = time.time() * 1000
            threads.blockingCallFromThread(reactor, server.start)

        def scenario(browser: Any) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = self.login(self.context(browser), "op")
            page.evaluate(
                """(sensor) => {
                    const client = window.bridgeDashboard.client;
                    const t = window.__t = {events: [], closes: [], sensor: [],
                                            session: client.sessionId};
                    for (const name of ["ready", "resumed", "invalid_session"]) {
                        client.on(name, (d) => t.events.push([name, d]));
                    }
                    client.on("close", (d) => t.closes.push(d.code));
                    client.on("status", (d) => { if (d.device === sensor) t.sensor.push(d.ts); });
                    window.__sameDocument = true;
                }""",
                self.ids["sensor"],
            )
            # A token client too, in a page without the session cookie.
            other = self.context(browser).new_page()
            other.goto(self.url + "accounts/login/")
            other.evaluate(
                """async ({password, sensor, toggle}) => {
                    const m = await import("/static/bridge/bridge.js");
                    const client = window.__client = new m.BridgeClient({
                        token: () => m.fetchToken({username: "op", password}),
                    });
                    const t = window.__t = {events: [], closes: [], sensor: []};
                    for (const name of ["ready", "resumed", "invalid_session"]) {
                        client.on(name, (d) => t.events.push([name, d]));
                    }
                    client.on("close", (d) => t.closes.push(d.code));
                    client.on("status", (d) => { if (d.device === sensor) t.sensor.push(d.ts); });
                    const ready = client.once("ready");
                    client.connect();
                    await ready;
                    t.events = [];
                    t.session = client.sessionId;
                    client.subscribe([sensor, toggle], {history: false});
                }""",
                {"password": PASSWORD, "sensor": self.ids["sensor"], "toggle": self.ids["toggle"]},
            )
            for p in (page, other):
                p.wait_for_function("() => window.__t.sensor.length >= 1")  # statuses flow
            restart()
            # No reload: the same page goes live again, on the same session.
            page.wait_for_function("() => window.__t.events.length >= 1", timeout=30_000)
            self.wait_live(page)
            sensor = self.tile(page, "sensor")
            page.wait_for_function(
                """([id, after]) => {
                    const time = document.querySelector(
                        `article[data-device="${id}"] .tile-meta time`);
                    return time && Date.parse(time.getAttribute("datetime")) > after;
                }""",
                arg=[self.ids["sensor"], restarted["at_ms"]],
                timeout=15_000,
            )
            expect(sensor.locator(".reading .value")).not_to_have_text("–")
            # A command after the restart is confirmed, and the switch follows its status.
            switch = page.get_by_role("switch", name="Press 1 power")
            want = "false" if switch.get_attribute("aria-checked") == "true" else "true"
            switch.click()
            toggle = self.tile(page, "toggle")
            expect(toggle.locator(".progress")).to_have_attribute("data-result", "confirmed")
            expect(switch).to_have_attribute("aria-checked", want)
            expect(toggle.locator(".tile-meta .by")).to_have_text("op")
            self.assertTrue(page.evaluate("window.__sameDocument === true"))
            self.no_js_errors(page)
            after = restarted["at_ms"]
            other.wait_for_function(
                "(after) => window.__t.sensor.some((ts) => ts > after)", arg=after
            )
            summary = """(after) => ({...window.__t, after: window.__t.sensor.filter(
                (ts) => ts > after).length, now: (window.__client ||
                window.bridgeDashboard.client).sessionId})"""
            return {
                "session mode": page.evaluate(summary, after),
                "token mode": other.evaluate(summary, after),
            }

        out = yield run_in_browser(scenario)
        log = server.log_path.read_text(errors="replace")[restarted["offset"] :]
        kept = re.search(r"restored (\d+) resumable sessions", log)
        self.assertIsNotNone(kept, log[-3000:])
        assert kept is not None
        self.assertGreaterEqual(int(kept.group(1)), 2)
        for mode, seen in out.items():
            session = seen["session"]
            self.assertEqual(seen["closes"][0], 1001, mode)
            # Resumed, not identified again: one RESUMED for the same session, no READY.
            self.assertEqual([name for name, _ in seen["events"]], ["resumed"], (mode, seen))
            resumed = seen["events"][0][1]
            self.assertEqual(resumed["session_id"], session, mode)
            self.assertNotIn("recovered", resumed, mode)  # a clean stop keeps it exactly
            self.assertEqual(seen["now"], session, mode)
            self.assertGreater(seen["after"], 0, mode)
            self.assertIn(f"session {session} resumed from seq", log, mode)


# A WebSocket stand-in scripted step by step, and helpers, for scripts run in the page.
FAKE_SOCKET_PRELUDE = """
    const m = await import("/static/bridge/bridge.js");
    const sockets = [];
    class FakeSocket {
        constructor(url) {
            this.url = url; this.readyState = 1; this.sent = []; this.beats = [];
            this.ack = true; this.closedWith = null;
            sockets.push(this);
        }
        send(data) {
            const frame = JSON.parse(data);
            if (frame.op !== 1) { this.sent.push(frame); return; }
            this.beats.push(frame);
            if (this.ack) setTimeout(() => this.serve({op: 2}), 0);
        }
        close(code) { this.readyState = 3; this.closedWith = code; }
        serve(frame) { if (this.onmessage) this.onmessage({data: JSON.stringify(frame)}); }
        drop(code) { this.readyState = 3; if (this.onclose) this.onclose({code, reason: ""}); }
    }
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const until = async (fn) => {
        for (let i = 0; i < 400; i++) { if (fn()) return; await sleep(5); }
        throw new Error("timed out: " + fn);
    };
    const last = () => sockets[sockets.length - 1];
    const hello = (interval) => ({op: 0, d: {heartbeat_interval: interval, session_id: "x",
                                             protocol: 1}});
    const ready = (sid, s, ids = ["a"]) => ({op: 6, t: "READY", s, d: {
        user: {id: 1, username: "u"}, role: "operator", session_id: sid,
        devices: ids.map((id) => ({id, name: id.toUpperCase(), kind: "toggle",
                                   permission: "change", online: true, history_size: 1}))}});
    const status = (device, s, payload, ts, by = null) => ({op: 5, s,
        d: {device, payload, ts, by, command_id: null}});
    const event = (t, s, d) => ({op: 6, t, s, d});
    const result = (id, s, result) => ({op: 6, t: "COMMAND_RESULT", s,
        d: {id, command_id: "x", device: "a", result, detail: "d"}});
    const outcome = (p) => p.then((d) => d.result, (e) => e.result);
    const tokenClient = (extra = {}) => {
        let n = 0;
        return new m.BridgeClient({url: "wss://example.invalid/ws/", WebSocket: FakeSocket,
            token: async () => "t" + (++n), initialDelay: 40, maxDelay: 1000, ...extra});
    };
"""

FAKE_SERVER_SCRIPT = (
    """async () => {"""
    + FAKE_SOCKET_PRELUDE
    + """
    const out = {errors: []};
    try {
        // IDENTIFY with a token, SUBSCRIBE what was wanted, then command outcomes.
        let client = tokenClient();
        client.subscribe(["a"]);
        client.connect();
        let ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        ws.serve(ready("S1", 1));
        out.identify = ws.sent.slice(0, 2);
        const results = [];
        const outcomes = ["confirmed", "timeout", "upstream_unavailable", "rejected"];
        for (const [i, r] of outcomes.entries()) {
            const progress = [];
            const p = outcome(client.command("a", {on: true}, {id: "c" + i,
                onProgress: (d) => progress.push(d.result)}));
            ws.serve(result("c" + i, 2 + 2 * i, "sent"));
            ws.serve(result("c" + i, 3 + 2 * i, r));
            results.push(await p);
            if (progress.join() !== "sent," + r) out.errors.push("progress " + progress);
        }
        // A drop: RESUME carries the last seq and a fresh token; RESUMED keeps the session.
        ws.serve({op: 5, s: 10, d: {device: "a", payload: {on: true}, ts: 1, by: null,
                                    command_id: null}});
        const pending = outcome(client.command("a", {}, {id: "late"}));
        ws.drop(1006);
        await until(() => sockets.length === 2);
        ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        out.resume = ws.sent[0];
        const resumed = client.once("resumed");
        ws.serve({op: 6, t: "RESUMED", s: 11, d: {session_id: "S1", replayed: 0}});
        await resumed;
        out.resumed_state = client.state;
        // Another drop, and this time the server cannot resume: pending commands are
        // lost, the client identifies and subscribes again.
        ws.drop(1001);
        await until(() => sockets.length === 3);
        ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        out.second_resume_seq = ws.sent[0].d.seq;
        ws.serve({op: 6, t: "INVALID_SESSION", s: 12, d: {}});
        results.push(await pending);
        await until(() => ws.sent.length === 2);
        ws.serve(ready("S2", 1));
        await until(() => ws.sent.length === 3);
        out.after_invalid = ws.sent.slice(1, 3);
        out.results = results;
        client.close();

        // Heartbeats carry the last seq; without an ACK the connection is replaced.
        client = new m.BridgeClient({url: "wss://example.invalid/ws/", WebSocket: FakeSocket,
                                     auth: "anonymous", initialDelay: 10});
        client.connect();
        ws = last();
        ws.ack = false;
        const before = sockets.length;
        ws.serve(hello(40));
        await until(() => ws.sent.length === 1);
        out.anonymous_identify = ws.sent[0];
        ws.serve(ready("S3", 1));
        await until(() => ws.beats.length === 1);
        out.heartbeat = ws.beats[0];
        await until(() => sockets.length === before + 1);
        out.dead_heartbeat_closed_with = ws.closedWith;
        client.close();

        // Backoff grows, with jitter, while connections keep failing.
        client = tokenClient();
        const delays = [];
        client.on("close", (d) => { if (d.reconnect) delays.push(d.delay); });
        client.connect();
        for (let i = 0; i < 6; i++) {
            const n = sockets.length;
            last().drop(1006);
            await until(() => sockets.length === n + 1);
        }
        out.delays = delays;
        client.close();

        // A fatal close code ends it: no reconnect.
        client = tokenClient();
        let closeEvent = null;
        client.on("close", (d) => { closeEvent = d; });
        const first = sockets.length;
        client.connect();
        last().serve(hello(60000));
        await until(() => last().sent.length === 1);
        last().drop(4004);
        await sleep(100);
        out.fatal = {state: client.state, sockets: sockets.length - first,
                     reconnect: closeEvent.reconnect};
    } catch (e) {
        out.errors.push(String((e && e.stack) || e));
    }
    return out;
}"""
)


# RESUME in session (cookie) and token mode, recovered replays, the online probe.
FAKE_RESUME_SCRIPT = (
    """async () => {"""
    + FAKE_SOCKET_PRELUDE
    + """
    const out = {errors: []};
    const cookieClient = () => new m.BridgeClient({url: "wss://example.invalid/ws/",
        WebSocket: FakeSocket, initialDelay: 20, maxDelay: 200});
    try {
        // Session mode: the handshake's cookie gives READY, then RESUME goes at once.
        let client = cookieClient();
        const events = [];
        for (const name of ["ready", "resumed", "invalid_session"]) {
            client.on(name, () => events.push(name));
        }
        const seen = [];
        client.on("status", (d) => seen.push(d.payload));
        const notes = [];
        client.on("notify", (d) => notes.push(d.event));
        client.subscribe(["a"]);
        client.connect();
        let ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("S1", 1, ["a", "b"]));
        out.cookie_first = ws.sent.slice();
        ws.serve(event("SUBSCRIBED", 2, {device: "a", permission: "change",
                                         history: [{payload: {on: false}, ts: 100, by: null}]}));
        ws.serve(status("a", 3, {on: true}, 200));
        const k1 = outcome(client.command("a", {on: false}, {id: "k1"}));
        ws.serve(result("k1", 4, "sent"));
        ws.drop(1001);  // the bridge is restarting
        await until(() => sockets.length === 2);
        ws = last();
        ws.serve(hello(60000));
        await sleep(10);
        out.cookie_before_ready = {sent: ws.sent.slice(), state: client.state};
        ws.serve(ready("C2", 1, ["a", "b"]));  // the cookie's own session, not taken up
        out.cookie_resume = ws.sent.slice();
        ws.serve(status("a", 5, {on: false}, 300, "u"));  // the replay
        out.held = seen.length;
        ws.serve(result("k1", 6, "confirmed"));
        ws.serve(event("RESUMED", 7, {session_id: "S1", replayed: 2}));
        out.cookie_command = await k1;
        out.cookie_resumed = {events: events.slice(), state: client.state,
                              session: client.sessionId, seq: client.lastSeq,
                              sent: ws.sent.length, seen: seen.slice()};

        // Subscriptions changed while disconnected are sent after RESUMED.
        ws.drop(1006);
        await until(() => sockets.length === 3);
        client.subscribe(["b"]);
        client.unsubscribe(["a"]);
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("C3", 1, ["a", "b"]));
        ws.serve(event("RESUMED", 8, {session_id: "S1", replayed: 0}));
        out.resync = ws.sent.slice();

        // A replay cut short passes nothing on and does not move the resume point.
        ws.serve(event("SUBSCRIBED", 9, {device: "b", permission: "change", history: []}));
        const k2 = outcome(client.command("b", {on: true}, {id: "k2"}));
        ws.serve(result("k2", 10, "sent"));
        ws.drop(1006);
        await until(() => sockets.length === 4);
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("C4", 1, ["a", "b"]));
        ws.serve(status("b", 11, {on: true}, 400));
        ws.drop(1006);
        await until(() => sockets.length === 5);
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("C5", 1, ["a", "b"]));
        out.partial = {resume: ws.sent[0], seen: seen.length};

        // INVALID_SESSION: the connection stays READY on the cookie's session.
        ws.serve(event("NOTIFY", 2, {event: "shift", data: null}));
        ws.serve(event("INVALID_SESSION", 3, {}));
        out.cookie_invalid = {command: await k2, events: events.slice(), sent: ws.sent.slice(1),
                              session: client.sessionId, seq: client.lastSeq,
                              state: client.state, notes: notes.slice(), sockets: sockets.length};
        ws.drop(1006);
        await until(() => sockets.length === 6);
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("C6", 1, ["a", "b"]));
        out.after_invalid_resume = ws.sent[0];
        client.close();

        // A server that refuses RESUME after a cookie READY (4005): no more RESUME.
        client = cookieClient();
        const sessions = [];
        client.on("ready", (d) => sessions.push(d.session_id));
        client.subscribe(["a"]);
        client.connect();
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("O1", 1));
        let n = sockets.length;
        ws.drop(1001);
        await until(() => sockets.length === n + 1);
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("O2", 1));
        out.old_server_resume = ws.sent.slice();
        n = sockets.length;
        ws.drop(4005);
        await until(() => sockets.length === n + 1);
        ws = last();
        ws.serve(hello(60000));
        ws.serve(ready("O3", 1));
        out.old_server = {sent: ws.sent.slice(), ready: sessions, state: client.state,
                          resume: client.resumeEnabled};
        client.close();

        // Token mode, a recovered resume (the replica died): statuses the client
        // already had are dropped, new ones (even with the same ts) are not.
        client = tokenClient({probeTimeout: 50});
        const values = [];
        client.on("status", (d) => values.push(d.payload.v));
        let resumed = null;
        client.on("resumed", (d) => { resumed = d; });
        client.subscribe(["a"]);
        client.connect();
        ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        ws.serve(ready("R1", 1));
        ws.serve(event("SUBSCRIBED", 2, {device: "a", permission: "change",
                                         history: [{payload: {v: 1}, ts: 100, by: null}]}));
        ws.serve(status("a", 3, {v: 2}, 200));
        ws.serve(status("a", 4, {v: 3}, 200, "u"));
        const k3 = outcome(client.command("a", {v: 5}, {id: "k3"}));
        ws.serve(result("k3", 5, "sent"));
        n = sockets.length;
        ws.drop(1006);
        await until(() => sockets.length === n + 1);
        ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        out.recovered_resume = ws.sent[0];
        ws.serve(status("a", 6, {v: 1}, 100));
        ws.serve(status("a", 7, {v: 2}, 200));
        ws.serve(status("a", 8, {v: 3}, 200, "u"));
        ws.serve(status("a", 9, {v: 4}, 200));
        ws.serve(status("a", 10, {v: 5}, 300, "u"));
        ws.serve(event("DEVICE_STATE", 11, {device: "a", online: true}));
        ws.serve(result("k3", 12, "confirmed"));
        ws.serve(event("RESUMED", 13, {session_id: "R1", replayed: 7, recovered: true}));
        out.recovered = {values: values.slice(), repeated: resumed.repeated,
                         recovered: resumed.recovered, seq: client.lastSeq, command: await k3};

        // An exact resume passes every replayed status on, whatever its ts.
        n = sockets.length;
        ws.drop(1001);
        await until(() => sockets.length === n + 1);
        ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        ws.serve(status("a", 14, {v: 6}, 50));
        ws.serve(event("RESUMED", 15, {session_id: "R1", replayed: 1}));
        out.exact = {values: values.slice(4), repeated: resumed.repeated, seq: client.lastSeq};

        // Back online: a heartbeat at once; without its ACK the connection is
        // replaced and the session resumed.
        n = sockets.length;
        ws.ack = false;
        window.dispatchEvent(new Event("online"));
        out.probe_beats = ws.beats.slice();
        await until(() => sockets.length === n + 1);
        out.probe_closed_with = ws.closedWith;
        ws = last();
        ws.serve(hello(60000));
        await until(() => ws.sent.length === 1);
        out.probe_resume = ws.sent[0];
        ws.serve(event("RESUMED", 16, {session_id: "R1", replayed: 0}));
        n = sockets.length;
        window.dispatchEvent(new Event("online"));
        await sleep(150);
        out.probe_kept = {sockets: sockets.length - n, beats: ws.beats.length,
                          state: client.state};
        client.close();
    } catch (e) {
        out.errors.push(String((e && e.stack) || e));
    }
    return out;
}"""
)


class NodeRedEditorTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_editor_needs_the_permission_and_works_through_the_proxy(self) -> Any:
        from tests.nodered_support import find_node_red

        executable = find_node_red(self)
        nodered = NodeRedEditor(executable, self.world.nodered_port)
        self.addCleanup(nodered.stop)
        yield threads.deferToThread(nodered.start)

        def scenario(browser: Any) -> list[str]:
            from playwright.sync_api import expect

            # Anonymous: to the login page.
            page = self.context(browser).new_page()
            page.goto(self.url + "nodered/")
            expect(page).to_have_url(self.url + "accounts/login/?next=/nodered/")

            # Logged in without use_nodered: 403, and no Flows tab.
            plain = self.login(self.context(browser), "plain")
            expect(plain.get_by_role("link", name="Flows")).to_have_count(0)
            response = plain.goto(self.url + "nodered/")
            self.assertEqual(response.status, 403)
            self.assertEqual(plain.goto(self.url + "flows/").status, 403)

            # With it: the Flows tab frames the real editor, whose WebSocket works.
            editor = self.login(self.context(browser), "editor")
            frames: list[str] = []

            def on_websocket(ws: Any) -> None:
                if ws.url.endswith("/nodered/comms"):
                    ws.on("framereceived", lambda payload: frames.append(str(payload)))

            editor.on("websocket", on_websocket)
            editor.get_by_role("link", name="Flows").click()
            expect(editor).to_have_url(self.url + "flows/")
            frame = editor.frame_locator("#flows-frame")
            expect(frame.locator("#red-ui-header")).to_be_visible(timeout=30_000)
            expect(frame.locator("#red-ui-palette")).to_be_visible()
            editor.wait_for_function("true")
            deadline = time.monotonic() + 10
            while not any("notification/runtime" in f for f in frames):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no frames from Node-RED's comms: {frames}")
                editor.wait_for_timeout(100)
            self.no_js_errors(editor)
            return frames

        frames = yield run_in_browser(scenario)
        self.assertTrue(frames)


class NodeRedEditor:
    """Node-RED 4 with its editor at /nodered/ on a given port, bound to localhost."""

    def __init__(self, executable: str, port: int) -> None:
        self.executable = executable
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="bridge-nodered-editor-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        settings = self.dir / "settings.js"
        settings.write_text(
            "module.exports = "
            + json.dumps(
                {
                    "uiHost": "127.0.0.1",
                    "uiPort": self.port,
                    "httpAdminRoot": "/nodered/",
                    "httpNodeRoot": "/nodes/",
                    "userDir": str(self.dir),
                    "flowFile": "flows.json",
                    "credentialSecret": False,
                    "telemetry": {"enabled": False, "updateNotification": False},
                    "editorTheme": {"tours": False},
                    "logging": {"console": {"level": "warn"}},
                }
            )
            + ";\n"
        )
        log = open(self.dir / "node-red.log", "wb")
        self.proc = subprocess.Popen(
            [self.executable, "--settings", str(settings), "--userDir", str(self.dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(self.dir),
        )
        log.close()
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/nodered/"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "node-red.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Node-RED did not serve {url} in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
