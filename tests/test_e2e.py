"""The whole session over real TLS against a real ``twistd bridge`` process.

A client here follows only the spec: HELLO, a token from ``bridge-admin
token`` or ``POST /api/token/``, IDENTIFY, READY, SUBSCRIBE, COMMAND, and the
close codes of every forbidden or malformed request.
"""

from __future__ import annotations

import json
import time
from typing import Any

import treq
from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest

from tests.server import BridgeProcess, admin, admin_sync, kill_on_exit
from tests.wsclient import connect

PASSWORD = "correct-horse-battery-42"
METRICS_TOKEN = "metrics-scrape-token-123"


class World:
    """One provisioned bridge shared by the tests of this module."""

    def __init__(self) -> None:
        self.server = BridgeProcess(env={"BRIDGE_METRICS_TOKEN": METRICS_TOKEN})
        kill_on_exit(self.server)
        d = self.server.data_dir
        admin_sync(d, "migrate")
        for name, extra in (
            ("op", []),
            ("viewer", []),
            ("member", ["--group", "line1"]),
            ("root", ["--superuser"]),
            ("nobody", []),
        ):
            out, err, code = admin_sync(
                d, "adduser", name, "--password-stdin", *extra, stdin=PASSWORD
            )
            assert code == 0, err
        self.ids: dict[str, str] = {}
        for name, kind, extra in (
            ("toggle", "toggle", ["--history", "5"]),
            ("sensor", "sensor", []),
            ("public", "dimmer", ["--public"]),
            ("secret", "toggle", []),
            ("robot", "arm", []),
        ):
            out, err, code = admin_sync(d, "adddevice", name, "--kind", kind, *extra)
            assert code == 0, err
            self.ids[name] = out
        for args in (
            ("--user", "op", self.ids["toggle"], "change"),
            ("--user", "viewer", self.ids["toggle"], "read"),
            ("--group", "line1", self.ids["sensor"], "read"),
            ("--user", "op", self.ids["sensor"], "read"),
            ("--user", "op", self.ids["robot"], "change"),
        ):
            out, err, code = admin_sync(d, "grant", *args)
            assert code == 0, err
        out, err, code = admin_sync(d, "devicekey", self.ids["robot"])
        assert code == 0 and out.startswith("bdk_"), err
        self.robot_key = out

    def token(self, username: str) -> str:
        out, err, code = admin_sync(self.server.data_dir, "token", username)
        assert code == 0, err
        return out


_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
    return _world


class E2ETestCase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.world = world()
        if self.world.server.proc is None:
            yield self.world.server.start()
        self.server = self.world.server

    @defer.inlineCallbacks
    def client(self, path: str = "ws/", **kwargs: Any) -> Any:
        url = self.server.url.replace("https", "wss", 1) + path
        c = yield connect(url, ca_pem=self.server.ca_pem, **kwargs)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        return c

    @defer.inlineCallbacks
    def ready(self, username: str, path: str = "ws/") -> Any:
        c = yield self.client(path)
        hello = yield c.next()
        self.assertEqual(hello["op"], 0)
        c.send({"op": 3, "d": {"token": self.world.token(username)}})
        ready = yield c.event("READY")
        return c, ready

    @defer.inlineCallbacks
    def assertClosedWith(self, c: Any, code: int) -> Any:
        frames = yield c.until(lambda f: f.get("t") == "ERROR")
        self.assertEqual(frames[-1]["d"]["code"], code)
        closed_code, _ = yield c.closed()
        self.assertEqual(closed_code, code)


class SessionTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_hello_then_ready_lists_exactly_readable_devices(self) -> Any:
        ids = self.world.ids
        c = yield self.client()
        hello = yield c.next()
        self.assertEqual(hello["op"], 0)
        self.assertEqual(hello["d"]["protocol"], 1)
        self.assertIsInstance(hello["d"]["heartbeat_interval"], int)
        c.send({"op": 3, "d": {"token": self.world.token("op")}})
        ready = yield c.event("READY")
        self.assertEqual(ready["s"], 1)
        d = ready["d"]
        self.assertEqual(d["role"], "operator")
        self.assertEqual(d["user"]["username"], "op")
        self.assertEqual(d["session_id"], hello["d"]["session_id"])
        perms = {dev["id"]: dev["permission"] for dev in d["devices"]}
        self.assertEqual(
            perms,
            {
                ids["toggle"]: "change",
                ids["sensor"]: "read",
                ids["public"]: "read",
                ids["robot"]: "change",
            },
        )
        toggle = next(dev for dev in d["devices"] if dev["id"] == ids["toggle"])
        self.assertEqual(
            (toggle["name"], toggle["kind"], toggle["history_size"], toggle["online"]),
            ("toggle", "toggle", 5, True),
        )

    @defer.inlineCallbacks
    def test_group_public_and_superuser_grants(self) -> Any:
        ids = self.world.ids
        _, ready = yield self.ready("member")
        self.assertEqual(
            {dev["id"]: dev["permission"] for dev in ready["d"]["devices"]},
            {ids["sensor"]: "read", ids["public"]: "read"},
        )
        _, ready = yield self.ready("root")
        perms = {dev["id"]: dev["permission"] for dev in ready["d"]["devices"]}
        self.assertEqual(perms, {i: "change" for i in ids.values()})
        _, ready = yield self.ready("nobody")
        self.assertEqual([dev["id"] for dev in ready["d"]["devices"]], [ids["public"]])

    @defer.inlineCallbacks
    def test_token_from_http_api(self) -> Any:
        trust = ssl.Certificate.loadPEM(self.server.ca_pem)
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))
        url = self.server.url.replace("127.0.0.1", "localhost") + "api/token/"
        resp = yield treq.post(url, json={"username": "op", "password": PASSWORD}, agent=agent)
        self.assertEqual(resp.code, 200)
        self.assertIn(b"max-age", resp.headers.getRawHeaders(b"strict-transport-security")[0])
        body = yield resp.json()
        self.assertEqual(body["expires_in"], 60)
        bad = yield treq.post(url, json={"username": "op", "password": "nope"}, agent=agent)
        self.assertEqual(bad.code, 401)
        yield bad.content()
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": {"token": body["token"]}})
        ready = yield c.event("READY")
        self.assertEqual(ready["d"]["user"]["username"], "op")

    @defer.inlineCallbacks
    def test_subscribe_command_confirmed_and_history(self) -> Any:
        toggle = self.world.ids["toggle"]
        c, _ = yield self.ready("op")
        c.send({"op": 7, "d": {"devices": [toggle], "history": True}})
        sub = yield c.event("SUBSCRIBED")
        self.assertEqual(sub["d"]["device"], toggle)
        self.assertEqual(sub["d"]["permission"], "change")
        self.assertIsInstance(sub["d"]["history"], list)
        c.send({"op": 4, "d": {"device": toggle, "payload": {"on": True}, "id": "c1"}})
        frames = yield c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        results = [f["d"] for f in frames if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual([r["result"] for r in results], ["sent", "confirmed"])
        self.assertEqual(results[0]["id"], "c1")
        statuses = [f for f in frames if f["op"] == 5]
        self.assertEqual(len(statuses), 1)
        status = statuses[0]["d"]
        self.assertEqual(status["payload"], {"on": True})
        self.assertEqual(status["by"], "op")
        self.assertEqual(status["command_id"], results[0]["command_id"])
        seqs = [f["s"] for f in frames if "s" in f]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))

        # A second viewer subscribing now gets that status as history.
        v, _ = yield self.ready("viewer")
        v.send({"op": 7, "d": {"devices": [toggle]}})
        sub = yield v.event("SUBSCRIBED")
        self.assertEqual(sub["d"]["permission"], "read")
        self.assertEqual(sub["d"]["history"][-1]["payload"], {"on": True})
        self.assertEqual(sub["d"]["history"][-1]["by"], "op")

    @defer.inlineCallbacks
    def test_device_path_subscribes_after_ready(self) -> Any:
        sensor = self.world.ids["sensor"]
        c, _ = yield self.ready("member", path=f"ws/devices/{sensor}/")
        sub = yield c.event("SUBSCRIBED")
        self.assertEqual(sub["d"]["device"], sensor)
        status = yield c.until(lambda f: f["op"] == 5, timeout=5)
        self.assertEqual(status[-1]["d"]["device"], sensor)
        self.assertIn("temperature", status[-1]["d"]["payload"])

    @defer.inlineCallbacks
    def test_heartbeat_is_acknowledged(self) -> Any:
        c, ready = yield self.ready("op")
        c.send({"op": 1, "d": ready["s"]})
        ack = yield c.until(lambda f: f["op"] == 2)
        self.assertEqual(ack[-1], {"op": 2})


class ForbiddenTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_command_without_change_closes_4003_and_is_audited(self) -> Any:
        c, _ = yield self.ready("viewer")
        c.send({"op": 4, "d": {"device": self.world.ids["toggle"], "payload": True, "id": "x"}})
        yield self.assertClosedWith(c, 4003)
        out, err, code = yield admin(
            self.server.data_dir,
            "shell",
            "-v",
            "0",
            "-c",
            "from bridge.devices.models import AuditEntry as A;"
            "print(A.objects.filter(username='viewer', action='command', result='denied').count())",
        )
        # The store flushes every 0.25 s; allow a moment.
        if out.strip() == "0":
            yield task.deferLater(reactor, 1.0, lambda: None)
            out, err, code = yield admin(
                self.server.data_dir,
                "shell",
                "-v",
                "0",
                "-c",
                "from bridge.devices.models import AuditEntry as A;"
                "print(A.objects.filter(username='viewer', action='command').count())",
            )
        self.assertGreaterEqual(int(out.strip()), 1, err)

    @defer.inlineCallbacks
    def test_subscribe_to_unreadable_or_unknown_device_closes_4003(self) -> Any:
        for device in (self.world.ids["secret"], "no-such-device"):
            c, _ = yield self.ready("viewer")
            c.send({"op": 7, "d": {"devices": [device]}})
            yield self.assertClosedWith(c, 4003)

    @defer.inlineCallbacks
    def test_malformed_frames(self) -> Any:
        cases: list[tuple[Any, int]] = [
            (b"not json", 4002),
            (b"[1,2]", 4002),
            ({"op": 99}, 4001),
            ({"op": 7, "d": {"devices": "abc"}}, 4002),
        ]
        for frame, code in cases:
            c, _ = yield self.ready("op")
            c.send(frame)
            yield self.assertClosedWith(c, code)

    @defer.inlineCallbacks
    def test_before_ready(self) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 7, "d": {"devices": []}})
        yield self.assertClosedWith(c, 4006)

    @defer.inlineCallbacks
    def test_bad_token_4004_and_second_identify_4005(self) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": {"token": "forged"}})
        yield self.assertClosedWith(c, 4004)
        c, _ = yield self.ready("op")
        c.send({"op": 3, "d": {"token": self.world.token("op")}})
        yield self.assertClosedWith(c, 4005)

    @defer.inlineCallbacks
    def test_anonymous_identify_refused_when_disabled(self) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": {}})
        yield self.assertClosedWith(c, 4004)

    @defer.inlineCallbacks
    def test_frame_too_large_4010(self) -> Any:
        c, _ = yield self.ready("op")
        c.send(json.dumps({"op": 1, "d": None, "pad": "x" * 200_000}).encode())
        yield self.assertClosedWith(c, 4010)

    @defer.inlineCallbacks
    def test_foreign_origin_refused_with_403(self) -> Any:
        d = self.client(origin="https://evil.example")
        failure = yield self.assertFailure(d, ConnectionError)
        self.assertIn("403", str(failure))


class LiveChangeTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_revoke_reaches_live_connection_within_one_second(self) -> Any:
        toggle = self.world.ids["toggle"]
        c, _ = yield self.ready("viewer")
        c.send({"op": 7, "d": {"devices": [toggle]}})
        yield c.event("SUBSCRIBED")
        out, err, code = yield self.server.admin("revoke", "--user", "viewer", toggle)
        self.assertEqual(code, 0, err)
        revoked_at = time.monotonic()
        removed = yield c.event("DEVICE_REMOVED", timeout=3)
        self.assertLess(time.monotonic() - revoked_at, 1.0)
        self.assertEqual(removed["d"], {"device": toggle})
        # Subscribing again is now forbidden.
        c.send({"op": 7, "d": {"devices": [toggle]}})
        yield self.assertClosedWith(c, 4003)
        out, err, code = yield self.server.admin("grant", "--user", "viewer", toggle, "read")
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_deactivated_user_is_closed_4011(self) -> Any:
        c, _ = yield self.ready("nobody")
        out, err, code = yield self.server.admin(
            "shell",
            "-v",
            "0",
            "-c",
            "from django.contrib.auth.models import User;"
            "u=User.objects.get(username='nobody'); u.is_active=False; u.save()",
        )
        self.assertEqual(code, 0, err)
        yield self.assertClosedWith(c, 4011)
        yield self.server.admin(
            "shell",
            "-v",
            "0",
            "-c",
            "from django.contrib.auth.models import User;"
            "u=User.objects.get(username='nobody'); u.is_active=True; u.save()",
        )

    @defer.inlineCallbacks
    def test_resume_replays_missed_statuses(self) -> Any:
        sensor = self.world.ids["sensor"]
        c, ready = yield self.ready("member")
        c.send({"op": 7, "d": {"devices": [sensor], "history": False}})
        yield c.event("SUBSCRIBED")
        yield c.until(lambda f: f["op"] == 5, timeout=5)
        last = c.last_s
        c.proto.dropConnection(abort=True)
        yield task.deferLater(reactor, 2.5, lambda: None)  # the sensor reports every second
        r = yield self.client()
        yield r.next()
        r.send(
            {
                "op": 9,
                "d": {
                    "session_id": ready["d"]["session_id"],
                    "seq": last,
                    "token": self.world.token("member"),
                },
            }
        )
        frames = yield r.until(lambda f: f.get("t") == "RESUMED")
        replayed = [f for f in frames if "s" in f]
        self.assertGreaterEqual(len([f for f in replayed if f["op"] == 5]), 1)
        self.assertEqual(
            [f["s"] for f in replayed], list(range(last + 1, last + 1 + len(replayed)))
        )

    @defer.inlineCallbacks
    def test_publish_from_another_process(self) -> Any:
        c, _ = yield self.ready("op")
        v, _ = yield self.ready("viewer")
        out, err, code = yield self.server.admin(
            "publish", "--to", "user:op", "--event", "maintenance", "--data", '{"at": "22:00"}'
        )
        self.assertEqual(code, 0, err)
        notice = yield c.event("NOTIFY", timeout=3)
        self.assertEqual(notice["d"], {"event": "maintenance", "data": {"at": "22:00"}})
        v.send({"op": 1, "d": None})
        frames = yield v.until(lambda f: f["op"] == 2, timeout=3)
        self.assertEqual([f for f in frames if f.get("t") == "NOTIFY"], [])
        out, err, code = yield self.server.admin("publish", "--to", "bogus", "--event", "x")
        self.assertNotEqual(code, 0)
        self.assertIn("bad target", err)

    @defer.inlineCallbacks
    def test_resume_of_unknown_session_is_invalid(self) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 9, "d": {"session_id": "nope", "seq": 0, "token": self.world.token("op")}})
        invalid = yield c.event("INVALID_SESSION")
        self.assertEqual(invalid["d"], {})
        c.send({"op": 3, "d": {"token": self.world.token("op")}})
        yield c.event("READY")


class RestartTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_restart_keeps_history(self) -> Any:
        toggle = self.world.ids["toggle"]
        c, _ = yield self.ready("op")
        c.send({"op": 7, "d": {"devices": [toggle]}})
        yield c.event("SUBSCRIBED")
        c.send({"op": 4, "d": {"device": toggle, "payload": {"on": False}, "id": "before"}})
        results = yield c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] == "confirmed"
        )
        command_id = results[-1]["d"]["command_id"]
        yield task.deferLater(reactor, 0.6, lambda: None)  # history flush
        self.server.stop()
        yield self.server.start()
        c, _ = yield self.ready("op")
        c.send({"op": 7, "d": {"devices": [toggle]}})
        sub = yield c.event("SUBSCRIBED")
        last = sub["d"]["history"][-1]
        self.assertEqual((last["payload"], last["by"]), ({"on": False}, "op"))
        self.assertLessEqual(len(sub["d"]["history"]), 5)
        out, err, code = yield self.server.admin(
            "shell",
            "-v",
            "0",
            "-c",
            "from bridge.devices.models import AuditEntry as A;"
            f"print(A.objects.get(command_id='{command_id}').result)",
        )
        self.assertEqual(out, "confirmed", err)


class ResumeAcrossRestartTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_a_client_closed_with_1001_resumes_after_the_restart(self) -> Any:
        """Spec §6: 1001 means the server is going away and the client should RESUME."""
        toggle = self.world.ids["toggle"]
        c, ready = yield self.ready("op")
        c.send({"op": 7, "d": {"devices": [toggle], "history": False}})
        yield c.event("SUBSCRIBED")
        c.send({"op": 4, "d": {"device": toggle, "payload": {"on": True}, "id": "r1"}})
        yield c.until(lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent")
        seen = c.last_s
        stopped = self.server.stop_async()
        code, _ = yield c.closed()
        self.assertEqual(code, 1001)
        yield stopped
        yield self.server.start()
        c2 = yield self.client()
        yield c2.next()
        session_id = ready["d"]["session_id"]
        token = self.world.token("op")
        c2.send({"op": 9, "d": {"session_id": session_id, "seq": seen, "token": token}})
        frames = yield c2.until(lambda f: f.get("t") in ("RESUMED", "INVALID_SESSION"))
        self.assertEqual(frames[-1]["t"], "RESUMED", frames)
        numbers = [f["s"] for f in frames]
        self.assertEqual(numbers, list(range(seen + 1, seen + 1 + len(numbers))))
        # The session goes on where it was: subscribed, numbered on, commands confirmed.
        c2.send({"op": 4, "d": {"device": toggle, "payload": {"on": False}, "id": "r2"}})
        frames = yield c2.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")
        statuses = [f for f in frames if f["op"] == 5]
        self.assertEqual(statuses[-1]["d"]["payload"], {"on": False})
        self.assertEqual(
            [f["s"] for f in frames], list(range(numbers[-1] + 1, numbers[-1] + 1 + len(frames)))
        )

    @defer.inlineCallbacks
    def test_a_session_is_resumed_only_once_after_the_restart(self) -> Any:
        c, ready = yield self.ready("viewer")
        seen = c.last_s
        yield self.server.stop_async()
        yield c.closed()
        yield self.server.start()
        resume = {"session_id": ready["d"]["session_id"], "seq": seen, "token": ""}
        first = yield self.client()
        yield first.next()
        resume["token"] = self.world.token("op")  # another identity: refused
        first.send({"op": 9, "d": resume})
        yield first.event("INVALID_SESSION")
        second = yield self.client()
        yield second.next()
        resume["token"] = self.world.token("viewer")
        second.send({"op": 9, "d": resume})
        yield second.event("RESUMED")


class DeviceClientTests(E2ETestCase):
    @defer.inlineCallbacks
    def device(self) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": {"device_key": self.world.robot_key}})
        ready = yield c.event("READY")
        return c, ready

    @defer.inlineCallbacks
    def test_device_client_receives_commands_and_confirms_them(self) -> Any:
        robot = self.world.ids["robot"]
        op, _ = yield self.ready("op")
        op.send({"op": 7, "d": {"devices": [robot], "history": False}})
        yield op.event("SUBSCRIBED")
        dev, ready = yield self.device()
        self.assertEqual(ready["d"]["role"], "device")
        self.assertIsNone(ready["d"]["user"])
        self.assertEqual([d["id"] for d in ready["d"]["devices"]], [robot])
        state = yield op.event("DEVICE_STATE")
        self.assertEqual(state["d"], {"device": robot, "online": True})

        op.send({"op": 4, "d": {"device": robot, "payload": {"pos": 3}, "id": "m1"}})
        command = yield dev.until(lambda f: f["op"] == 4)
        d = command[-1]["d"]
        self.assertEqual((d["device"], d["payload"]), (robot, {"pos": 3}))
        self.assertNotIn("s", command[-1])
        dev.send({"op": 5, "d": {"device": robot, "payload": {"pos": 3}, "command_id": d["id"]}})
        frames = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] == "confirmed"
        )
        [status] = [f["d"] for f in frames if f["op"] == 5]
        self.assertEqual(
            (status["payload"], status["by"], status["command_id"]), ({"pos": 3}, "op", d["id"])
        )

        dev.proto.dropConnection(abort=True)
        state = yield op.event("DEVICE_STATE")
        self.assertEqual(state["d"], {"device": robot, "online": False})
        op.send({"op": 4, "d": {"device": robot, "payload": {"pos": 4}, "id": "m2"}})
        result = yield op.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        self.assertEqual(result[-1]["d"]["result"], "upstream_unavailable")

    @defer.inlineCallbacks
    def test_device_client_reporting_for_another_device_is_closed_4003(self) -> Any:
        dev, _ = yield self.device()
        dev.send({"op": 5, "d": {"device": self.world.ids["toggle"], "payload": 1}})
        yield self.assertClosedWith(dev, 4003)

    @defer.inlineCallbacks
    def test_unknown_device_key_4004(self) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": {"device_key": "bdk_guess"}})
        yield self.assertClosedWith(c, 4004)


