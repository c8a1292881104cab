"""The per-connection state machine, without sockets (spec §3, §5, §6)."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial import unittest

from bridge import protocol
from bridge.protocol import CloseCode
from bridge.session import (
    Action,
    AuditDenied,
    Authenticate,
    Close,
    DeviceView,
    Identity,
    Limits,
    Permission,
    ReportStatus,
    ResumeRequested,
    Role,
    Send,
    Session,
    State,
    SubmitCommand,
    SubscribeDevices,
    UnsubscribeDevices,
)

OPERATOR = Identity(Role.OPERATOR, user_id=1, username="ann", auth_hash="h")
DEVICE = Identity(Role.DEVICE, device_id="dev-a")


def view(device_id: str, permission: Permission = Permission.READ, name: str = "n") -> DeviceView:
    return DeviceView(device_id, name, "toggle", 10, permission)


GRANTS = {"a": view("a", Permission.CHANGE), "b": view("b")}


class Link:
    """Collects what the session writes and the actions it asks the edge to run."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.executed: list[Action] = []

    def write(self, data: bytes) -> None:
        self.frames.append(json.loads(data))

    def execute(self, actions: list[Action]) -> None:
        self.executed.extend(actions)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f["d"] for f in self.frames if f.get("t") == name]


def frames_of(actions: list[Action]) -> list[dict[str, Any]]:
    return [json.loads(a.data) for a in actions if isinstance(a, Send)]


class SessionTestCase(unittest.SynchronousTestCase):
    def make(self, limits: Limits | None = None) -> tuple[Session, Link]:
        session = Session("sid", limits or Limits(), now=0.0)
        link = Link()
        session.attach(link, 0.0)
        return session, link

    def ready(self, identity: Identity = OPERATOR, grants: Any = GRANTS) -> tuple[Session, Link]:
        session, link = self.make()
        actions = session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        self.assertEqual(actions, [Authenticate(protocol.Identify(token="t"))])
        self.assertEqual(session.identified(identity, grants, lambda d: d == "a"), [])
        return session, link

    def assertClosed(self, actions: list[Action], code: CloseCode) -> None:
        closes = [a for a in actions if isinstance(a, Close)]
        self.assertEqual([c.code for c in closes], [int(code)])
        errors = [f for f in frames_of(actions) if f.get("t") == "ERROR"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["d"]["code"], int(code))
        self.assertIsInstance(errors[0]["d"]["message"], str)
        # ERROR comes before the close.
        self.assertIsInstance(actions[-1], Close)


