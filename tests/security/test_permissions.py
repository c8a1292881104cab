"""Who may read and change what, enforced on a live bridge (spec §5, §8).

The bridge here dials a recording Node-RED stand-in (fake_nodered.py), so
"nothing of the request reaches Node-RED" is checked on what Node-RED really
received, next to a positive control that shows the recording works.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from twisted.internet import defer

from tests.security.world import SecurityTestCase, Spec, World, sleep

SPEC = Spec(
    users={
        "op": {},
        "viewer": {},
        "prober": {},
        "grower": {},
        "shrinker": {},
        "member": {"groups": ["crew"]},
        "quitter": {},
        "root": {"superuser": True},
    },
    devices={"toggle": {}, "secret": {}, "public": {"public": True}},
    grants=[
        ("user", "op", "toggle", "change"),
        ("user", "viewer", "toggle", "read"),
        ("user", "prober", "toggle", "read"),
        ("user", "grower", "toggle", "read"),
        ("user", "shrinker", "toggle", "change"),
        ("group", "crew", "toggle", "change"),
        ("user", "quitter", "toggle", "read"),
    ],
)

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World(SPEC, nodered=True, link_secret=secrets.token_urlsafe(24))
    return _world


def marker() -> str:
    return "mark-" + secrets.token_hex(8)


class PermissionTestCase(SecurityTestCase):
    make_world = staticmethod(world)

    def reached_nodered(self, mark: str) -> bool:
        assert self.world.nodered is not None
        return mark in self.world.nodered.received_text()

    @defer.inlineCallbacks
    def command_confirmed(self, c: Any, device: str, mark: str) -> Any:
        """A permitted command: sent, then confirmed by the (fake) Node-RED."""
        c.send({"op": 4, "d": {"device": device, "payload": {"mark": mark}, "id": mark}})
        frames = yield c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent"
        )
        results = [f["d"]["result"] for f in frames if f.get("t") == "COMMAND_RESULT"]
        self.assertEqual(results, ["sent", "confirmed"])
        self.assertTrue(self.reached_nodered(mark))

    @defer.inlineCallbacks
    def command_refused(self, c: Any, device: str, mark: str) -> Any:
        """A forbidden command: ERROR and 4003, no COMMAND_RESULT, nothing upstream."""
        c.send({"op": 4, "d": {"device": device, "payload": {"mark": mark}, "id": mark}})
        frames = yield self.closed_with(c, 4003)
        self.assertEqual([f for f in frames if f.get("t") == "COMMAND_RESULT"], [])
        # Give a (wrongly) forwarded command time to arrive before looking.
        yield sleep(0.5)
        self.assertFalse(self.reached_nodered(mark), f"{mark} reached Node-RED")
        return frames

    @defer.inlineCallbacks
    def set_grant(self, username: str, device: str, permission: str) -> Any:
        """Change a grant as the admin does (a model save, so signals run)."""
        out, err, code = yield self.world.shell(
            "from bridge.devices.models import Grant;"
            f"g = Grant.objects.get(user__username={username!r}, device_id={device!r});"
            f"g.permission = {permission!r}; g.save()"
        )
        self.assertEqual(code, 0, err)


class GuessedDeviceIdTests(PermissionTestCase):
    """An unknown id and a device one may not read look exactly the same."""

    def guesses(self) -> list[str]:
        return [self.world.ids["secret"], secrets.token_urlsafe(16), "no-such-device"]

    @defer.inlineCallbacks
    def test_ready_lists_only_readable_devices(self) -> Any:
        _, ready = yield self.ready("prober")
        listed = {d["id"] for d in ready["d"]["devices"]}
        self.assertEqual(listed, {self.world.ids["toggle"], self.world.ids["public"]})

    @defer.inlineCallbacks
    def test_subscribe_to_random_or_unreadable_id_is_the_same_4003(self) -> Any:
        errors = []
        for device in self.guesses():
            c, _ = yield self.ready("prober")
            c.send({"op": 7, "d": {"devices": [device]}})
            frames = yield self.closed_with(c, 4003)
            self.assertEqual([f for f in frames if f.get("t") == "SUBSCRIBED"], [])
            errors.append(frames[-1]["d"])
        self.assertEqual(len({json.dumps(e, sort_keys=True) for e in errors}), 1, errors)

    @defer.inlineCallbacks
    def test_device_path_to_random_or_unreadable_id_is_the_same_4003(self) -> Any:
        errors = []
        for device in self.guesses():
            c, ready = yield self.ready("prober", path=f"ws/devices/{device}/")
            frames = yield self.closed_with(c, 4003)
            self.assertEqual([f for f in frames if f.get("t") == "SUBSCRIBED"], [])
            errors.append(frames[-1]["d"])
        self.assertEqual(len({json.dumps(e, sort_keys=True) for e in errors}), 1, errors)

    @defer.inlineCallbacks
    def test_command_to_random_or_unreadable_id_is_the_same_4003(self) -> Any:
        errors = []
        for device in self.guesses():
            c, _ = yield self.ready("prober")
            frames = yield self.command_refused(c, device, marker())
            errors.append(frames[-1]["d"])
        self.assertEqual(len({json.dumps(e, sort_keys=True) for e in errors}), 1, errors)

    @defer.inlineCallbacks
    def test_guesses_are_audited_with_the_guessed_id(self) -> Any:
        guess = secrets.token_urlsafe(16)
        c, _ = yield self.ready("prober")
        c.send({"op": 7, "d": {"devices": [guess]}})
        yield self.closed_with(c, 4003)
        rows = yield self.audit_rows(f"device_id={guess!r}")
        self.assertEqual(len(rows), 1, rows)
        self.assertEqual(
            (rows[0]["username"], rows[0]["action"], rows[0]["result"]),
            ("prober", "subscribe", "denied"),
        )
        self.assertTrue(rows[0]["remote_addr"])


class CommandTests(PermissionTestCase):
    @defer.inlineCallbacks
    def test_positive_control_change_grant_reaches_nodered(self) -> Any:
        c, _ = yield self.ready("op")
        yield self.command_confirmed(c, self.world.ids["toggle"], marker())

    @defer.inlineCallbacks
    def test_command_with_read_grant_is_refused_audited_and_never_forwarded(self) -> Any:
        mark = marker()
        c, _ = yield self.ready("viewer")
        yield self.command_refused(c, self.world.ids["toggle"], mark)
        rows = yield self.audit_rows(f"username='viewer', action='command', payload__mark={mark!r}")
        self.assertEqual(len(rows), 1, rows)
        self.assertEqual(rows[0]["result"], "denied")
        self.assertEqual(rows[0]["device_id"], self.world.ids["toggle"])
        self.assertEqual(rows[0]["payload"], {"mark": mark})

    @defer.inlineCallbacks
    def test_command_on_a_public_device_is_refused(self) -> Any:
        c, _ = yield self.ready("viewer")
        yield self.command_refused(c, self.world.ids["public"], marker())

    @defer.inlineCallbacks
    def test_command_before_ready_is_refused_and_never_forwarded(self) -> Any:
        mark = marker()
        c = yield self.client()
        yield c.next()
        c.send({"op": 4, "d": {"device": self.world.ids["toggle"], "payload": mark, "id": "x"}})
        yield self.closed_with(c, 4006)
        yield sleep(0.5)
        self.assertFalse(self.reached_nodered(mark))

    @defer.inlineCallbacks
    def test_status_from_an_operator_is_refused_and_never_published(self) -> Any:
        # Only device clients report; an operator cannot fake a device's state.
        mark = marker()
        toggle = self.world.ids["toggle"]
        watcher, _ = yield self.ready("viewer")
        watcher.send({"op": 7, "d": {"devices": [toggle], "history": False}})
        yield watcher.event("SUBSCRIBED")
        c, _ = yield self.ready("op")
        c.send({"op": 5, "d": {"device": toggle, "payload": {"mark": mark}}})
        yield self.closed_with(c, 4003)
        yield sleep(0.5)
        watcher.send({"op": 1, "d": None})
        frames = yield watcher.until(lambda f: f["op"] == 2)
        self.assertNotIn(mark, json.dumps(frames))


class LiveGrantTests(PermissionTestCase):
    """A grant changed while connected applies to the next request (spec §5)."""

    @defer.inlineCallbacks
    def test_read_to_change_allows_commands(self) -> Any:
        toggle = self.world.ids["toggle"]
        c, ready = yield self.ready("grower")
        self.assertEqual(
            [d["permission"] for d in ready["d"]["devices"] if d["id"] == toggle], ["read"]
        )
        try:
            yield self.set_grant("grower", toggle, "change")
            changed = yield c.event("DEVICE_CHANGED", timeout=3)
            self.assertEqual(
                (changed["d"]["device"], changed["d"]["permission"]), (toggle, "change")
            )
            yield self.command_confirmed(c, toggle, marker())
        finally:
            yield self.set_grant("grower", toggle, "read")

    @defer.inlineCallbacks
    def test_change_to_read_forbids_commands_after_device_changed(self) -> Any:
        toggle = self.world.ids["toggle"]
        c, _ = yield self.ready("shrinker")
        yield self.command_confirmed(c, toggle, marker())
        try:
            yield self.set_grant("shrinker", toggle, "read")
            frames = yield c.until(lambda f: f.get("t") == "DEVICE_CHANGED", timeout=3)
            self.assertEqual(frames[-1]["d"]["permission"], "read")
            yield self.command_refused(c, toggle, marker())
        finally:
            yield self.set_grant("shrinker", toggle, "change")

    @defer.inlineCallbacks
    def test_leaving_the_granting_group_removes_the_device(self) -> Any:
        toggle = self.world.ids["toggle"]
        c, _ = yield self.ready("member")
        c.send({"op": 7, "d": {"devices": [toggle]}})
        yield c.event("SUBSCRIBED")
        yield self.command_confirmed(c, toggle, marker())
        out, err, code = yield self.world.shell(
            "from django.contrib.auth.models import User, Group;"
            "User.objects.get(username='member').groups.remove(Group.objects.get(name='crew'))"
        )
        self.assertEqual(code, 0, err)
        try:
            removed = yield c.event("DEVICE_REMOVED", timeout=3)
            self.assertEqual(removed["d"], {"device": toggle})
            yield self.command_refused(c, toggle, marker())
        finally:
            yield self.world.shell(
                "from django.contrib.auth.models import User, Group;"
                "User.objects.get(username='member').groups.add(Group.objects.get(name='crew'))"
            )


class RevokedIdentityTests(PermissionTestCase):
    @defer.inlineCallbacks
    def deactivate_and_time_the_close(self, username: str, change: str) -> Any:
        token = self.world.token(username)
        c, ready = yield self.identify(token)
        self.assertEqual(ready.get("t"), "READY")
        closed_at: list[float] = []

        def stamp(result: Any) -> Any:
            closed_at.append(time.time())
            return result

        c.factory.closed.addBoth(stamp)
        out, err, code = yield self.world.shell(
            "import time; from django.contrib.auth.models import User;"
            f"u = User.objects.get(username={username!r}); {change}; u.save();"
            "print(repr(time.time()))"
        )
        self.assertEqual(code, 0, err)
        saved_at = float(out.splitlines()[-1])
        yield self.closed_with(c, 4011, timeout=3)
        self.assertTrue(closed_at)
        self.assertLess(closed_at[0] - saved_at, 1.0, "4011 came later than one second")
        return token, ready["d"]["session_id"]

    @defer.inlineCallbacks
    def test_deactivated_user_is_closed_4011_within_one_second(self) -> Any:
        token, session_id = yield self.deactivate_and_time_the_close(
            "quitter", "u.is_active = False"
        )
        try:
            # The session is gone and the user's tokens are dead: no way back in.
            r = yield self.client()
            yield r.next()
            r.send({"op": 9, "d": {"session_id": session_id, "seq": 1, "token": token}})
            yield self.closed_with(r, 4004)
            c, frame = yield self.identify(token)
            self.assertEqual((frame.get("t"), frame["d"]["code"]), ("ERROR", 4004))
            closed_code, _ = yield c.closed()
            self.assertEqual(closed_code, 4004)
        finally:
            yield self.world.shell(
                "from django.contrib.auth.models import User;"
                "u = User.objects.get(username='quitter'); u.is_active = True; u.save()"
            )

    @defer.inlineCallbacks
    def test_demoted_superuser_cannot_command_ungranted_devices(self) -> Any:
        # Whatever the close code, a live connection of a demoted superuser must not
        # keep "change on everything": after a second, "secret" (no grants) is off limits.
        c, _ = yield self.ready("root")
        try:
            out, err, code = yield self.world.shell(
                "from django.contrib.auth.models import User;"
                "u = User.objects.get(username='root'); u.is_superuser = False; u.save()"
            )
            self.assertEqual(code, 0, err)
            yield sleep(1.2)
            if not c.factory.closed.called:
                yield self.command_refused(c, self.world.ids["secret"], marker())
        finally:
            yield self.world.shell(
                "from django.contrib.auth.models import User;"
                "u = User.objects.get(username='root'); u.is_superuser = True; u.save()"
            )

    @defer.inlineCallbacks
    def test_superuser_demoted_is_closed_4011_within_one_second(self) -> Any:
        try:
            yield self.deactivate_and_time_the_close("root", "u.is_superuser = False")
        finally:
            yield self.world.shell(
                "from django.contrib.auth.models import User;"
                "u = User.objects.get(username='root'); u.is_superuser = True; u.save()"
            )