class CookieTests(E2ETestCase):
    @defer.inlineCallbacks
    def login(self, username: str) -> Any:
        """Log in through Django's login form; returns the session cookie."""
        from http.cookiejar import CookieJar

        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        trust = ssl.Certificate.loadPEM(self.server.ca_pem)
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))
        base = self.server.url.replace("127.0.0.1", "localhost")
        from treq.client import HTTPClient

        jar = CookieJar()
        http = HTTPClient(agent, cookiejar=jar)
        r = yield http.get(base + "accounts/login/")
        page = yield r.text()
        import re

        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        r = yield http.post(
            base + "accounts/login/",
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": csrf},
            headers={"Referer": base + "accounts/login/", "Origin": base.rstrip("/")},
            allow_redirects=False,
        )
        self.assertEqual(r.code, 302, (yield r.text()))
        cookies = {c.name: c.value for c in jar}
        self.assertIn("sessionid", cookies)
        return cookies["sessionid"]

    @defer.inlineCallbacks
    def test_cookie_ready_then_resume_by_cookie(self) -> Any:
        sensor = self.world.ids["sensor"]
        sid = yield self.login("member")
        headers = {"Cookie": f"sessionid={sid}"}
        origin = self.server.url.rstrip("/")  # same origin as the handshake's Host
        c = yield self.client(headers=headers, origin=origin)
        hello = yield c.next()
        ready = yield c.event("READY")  # no IDENTIFY: the cookie identified us
        self.assertEqual(ready["d"]["user"]["username"], "member")
        self.assertEqual(ready["d"]["session_id"], hello["d"]["session_id"])
        c.send({"op": 7, "d": {"devices": [sensor], "history": False}})
        yield c.event("SUBSCRIBED")
        yield c.until(lambda f: f["op"] == 5, timeout=5)
        last = c.last_s
        c.proto.dropConnection(abort=True)
        yield task.deferLater(reactor, 2.2, lambda: None)
        r = yield self.client(headers=headers, origin=origin)
        yield r.next()
        yield r.event("READY")  # a fresh cookie session, until the RESUME replaces it
        r.send({"op": 9, "d": {"session_id": ready["d"]["session_id"], "seq": last}})
        frames = yield r.until(lambda f: f.get("t") == "RESUMED")
        replayed = [f for f in frames if "s" in f]
        self.assertEqual(
            [f["s"] for f in replayed], list(range(last + 1, last + 1 + len(replayed)))
        )
        self.assertGreaterEqual(len([f for f in replayed if f["op"] == 5]), 1)

    @defer.inlineCallbacks
    def test_resume_by_cookie_on_a_device_path(self) -> Any:
        """docs/protocol.md: RESUME right after a cookie READY is honoured, on /ws/devices/ too.

        There the server's own SUBSCRIBE after READY is not a request of the
        client's, so it must not use up the cookie session (today: 4005).
        """
        sensor = self.world.ids["sensor"]
        sid = yield self.login("member")
        headers = {"Cookie": f"sessionid={sid}"}
        origin = self.server.url.rstrip("/")
        path = f"ws/devices/{sensor}/"
        c = yield self.client(path, headers=headers, origin=origin)
        yield c.next()
        ready = yield c.event("READY")
        yield c.event("SUBSCRIBED")
        yield c.until(lambda f: f["op"] == 5, timeout=5)
        last = c.last_s
        c.proto.dropConnection(abort=True)
        r = yield self.client(path, headers=headers, origin=origin)
        yield r.next()
        yield r.event("READY")
        r.send({"op": 9, "d": {"session_id": ready["d"]["session_id"], "seq": last}})
        frames = yield r.until(lambda f: f.get("t") in ("RESUMED", "INVALID_SESSION", "ERROR"))
        self.assertEqual(frames[-1].get("t"), "RESUMED", frames[-1])