class HandshakeTests(SessionTestCase):
    def test_hello(self) -> None:
        session, _ = self.make(Limits(heartbeat_interval=12.5))
        hello = json.loads(session.hello())
        self.assertEqual(
            hello["d"], {"heartbeat_interval": 12500, "session_id": "sid", "protocol": 1}
        )

    def test_ready_lists_grants_and_online_state(self) -> None:
        session, link = self.ready()
        self.assertEqual(session.state, State.READY)
        [ready] = link.frames
        self.assertEqual((ready["op"], ready["t"], ready["s"]), (6, "READY", 1))
        self.assertEqual(ready["d"]["user"], {"id": 1, "username": "ann"})
        self.assertEqual(ready["d"]["role"], "operator")
        self.assertEqual(ready["d"]["session_id"], "sid")
        self.assertEqual(
            ready["d"]["devices"],
            [
                {
                    "id": "a",
                    "name": "n",
                    "kind": "toggle",
                    "permission": "change",
                    "online": True,
                    "history_size": 10,
                },
                {
                    "id": "b",
                    "name": "n",
                    "kind": "toggle",
                    "permission": "read",
                    "online": False,
                    "history_size": 10,
                },
            ],
        )

    def test_heartbeat_answered_at_once_even_before_ready(self) -> None:
        session, _ = self.make()
        self.assertEqual(session.receive(b'{"op":1,"d":null}', 1.0), [Send(b'{"op":2}')])
        self.assertEqual(session.receive(b'{"op":2}', 1.0), [])

    def test_ops_before_ready_close_4006_and_are_audited(self) -> None:
        for frame in (
            {"op": 4, "d": {"device": "a", "payload": 1, "id": "x"}},
            {"op": 5, "d": {"device": "a", "payload": 1}},
            {"op": 7, "d": {"devices": ["a"]}},
            {"op": 8, "d": {"devices": ["a"]}},
            {"op": 0},
            {"op": 6},
        ):
            session, _ = self.make()
            actions = session.receive(json.dumps(frame), 1.0)
            self.assertClosed(actions, CloseCode.NOT_AUTHENTICATED)
            self.assertIsInstance(actions[0], AuditDenied)
            self.assertEqual(session.state, State.CLOSED)

    def test_ops_while_identifying_close_4006(self) -> None:
        session, _ = self.make()
        session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        self.assertClosed(
            session.receive(b'{"op":7,"d":{"devices":[]}}', 1.0), CloseCode.NOT_AUTHENTICATED
        )

    def test_second_identify_or_resume_closes_4005(self) -> None:
        for frame in (b'{"op":3,"d":{"token":"t"}}', b'{"op":9,"d":{"session_id":"x","seq":0}}'):
            session, _ = self.ready()
            self.assertClosed(session.receive(frame, 2.0), CloseCode.ALREADY_AUTHENTICATED)

    def test_the_state_is_checked_before_the_payload_shape(self) -> None:
        # docs/protocol.md: decoding, unknown op, state (4006, 4005), then shape (4002).
        for frame in (b'{"op":7}', b'{"op":4,"d":{}}', b'{"op":5,"d":null}', b'{"op":8,"d":[]}'):
            session, _ = self.make()
            self.assertClosed(session.receive(frame, 1.0), CloseCode.NOT_AUTHENTICATED)
        for frame in (b'{"op":3,"d":5}', b'{"op":3}', b'{"op":9,"d":{"seq":-1}}'):
            session, _ = self.ready()
            self.assertClosed(session.receive(frame, 2.0), CloseCode.ALREADY_AUTHENTICATED)
        # Allowed in every state, a heartbeat is judged by its shape; so is a first IDENTIFY.
        for frame in (b'{"op":1,"d":"x"}', b'{"op":3,"d":5}'):
            session, _ = self.make()
            self.assertClosed(session.receive(frame, 1.0), CloseCode.DECODE_ERROR)
        session, _ = self.make()
        self.assertClosed(session.receive(b'{"op":77,"d":5}', 1.0), CloseCode.UNKNOWN_OP)

    def test_identify_failed_closes_4004(self) -> None:
        session, _ = self.make()
        session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        actions = session.identify_failed("token expired")
        self.assertClosed(actions, CloseCode.AUTHENTICATION_FAILED)
        self.assertEqual(actions[0], AuditDenied("identify", None, "token expired", None))

    def test_server_only_op_after_ready_is_4001(self) -> None:
        session, _ = self.ready()
        self.assertClosed(session.receive(b'{"op":0}', 2.0), CloseCode.UNKNOWN_OP)

    def test_decode_errors(self) -> None:
        session, _ = self.ready()
        self.assertClosed(session.receive(b"{", 2.0), CloseCode.DECODE_ERROR)
        session, _ = self.ready()
        self.assertClosed(session.receive(b'{"op":12}', 2.0), CloseCode.UNKNOWN_OP)
        session, _ = self.ready()
        self.assertClosed(session.binary(), CloseCode.DECODE_ERROR)
        session, _ = self.ready()
        self.assertClosed(session.too_large(70000, 65536), CloseCode.FRAME_TOO_LARGE)

    def test_nothing_after_close(self) -> None:
        session, _ = self.ready()
        session.receive(b"{", 2.0)
        self.assertEqual(session.receive(b'{"op":1}', 2.0), [])
        session.event("X", {})
        self.assertEqual(session.identify_failed("x"), [])


