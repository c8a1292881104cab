"""Device clients: a key drives one device, and only that one (spec §3 IDENTIFY, §5).

Keys come from ``bridge-admin devicekey DEVICE_ID``, which prints a new key
once (stored hashed); ``--revoke`` removes it.  A device client IDENTIFYs
with ``{"device_key": KEY}``.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from twisted.internet import defer

from tests.security.world import SecurityTestCase, Spec, World, admin_sync, sleep

SPEC = Spec(
    users={"watcher": {}, "op": {}},
    devices={"own": {}, "other": {}, "rotated": {}, "revoked": {}},
    grants=[
        ("user", "watcher", "own", "read"),
        ("user", "watcher", "other", "read"),
        ("user", "op", "own", "change"),
        ("user", "op", "other", "change"),
    ],
)

_world: World | None = None
_keys: dict[str, str] = {}


def world() -> World:
    global _world
    if _world is None:
        _world = World(SPEC)
    return _world


def device_key(label: str, fresh: bool = False) -> str:
    """The key of a device, made with the documented command (once, unless ``fresh``)."""
    w = world()
    if fresh or label not in _keys:
        out, err, code = admin_sync(w.data_dir, "devicekey", w.ids[label])
        assert code == 0, f"bridge-admin devicekey failed ({code}): {err}"
        key = out.strip().splitlines()[-1].strip()
        assert key, "bridge-admin devicekey printed no key"
        _keys[label] = key
    return _keys[label]


def mark() -> str:
    return "mark-" + secrets.token_hex(8)


class DeviceClientTestCase(SecurityTestCase):
    make_world = staticmethod(world)

    @defer.inlineCallbacks
    def device_client(self, label: str) -> Any:
        key = device_key(label)
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": {"device_key": key}})
        ready = yield c.next()
        self.assertEqual(ready.get("t"), "READY", ready)
        return c, ready

    @defer.inlineCallbacks
    def watching(self, label: str) -> Any:
        c, _ = yield self.ready("watcher")
        c.send({"op": 7, "d": {"devices": [self.world.ids[label]], "history": False}})
        yield c.event("SUBSCRIBED")
        return c

    @defer.inlineCallbacks
    def seen_by(self, c: Any) -> Any:
        """Everything a viewer got so far, flushed by a heartbeat round trip."""
        yield sleep(0.5)
        c.send({"op": 1, "d": None})
        frames = yield c.until(lambda f: f["op"] == 2)
        return json.dumps(frames)

    @defer.inlineCallbacks
    def refused_with(self, key_field: dict[str, str], code: int = 4004) -> Any:
        c = yield self.client()
        yield c.next()
        c.send({"op": 3, "d": key_field})
        frame = yield c.next()
        self.assertEqual((frame.get("t"), frame["d"]["code"]), ("ERROR", code), frame)
        closed, _ = yield c.closed()
        self.assertEqual(closed, code)


class DeviceClientTests(DeviceClientTestCase):
    @defer.inlineCallbacks
    def test_a_key_identifies_its_device_and_nothing_else(self) -> Any:
        _, ready = yield self.device_client("own")
        d = ready["d"]
        self.assertEqual((d["role"], d["user"]), ("device", None))
        self.assertEqual([dev["id"] for dev in d["devices"]], [self.world.ids["own"]])

    @defer.inlineCallbacks
    def test_status_for_its_own_device_reaches_viewers(self) -> Any:
        # Positive control for the next test.
        viewer = yield self.watching("own")
        c, _ = yield self.device_client("own")
        m = mark()
        c.send({"op": 5, "d": {"device": self.world.ids["own"], "payload": {"mark": m}}})
        seen = yield self.seen_by(viewer)
        self.assertIn(m, seen)

    @defer.inlineCallbacks
    def test_status_for_another_device_is_4003_audited_and_never_published(self) -> Any:
        viewer = yield self.watching("other")
        c, _ = yield self.device_client("own")
        m = mark()
        other = self.world.ids["other"]
        c.send({"op": 5, "d": {"device": other, "payload": {"mark": m}}})
        yield self.closed_with(c, 4003)
        seen = yield self.seen_by(viewer)
        self.assertNotIn(m, seen)
        rows = yield self.audit_rows(f"action='status', device_id={other!r}")
        self.assertTrue(rows)
        self.assertEqual(rows[-1]["result"], "denied")

    @defer.inlineCallbacks
    def test_a_device_client_sends_no_commands(self) -> Any:
        c, _ = yield self.device_client("own")
        c.send({"op": 4, "d": {"device": self.world.ids["other"], "payload": 1, "id": "x"}})
        yield self.closed_with(c, 4003)

    @defer.inlineCallbacks
    def test_a_device_client_cannot_subscribe_to_another_device(self) -> Any:
        c, _ = yield self.device_client("own")
        c.send({"op": 7, "d": {"devices": [self.world.ids["other"]]}})
        yield self.closed_with(c, 4003)

    @defer.inlineCallbacks
    def test_commands_reach_only_their_own_device_client(self) -> Any:
        own, _ = yield self.device_client("own")
        other, _ = yield self.device_client("other")
        op, _ = yield self.ready("op")
        m = mark()
        op.send(
            {"op": 4, "d": {"device": self.world.ids["other"], "payload": {"mark": m}, "id": m}}
        )
        frames = yield other.until(lambda f: f.get("op") == 4)
        self.assertEqual(frames[-1]["d"]["device"], self.world.ids["other"])
        self.assertIn(m, json.dumps(frames[-1]))
        seen = yield self.seen_by(own)
        self.assertNotIn(m, seen)


class DeviceKeyTests(DeviceClientTestCase):
    @defer.inlineCallbacks
    def test_unknown_keys_and_user_tokens_are_4004(self) -> Any:
        yield self.refused_with({"device_key": "bdk_" + secrets.token_urlsafe(32)})
        yield self.refused_with({"device_key": ""})
        yield self.refused_with({"device_key": device_key("own").upper()})
        yield self.refused_with({"device_key": self.world.token("watcher")})

    @defer.inlineCallbacks
    def test_rotated_key_closes_the_old_client_and_refuses_the_old_key(self) -> Any:
        old = device_key("rotated")
        c, _ = yield self.device_client("rotated")
        new = device_key("rotated", fresh=True)
        self.assertNotEqual(old, new)
        yield self.closed_with(c, 4011, timeout=3)
        yield self.refused_with({"device_key": old})
        c, _ = yield self.device_client("rotated")  # the new one works

    @defer.inlineCallbacks
    def test_revoked_key_closes_the_client_and_is_refused(self) -> Any:
        key = device_key("revoked")
        c, _ = yield self.device_client("revoked")
        out, err, code = admin_sync(
            self.world.data_dir, "devicekey", self.world.ids["revoked"], "--revoke"
        )
        self.assertEqual(code, 0, err)
        self.assertNotIn(key, out)
        yield self.closed_with(c, 4011, timeout=3)
        yield self.refused_with({"device_key": key})

    def test_keys_are_stored_hashed_and_never_logged(self) -> None:
        key = device_key("own")
        log = self.world.log_text()
        self.assertNotIn(key, log)
        self.assertNotIn(key[4:28], log)
        out, err, code = admin_sync(
            self.world.data_dir,
            "shell",
            "-v",
            "0",
            "-c",
            "import json; from bridge.devices.models import Device;"
            "print(json.dumps(list(Device.objects.values()), default=str))",
        )
        self.assertEqual(code, 0, err)
        self.assertNotIn(key[4:28], out)