class PermissionTests(SessionTestCase):
    def test_subscribe_readable(self) -> None:
        session, _ = self.ready()
        actions = session.receive(b'{"op":7,"d":{"devices":["a","b"],"history":false}}', 2.0)
        self.assertEqual(actions, [SubscribeDevices(("a", "b"), False)])
        self.assertEqual(session.subscriptions, {"a", "b"})

    def test_subscribe_to_any_unreadable_device_subscribes_nothing(self) -> None:
        session, _ = self.ready()
        actions = session.receive(b'{"op":7,"d":{"devices":["a","zzz"]}}', 2.0)
        self.assertClosed(actions, CloseCode.FORBIDDEN)
        self.assertEqual(
            actions[0], AuditDenied("subscribe", "zzz", "no read permission for this device", None)
        )
        self.assertEqual(session.subscriptions, set())

    def test_command_needs_change(self) -> None:
        session, _ = self.ready()
        ok = session.receive(b'{"op":4,"d":{"device":"a","payload":1,"id":"c"}}', 2.0)
        self.assertEqual(ok, [SubmitCommand(protocol.Command("a", 1, "c"))])
        denied = session.receive(b'{"op":4,"d":{"device":"b","payload":1,"id":"c"}}', 2.0)
        self.assertClosed(denied, CloseCode.FORBIDDEN)
        self.assertEqual(denied[0].payload, 1)  # type: ignore[union-attr]

    def test_command_for_unknown_device_is_forbidden(self) -> None:
        session, _ = self.ready()
        self.assertClosed(
            session.receive(b'{"op":4,"d":{"device":"q","payload":1,"id":"c"}}', 2.0),
            CloseCode.FORBIDDEN,
        )

    def test_status_only_from_device_clients_for_their_device(self) -> None:
        session, _ = self.ready()
        self.assertClosed(
            session.receive(b'{"op":5,"d":{"device":"a","payload":1}}', 2.0), CloseCode.FORBIDDEN
        )
        session, _ = self.ready(DEVICE, {"dev-a": view("dev-a")})
        ok = session.receive(b'{"op":5,"d":{"device":"dev-a","payload":1,"command_id":"c"}}', 2.0)
        self.assertEqual(ok, [ReportStatus(protocol.Status("dev-a", 1, "c"))])
        self.assertClosed(
            session.receive(b'{"op":5,"d":{"device":"dev-b","payload":1}}', 2.0),
            CloseCode.FORBIDDEN,
        )

    def test_device_clients_send_no_commands(self) -> None:
        session, _ = self.ready(DEVICE, {"dev-a": view("dev-a", Permission.CHANGE)})
        self.assertClosed(
            session.receive(b'{"op":4,"d":{"device":"dev-a","payload":1,"id":"c"}}', 2.0),
            CloseCode.FORBIDDEN,
        )

    def test_unsubscribe(self) -> None:
        session, _ = self.ready()
        session.receive(b'{"op":7,"d":{"devices":["a"]}}', 2.0)
        actions = session.receive(b'{"op":8,"d":{"devices":["a","never"]}}', 2.0)
        self.assertEqual(actions, [UnsubscribeDevices(("a", "never"))])
        self.assertEqual(session.subscriptions, set())


class NumberingTests(SessionTestCase):
    def test_dispatches_are_numbered_one_by_one(self) -> None:
        session, link = self.ready()
        body = protocol.status_body("a", 1, 5, None, None)
        for _ in range(3):
            session.push(protocol.status_dispatch("a", body))
        session.subscribed("a", [{"payload": 1, "ts": 1, "by": None}])
        self.assertEqual([f["s"] for f in link.frames], [1, 2, 3, 4, 5])
        self.assertEqual(
            link.frames[-1]["d"],
            {
                "device": "a",
                "permission": "change",
                "history": [{"payload": 1, "ts": 1, "by": None}],
            },
        )

    def test_error_frame_is_numbered_too(self) -> None:
        session, link = self.ready()
        actions = session.receive(b"{", 2.0)
        error = frames_of(actions)[0]
        self.assertEqual(error["s"], 2)


class GrantChangeTests(SessionTestCase):
    def test_removed_and_changed_devices(self) -> None:
        session, link = self.ready()
        session.receive(b'{"op":7,"d":{"devices":["a","b"]}}', 2.0)
        dropped = session.update_grants({"b": view("b", Permission.CHANGE), "c": view("c")})
        self.assertEqual(dropped, ["a"])
        self.assertEqual(session.subscriptions, {"b"})
        self.assertEqual(link.events("DEVICE_REMOVED"), [{"device": "a"}])
        self.assertEqual(
            link.events("DEVICE_CHANGED"),
            [
                {
                    "device": "b",
                    "name": "n",
                    "kind": "toggle",
                    "history_size": 10,
                    "permission": "change",
                },
                {
                    "device": "c",
                    "name": "n",
                    "kind": "toggle",
                    "history_size": 10,
                    "permission": "read",
                },
            ],
        )
        # Now a command on b is allowed, a subscribe to a is not.
        ok = session.receive(b'{"op":4,"d":{"device":"b","payload":1,"id":"c"}}', 3.0)
        self.assertIsInstance(ok[0], SubmitCommand)
        self.assertClosed(
            session.receive(b'{"op":7,"d":{"devices":["a"]}}', 3.0), CloseCode.FORBIDDEN
        )

    def test_unchanged_grants_send_nothing(self) -> None:
        session, link = self.ready()
        before = len(link.frames)
        self.assertEqual(session.update_grants(dict(GRANTS)), [])
        self.assertEqual(len(link.frames), before)

    def test_revoke_closes_4011(self) -> None:
        session, _ = self.ready()
        self.assertClosed(session.revoke("password changed"), CloseCode.IDENTITY_REVOKED)
        self.assertFalse(session.resumable)


class TimeoutTests(SessionTestCase):
    def test_silence_for_twice_the_interval_closes_4009(self) -> None:
        session, _ = self.ready()
        session.receive(b'{"op":1}', 10.0)
        self.assertEqual(session.check_timeouts(70.0), [])
        self.assertClosed(session.check_timeouts(70.1), CloseCode.HEARTBEAT_TIMEOUT)

    def test_no_identify_in_time_closes_4006(self) -> None:
        session, _ = self.make(Limits(identify_timeout=5.0))
        self.assertEqual(session.check_timeouts(5.0), [])
        self.assertClosed(session.check_timeouts(5.1), CloseCode.NOT_AUTHENTICATED)

    def test_detached_session_expires_after_resume_window(self) -> None:
        session, _ = self.ready()
        session.detach(100.0)
        self.assertFalse(session.expired(160.0))
        self.assertTrue(session.expired(160.1))

    def test_session_detached_before_ready_is_gone(self) -> None:
        session, _ = self.make()
        session.detach(1.0)
        self.assertEqual(session.state, State.CLOSED)
        self.assertTrue(session.expired(1.0))


class ResumeTests(SessionTestCase):
    def detached_with_statuses(self, n: int = 5) -> tuple[Session, Link]:
        session, link = self.ready()
        session.receive(b'{"op":7,"d":{"devices":["a","b"]}}', 2.0)
        session.subscribed("a", None)
        session.subscribed("b", None)
        for i in range(n):
            device = "a" if i % 2 == 0 else "b"
            body = protocol.status_body(device, i, i, None, None)
            session.push(protocol.status_dispatch(device, body))
        return session, link

    def test_resume_request_before_ready(self) -> None:
        session, _ = self.make()
        actions = session.receive(b'{"op":9,"d":{"session_id":"x","seq":3,"token":"t"}}', 1.0)
        self.assertEqual(actions, [ResumeRequested(protocol.Resume("x", 3, "t"))])
        self.assertEqual(session.state, State.IDENTIFYING)

    def test_replay_after_seq_with_the_numbers_they_would_have_had(self) -> None:
        session, link = self.detached_with_statuses()
        # Seen by the client: READY(1), SUBSCRIBED a(2), b(3), status 0 (4).
        session.detach(10.0)
        body = protocol.status_body("a", "late", 11, None, None)
        session.push(protocol.status_dispatch("a", body))  # while detached: s=9
        self.assertTrue(session.can_replay_from(4))
        new = Link()
        frames, dropped = session.resume(4, OPERATOR, GRANTS, new, 20.0)
        decoded = [json.loads(f) for f in frames]
        self.assertEqual([f["s"] for f in decoded], [5, 6, 7, 8, 9, 10])
        self.assertEqual([f["d"]["payload"] for f in decoded[:5]], [1, 2, 3, 4, "late"])
        self.assertEqual(decoded[-1]["t"], "RESUMED")
        self.assertEqual(dropped, [])
        self.assertIs(session.link, new)
        # Numbering continues on the new connection.
        session.event("X", {})
        self.assertEqual(new.frames[-1]["s"], 11)

    def test_replay_withholds_devices_no_longer_readable(self) -> None:
        session, _ = self.detached_with_statuses()
        session.detach(10.0)
        frames, dropped = session.resume(3, OPERATOR, {"a": GRANTS["a"]}, Link(), 20.0)
        decoded = [json.loads(f) for f in frames]
        self.assertEqual(dropped, ["b"])
        statuses = [f for f in decoded if f["op"] == 5]
        self.assertEqual({f["d"]["device"] for f in statuses}, {"a"})
        self.assertEqual([f["t"] for f in decoded if f["op"] == 6], ["DEVICE_REMOVED", "RESUMED"])
        self.assertEqual(session.subscriptions, {"a"})

    def test_replay_without_a_revoked_device_numbers_densely_and_keeps_its_removal(
        self,
    ) -> None:
        """Spec §2: ``s`` goes up by one per dispatch; §3: what is no longer readable
        is not replayed, so the numbers after it close up, and its DEVICE_REMOVED
        (pushed while detached) is replayed."""
        session, _ = self.detached_with_statuses()
        # Seen by the client: READY(1), SUBSCRIBED a(2), b(3), statuses a0..a4 (4-8).
        session.detach(10.0)
        session.push(
            protocol.status_dispatch("b", protocol.status_body("b", "b-late", 11, None, None))
        )
        session.update_grants({"a": GRANTS["a"]})  # revoked while detached: DEVICE_REMOVED b
        session.push(
            protocol.status_dispatch("a", protocol.status_body("a", "a-late", 12, None, None))
        )
        frames, dropped = session.resume(8, OPERATOR, {"a": GRANTS["a"]}, Link(), 20.0)
        decoded = [json.loads(f) for f in frames]
        self.assertEqual([f["s"] for f in decoded], [9, 10, 11])
        self.assertEqual(decoded[0]["t"], "DEVICE_REMOVED")
        self.assertEqual(decoded[0]["d"], {"device": "b"})
        self.assertEqual(decoded[1]["d"]["payload"], "a-late")
        self.assertEqual(decoded[2]["t"], "RESUMED")
        self.assertNotIn("b-late", json.dumps(decoded))
        self.assertEqual(dropped, [])  # already dropped when it was revoked
        # A second RESUME from the same point replays the same frames (and the
        # first RESUMED), numbered alike.
        session.detach(21.0)
        again, _ = session.resume(8, OPERATOR, {"a": GRANTS["a"]}, Link(), 22.0)
        self.assertEqual(again[:-1], frames)
        self.assertEqual(json.loads(again[-1])["s"], 12)

    def test_gap_no_longer_held(self) -> None:
        session, link = self.ready()
        session.detach(1.0)
        for i in range(Limits().replay_size + 5):
            session.push(protocol.event_dispatch("NOTIFY", {"event": "e", "data": i}))
        self.assertFalse(session.can_replay_from(1))
        self.assertTrue(session.can_replay_from(session.seq - Limits().replay_size))
        self.assertFalse(session.can_replay_from(session.seq - Limits().replay_size - 1))

    def test_failed_resume_then_identify(self) -> None:
        session, link = self.make()
        session.receive(b'{"op":9,"d":{"session_id":"x","seq":3}}', 1.0)
        self.assertEqual(session.resume_failed(), [])
        self.assertEqual(link.events("INVALID_SESSION"), [{}])
        self.assertEqual(session.state, State.AWAITING_IDENTITY)
        # A second RESUME on this connection is refused the same way.
        self.assertEqual(session.receive(b'{"op":9,"d":{"session_id":"x","seq":3}}', 1.0), [])
        self.assertEqual(len(link.events("INVALID_SESSION")), 2)
        actions = session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        self.assertIsInstance(actions[0], Authenticate)


class SlowViewerTests(SessionTestCase):
    def status(self, device: str, value: int) -> protocol.Dispatch:
        return protocol.status_dispatch(device, protocol.status_body(device, value, 1, None, None))

    def test_newest_status_per_device_waits_events_all_wait_numbers_stay_gap_free(self) -> None:
        session, link = self.ready()
        from collections import Counter

        session.counters = Counter()
        session.pause_output(5.0)
        for i in range(10):
            session.push(self.status("a", i))
            session.push(self.status("b", i))
        session.event("NOTIFY", {"event": "e", "data": 1})
        session.push(self.status("a", 99))
        self.assertEqual(len(link.frames), 1)  # READY only
        self.assertEqual(session.counters["slow_drops"], 19)
        session.resume_output()
        written = link.frames[1:]
        self.assertEqual([f["s"] for f in written], [2, 3, 4])
        self.assertEqual(
            [(f["op"], f["d"].get("device"), f["d"].get("payload")) for f in written],
            [(5, "b", 9), (6, None, None), (5, "a", 99)],
        )

    def test_too_many_pending_closes_4008(self) -> None:
        session, link = self.make()
        session, link = self.ready()
        session.limits = Limits(max_pending=5)
        session.pause_output(1.0)
        for i in range(6):
            session.event("NOTIFY", {"event": "e", "data": i})
        closes = [a for a in link.executed if isinstance(a, Close)]
        self.assertEqual([c.code for c in closes], [int(CloseCode.RATE_LIMITED)])

    def test_behind_too_long_closes_4008(self) -> None:
        session, _ = self.ready()
        session.pause_output(10.0)
        session.receive(b'{"op":1}', 39.0)
        self.assertEqual(session.check_timeouts(40.0), [])
        self.assertClosed(session.check_timeouts(40.1), CloseCode.RATE_LIMITED)

    def test_pending_frames_are_kept_for_resume_when_the_connection_drops(self) -> None:
        session, link = self.ready()
        session.pause_output(1.0)
        session.push(self.status("a", 1))
        session.detach(2.0)
        frames, _ = session.resume(1, OPERATOR, GRANTS, Link(), 3.0)
        self.assertEqual([json.loads(f)["s"] for f in frames], [2, 3])


class FloodTests(SessionTestCase):
    def test_frames_beyond_the_bucket_close_4008(self) -> None:
        session, _ = self.ready()
        session.limits = Limits(frames_per_second=10, frames_burst=20)
        session._tokens = 20.0
        for _ in range(20):
            self.assertEqual(session.receive(b'{"op":1}', 2.0), [Send(b'{"op":2}')])
        actions = session.receive(b'{"op":1}', 2.0)
        self.assertClosed(actions, CloseCode.RATE_LIMITED)

    def test_the_bucket_refills(self) -> None:
        session, _ = self.ready()
        session.limits = Limits(frames_per_second=10, frames_burst=5)
        session._tokens, session._tokens_at = 0.0, 2.0
        self.assertEqual(session.receive(b'{"op":1}', 2.2), [Send(b'{"op":2}')])


class CookieResumeTests(SessionTestCase):
    def cookie_ready(self) -> tuple[Session, Link]:
        session, link = self.make()
        session.state = State.IDENTIFYING
        session.identified(OPERATOR, GRANTS, lambda d: True, by_cookie=True)
        return session, link

    def test_resume_right_after_a_cookie_ready_is_allowed(self) -> None:
        session, _ = self.cookie_ready()
        session.receive(b'{"op":1}', 1.0)  # heartbeats do not count
        actions = session.receive(b'{"op":9,"d":{"session_id":"old","seq":4}}', 1.0)
        self.assertEqual(actions, [ResumeRequested(protocol.Resume("old", 4, None))])
        self.assertEqual(session.state, State.READY)

    def test_not_after_the_client_used_the_cookie_session(self) -> None:
        session, _ = self.cookie_ready()
        session.receive(b'{"op":7,"d":{"devices":["a"]}}', 1.0)
        self.assertClosed(
            session.receive(b'{"op":9,"d":{"session_id":"old","seq":4}}', 1.0),
            CloseCode.ALREADY_AUTHENTICATED,
        )

    def test_identify_after_a_cookie_ready_is_4005(self) -> None:
        session, _ = self.cookie_ready()
        self.assertClosed(
            session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0), CloseCode.ALREADY_AUTHENTICATED
        )

    def test_failed_resume_keeps_the_cookie_session(self) -> None:
        session, link = self.cookie_ready()
        session.receive(b'{"op":9,"d":{"session_id":"old","seq":4}}', 1.0)
        self.assertEqual(session.resume_failed(), [])
        self.assertEqual(session.state, State.READY)
        self.assertEqual(link.events("INVALID_SESSION"), [{}])


class SharingTests(SessionTestCase):
    """What sessions share to save memory must behave as private copies did."""

    def raw_link(self) -> Any:
        class Raw(Link):
            def __init__(self) -> None:
                super().__init__()
                self.raw: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.raw.append(data)
                super().write(data)

        return Raw()

    def test_ready_bytes_are_those_of_the_whole_event_and_replay_identically(self) -> None:
        grants = {"a": view("a", Permission.CHANGE, name='é "x"'), "b": view("b")}
        session = Session("sid-é", Limits(), now=0.0)
        link = self.raw_link()
        session.attach(link, 0.0)
        session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        session.identified(OPERATOR, grants, lambda d: d == "a")
        whole = protocol.event_dispatch(
            "READY",
            {
                "user": OPERATOR.user_json(),
                "role": "operator",
                "devices": [
                    {
                        "id": v.id,
                        "name": v.name,
                        "kind": v.kind,
                        "permission": v.permission.label,
                        "online": v.id == "a",
                        "history_size": v.history_size,
                    }
                    for v in grants.values()
                ],
                "session_id": "sid-é",
            },
        )
        self.assertEqual(link.raw, [protocol.frame(whole, 1)])
        self.assertEqual(protocol.head_bytes(session.kept()[0]), whole[0])
        self.assertTrue(protocol.is_event(session.kept()[0], "READY"))
        self.assertFalse(protocol.is_status(session.kept()[0]))
        session.detach(2.0)
        again = self.raw_link()
        frames, _ = session.resume(0, OPERATOR, grants, again, 3.0)
        self.assertEqual(frames[0], link.raw[0])

    def test_sessions_of_one_user_share_ready_start_but_not_session_id(self) -> None:
        one, _ = self.ready()
        two = Session("other", Limits(), now=0.0)
        link = Link()
        two.attach(link, 0.0)
        two.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        two.identified(OPERATOR, GRANTS, lambda d: d == "a")
        head_one, head_two = one.kept()[0][0], two.kept()[0][0]
        assert isinstance(head_one, tuple) and isinstance(head_two, tuple)
        self.assertIs(head_one[0], head_two[0])
        self.assertEqual(link.events("READY")[0]["session_id"], "other")
        # Another online state is another READY.
        three = Session("third", Limits(), now=0.0)
        three.attach(Link(), 0.0)
        three.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
        three.identified(OPERATOR, GRANTS, lambda d: False)
        head_three = three.kept()[0][0]
        assert isinstance(head_three, tuple)
        self.assertNotEqual(head_three[0], head_one[0])

    def test_shared_grants_are_not_changed_by_one_session_for_another(self) -> None:
        from types import MappingProxyType

        shared = MappingProxyType({"a": view("a", Permission.CHANGE), "b": view("b")})
        one, link_one = self.ready(grants=shared)
        two, link_two = self.ready(grants=shared)
        self.assertIs(one.grants, shared)
        self.assertIs(two.grants, shared)
        one.receive(b'{"op":7,"d":{"devices":["b"]}}', 2.0)
        dropped = one.update_grants({"a": view("a", Permission.READ)})
        self.assertEqual(dropped, ["b"])
        self.assertEqual(dict(shared), {"a": view("a", Permission.CHANGE), "b": view("b")})
        self.assertEqual(dict(two.grants), dict(shared))
        self.assertEqual(dict(one.grants), {"a": view("a", Permission.READ)})
        self.assertEqual(link_two.events("DEVICE_REMOVED"), [])
        # Two still may send commands to "a"; one no longer may.
        command = b'{"op":4,"d":{"device":"a","payload":1,"id":"c"}}'
        self.assertEqual([type(a) for a in two.receive(command, 3.0)], [SubmitCommand])
        self.assertClosed(one.receive(command, 3.0), CloseCode.FORBIDDEN)

    def test_a_callers_own_dict_is_copied(self) -> None:
        mine = dict(GRANTS)
        session, _ = self.ready(grants=mine)
        mine.clear()
        self.assertEqual(set(session.grants), {"a", "b"})
        with self.assertRaises(TypeError):
            session.grants["c"] = view("c")  # type: ignore[index]

    def test_grants_equal_to_the_new_ones_are_shared_again(self) -> None:
        from types import MappingProxyType

        session, _ = self.ready()
        new = MappingProxyType(dict(GRANTS))
        self.assertEqual(session.update_grants(new), [])
        self.assertIs(session.grants, new)

    def test_subscribed_without_history_is_one_shared_frame(self) -> None:
        one, link_one = self.ready()
        two, link_two = self.ready()
        one.subscribed("a", None)
        two.subscribed("a", [])
        self.assertIs(one.kept()[-1], two.kept()[-1])
        self.assertEqual(
            link_one.events("SUBSCRIBED"), [{"device": "a", "permission": "change", "history": []}]
        )
        self.assertEqual(link_one.frames[-1]["s"], 2)
        one.subscribed("b", [{"payload": 1}])
        self.assertEqual(link_one.events("SUBSCRIBED")[-1]["history"], [{"payload": 1}])

    def test_replay_buffer_is_bounded_when_short_and_when_long(self) -> None:
        for size in (3, 16, 17, 40):
            session = Session("sid", Limits(replay_size=size), now=0.0)
            session.attach(Link(), 0.0)
            session.receive(b'{"op":3,"d":{"token":"t"}}', 1.0)
            session.identified(OPERATOR, GRANTS, lambda d: True)
            for n in range(2, 61):
                session.event("NOTIFY", {"n": n})
                kept = session.kept()
                self.assertEqual(len(kept), min(n, size), (size, n))
                last = json.loads(protocol.frame(kept[-1], n))
                self.assertEqual((last["d"], last["s"]), ({"n": n}, n))
            self.assertTrue(session.can_replay_from(60 - size))
            self.assertFalse(session.can_replay_from(60 - size - 1))
            session.detach(2.0)
            frames, _ = session.resume(60 - size, OPERATOR, GRANTS, Link(), 3.0)
            self.assertEqual(
                [json.loads(f)["s"] for f in frames], [*range(61 - size, 61), 61], size
            )
            self.assertEqual(len(session.kept()), min(61, size))

    def test_equal_identities_are_one_object_while_held(self) -> None:
        import gc

        from bridge import session as sessions

        def fresh(key: str | None = None) -> Identity:
            # As a new IDENTIFY loads it: equal, with strings of its own.
            return Identity(
                Role.OPERATOR,
                9,
                "".join(["z", "oe"]),
                auth_hash="".join(["h", "9"]),
                session_key=key,
            )

        one, _ = self.ready(identity=fresh())
        two, _ = self.ready(identity=fresh())
        other, _ = self.ready(identity=fresh("browser"))
        assert one.identity is not None and other.identity is not None
        self.assertIs(one.identity, two.identity)
        self.assertIsNot(other.identity, one.identity)
        self.assertEqual(other.identity.session_key, "browser")
        count = len(sessions._identities)
        del one, two, other
        gc.collect()
        self.assertEqual(len(sessions._identities), count - 2)

    def test_subscriptions_hold_the_grants_device_ids(self) -> None:
        grants = {"lamp-1": view("lamp-1"), "lamp-2": view("lamp-2")}
        session, _ = self.ready(grants=grants)
        (action,) = session.receive(b'{"op":7,"d":{"devices":["lamp-1","lamp-2"]}}', 2.0)
        self.assertEqual(action, SubscribeDevices(("lamp-1", "lamp-2"), True))
        self.assertEqual(session.subscriptions, {"lamp-1", "lamp-2"})
        ids = {id(d) for d in session.subscriptions}
        self.assertEqual(ids, {id(grants["lamp-1"].id), id(grants["lamp-2"].id)})
