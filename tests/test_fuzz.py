"""Fuzzing without sockets: everything a peer can send meets a documented refusal.

Hypothesis throws random, mutated and hostile input at every parser that sees
bytes from outside (client frames, Node-RED statuses, IDENTIFY tokens, sealed
payloads) and random frame sequences at the session state machine, and checks
that the only failures are the documented ones and that the session's
invariants hold.  Budgets are kept small enough for the whole module to run
in well under a minute.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from bridge import envelope, nodered, protocol
from bridge.protocol import CloseCode, ProtocolError
from bridge.session import (
    Action,
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

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
LIGHT = settings(FUZZ, max_examples=120)

# ----------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
ops = st.one_of(
    st.integers(min_value=-2, max_value=12),
    st.integers(),
    st.sampled_from([1.0, True, False, None, "1", [1], {"op": 1}, 1e400]),
)
DEVICES = ["dev-read", "dev-change", "dev-hidden", "dev-gone"]
device_ids = st.sampled_from(DEVICES) | st.text(max_size=10)


@st.composite
def frames(draw: st.DrawFn) -> dict[str, Any]:
    """Frames shaped like the protocol's, right or subtly wrong."""
    op = draw(ops)
    d: Any
    kind = draw(st.integers(0, 6))
    if kind == 0:
        d = draw(json_values)
    elif kind == 1:
        d = {"devices": draw(st.lists(device_ids, max_size=4) | json_values)}
        if draw(st.booleans()):
            d["history"] = draw(st.booleans() | json_scalars)
    elif kind == 2:
        d = {"device": draw(device_ids | json_scalars), "payload": draw(json_values)}
        if draw(st.booleans()):
            d["id"] = draw(st.text(max_size=130) | json_scalars)
        if draw(st.booleans()):
            d["command_id"] = draw(st.text(max_size=8) | json_scalars)
    elif kind == 3:
        d = {
            "session_id": draw(st.text(max_size=8) | json_scalars),
            "seq": draw(st.integers(-3, 50) | json_scalars),
        }
    elif kind == 4:
        d = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "token": st.text(max_size=10) | json_scalars,
                    "device_key": st.text(max_size=10) | json_scalars,
                },
            )
        )
    elif kind == 5:
        d = draw(st.integers() | st.none())
    else:
        d = None
    frame: dict[str, Any] = {"op": op}
    if kind != 6 or draw(st.booleans()):
        frame["d"] = d
    if draw(st.booleans()):
        frame[draw(st.sampled_from(["s", "t", "x", "op2"]))] = draw(json_scalars)
    return frame


def encode(frame: Any) -> bytes:
    return json.dumps(frame).encode()


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A byte string with a few random flips, insertions, deletions and splices."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if how == 0 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif how == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif how == 2 and pos < len(data):
            del data[pos : pos + draw(st.integers(1, 4))]
        else:
            data[pos:pos] = draw(
                st.sampled_from([b'"', b"{", b"[", b"}", b"]", b":", b",", b"\\", b"\xff", b"\x00"])
            )
    return bytes(data)


def valid_frame_bytes() -> st.SearchStrategy[bytes]:
    return st.sampled_from(
        [
            b'{"op":1,"d":null}',
            b'{"op":3,"d":{"token":"abc"}}',
            b'{"op":4,"d":{"device":"dev-change","payload":{"on":true},"id":"c1"}}',
            b'{"op":5,"d":{"device":"dev-read","payload":1,"command_id":null}}',
            b'{"op":7,"d":{"devices":["dev-read","dev-change"],"history":false}}',
            b'{"op":8,"d":{"devices":["dev-read"]}}',
            b'{"op":9,"d":{"session_id":"abc","seq":3,"token":"t"}}',
        ]
    )


# ------------------------------------------------------------------ decode

DECODE_CODES = {CloseCode.UNKNOWN_OP, CloseCode.DECODE_ERROR}


class DecodeFuzzTests(unittest.SynchronousTestCase):
    def check(self, data: bytes | str) -> protocol.Message | None:
        try:
            return protocol.decode(data)
        except ProtocolError as e:
            self.assertIn(e.code, DECODE_CODES, (data[:200], e.code, e.message))
            self.assertIsInstance(e.message, str)
            return None

    @FUZZ
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        self.check(data)

    @FUZZ
    @given(st.text(max_size=300))
    def test_random_text(self, data: str) -> None:
        self.check(data)

    @FUZZ
    @given(json_values)
    def test_any_json_value(self, value: Any) -> None:
        self.check(encode(value))

    @FUZZ
    @given(frames())
    def test_protocol_shaped_frames(self, frame: dict[str, Any]) -> None:
        message = self.check(encode(frame))
        op = frame.get("op")
        if message is None:
            return
        # Whatever decodes has an integer op 0-9 and the types it promises.
        self.assertTrue(type(op) is int and 0 <= op <= 9, frame)
        match message:
            case protocol.Subscribe(devices=devices) | protocol.Unsubscribe(devices=devices):
                self.assertTrue(all(isinstance(x, str) for x in devices))
                self.assertEqual(len(devices), len(set(devices)))
            case protocol.Command(device=device, id=client_id):
                self.assertIsInstance(device, str)
                self.assertIsInstance(client_id, str)
                self.assertLessEqual(len(client_id), protocol.MAX_CLIENT_ID_LENGTH)
            case protocol.Resume(session_id=sid, seq=seq):
                self.assertIsInstance(sid, str)
                self.assertTrue(type(seq) is int and seq >= 0)
            case protocol.Heartbeat(seq=seq):
                self.assertTrue(seq is None or type(seq) is int)

    @FUZZ
    @given(mutated(valid_frame_bytes()))
    def test_mutated_valid_frames(self, data: bytes) -> None:
        self.check(data)

    @LIGHT
    @given(st.binary(min_size=1, max_size=40), st.integers(0, 2))
    def test_invalid_utf8_is_a_decode_error(self, junk: bytes, where: int) -> None:
        bad = b"\xc3\x28" if where == 0 else b"\xed\xa0\x80" if where == 1 else b"\xff"
        data = b'{"op":1,"d":null,"x":"' + junk.replace(b'"', b"") + bad + b'"}'
        with self.assertRaises(ProtocolError) as caught:
            protocol.decode(data)
        self.assertEqual(caught.exception.code, CloseCode.DECODE_ERROR)

    def test_deep_nesting_is_a_decode_error(self) -> None:
        for depth in (1000, 10_000, 100_000, 1_000_000):
            for data in (
                b"[" * depth,
                b"[" * depth + b"]" * depth,
                b'{"op":4,"d":{"device":"x","id":"y","payload":' + b"[" * depth + b"]" * depth,
                b'{"a":' * depth,
            ):
                try:
                    protocol.decode(data)
                except ProtocolError as e:
                    self.assertEqual(e.code, CloseCode.DECODE_ERROR)

    def test_huge_and_special_numbers(self) -> None:
        for text in (
            '{"op":1e400}',
            '{"op":-1e400}',
            '{"op":' + "9" * 5000 + "}",
            '{"op":1,"d":' + "9" * 5000 + "}",
            '{"op":7,"d":{"devices":[],"history":1e400}}',
            '{"op":9,"d":{"session_id":"a","seq":1e400}}',
            '{"op":9,"d":{"session_id":"a","seq":' + "9" * 4000 + "}}",
            '{"op":1,"d":NaN}',
            '{"op":Infinity}',
            '{"op":-Infinity}',
            '{"op":1,"d":-0}',
            '{"op":1.5}',
            '{"op":1E0}',
        ):
            self.check(text)

    @FUZZ
    @given(st.integers(min_value=-(10**4000), max_value=10**4000))
    def test_big_integers_as_op(self, op: int) -> None:
        message = self.check(encode({"op": op, "d": None}))
        if message is not None:
            self.assertTrue(0 <= op <= 9)


# ------------------------------------------------------------ session machine

GRANTS = {
    "dev-read": DeviceView("dev-read", "R", "sensor", 5, Permission.READ),
    "dev-change": DeviceView("dev-change", "C", "toggle", 5, Permission.CHANGE),
}
CLOSE_CODES = {int(c) for c in CloseCode}


@dataclass
class Recorder:
    """The edge, as far as the session can tell: a link that records everything."""

    written: list[bytes] = field(default_factory=list)
    closed_at: int | None = None
    # What the session asks the edge to do on its own (a slow viewer's 4008).
    on_execute: Callable[[list[Action]], None] | None = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def execute(self, actions: list[Action]) -> None:
        assert self.on_execute is not None, actions
        self.on_execute(actions)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), frames().map(encode)),
        st.tuples(st.just("frame"), mutated(valid_frame_bytes())),
        st.tuples(st.just("frame"), valid_frame_bytes()),
        st.tuples(st.just("binary"), st.none()),
        st.tuples(st.just("too_large"), st.integers(0, 10**7)),
        st.tuples(st.just("answer"), st.sampled_from(["ok", "fail", "device"])),
        st.tuples(st.just("grants"), st.sets(st.sampled_from(DEVICES))),
        st.tuples(st.just("status"), st.sampled_from(DEVICES)),
        st.tuples(st.just("tick"), st.floats(0, 100)),
        st.tuples(st.just("revoke"), st.none()),
        # A slow viewer: the connection's buffer fills, later it drains (spec §5a).
        st.tuples(st.just("pause"), st.none()),
        st.tuples(st.just("drain"), st.none()),
        st.tuples(st.just("burst"), st.tuples(st.sampled_from(DEVICES), st.integers(1, 1500))),
    ),
    max_size=30,
)


class SessionFuzzTests(unittest.SynchronousTestCase):
    """Random frames and edge answers; the session's promises hold throughout."""

    def run_steps(self, script: list[tuple[str, Any]]) -> None:
        link = Recorder()
        now = 1000.0
        session = Session("sid", Limits(max_pending=50), now)
        session.attach(link, now)
        link.write(session.hello())
        awaiting: Action | None = None  # an Authenticate / ResumeRequested not yet answered
        closed = False
        grants_now: dict[str, DeviceView] = {}
        last_n: dict[str, int] = {}  # per device, the newest "burst" status written
        burst_n = 0

        def perform(actions: list[Action]) -> None:
            nonlocal closed, awaiting
            for action in actions:
                self.assertFalse(closed, f"{action!r} after a Close")
                match action:
                    case Send(data=data):
                        link.write(data)
                    case Close(code=code):
                        self.assertIn(code, CLOSE_CODES)
                        closed = True
                        link.closed_at = len(link.written)
                    case Authenticate() | ResumeRequested():
                        awaiting = action
                    case SubscribeDevices(devices=devices):
                        self.assertIs(session.state, State.READY)
                        for device in devices:
                            self.assertIn(device, grants_now, "subscribed without read")
                        for device in devices:
                            session.subscribed(device, [])
                    case UnsubscribeDevices(devices=devices):
                        for device in devices:
                            session.unsubscribed(device)
                    case SubmitCommand(command=command):
                        self.assertIs(session.state, State.READY)
                        view = grants_now.get(command.device)
                        self.assertIsNotNone(view, "command without read")
                        assert view is not None
                        self.assertIs(view.permission, Permission.CHANGE, "command without change")
                        session.event(
                            "COMMAND_RESULT",
                            {"id": command.id, "result": "sent"},
                            command.device,
                        )
                    case ReportStatus(status=status):
                        assert session.identity is not None
                        self.assertIs(session.identity.role, Role.DEVICE)
                        self.assertEqual(status.device, session.identity.device_id)

        link.on_execute = perform

        for kind, arg in script:
            before = len(link.written)
            if kind == "frame":
                perform(session.receive(arg, now))
            elif kind == "binary" and not closed:
                # (after a Close: see test_binary_and_too_large_after_close_write_nothing)
                perform(session.binary())
            elif kind == "too_large" and not closed:
                perform(session.too_large(arg, 65536))
            elif kind == "answer" and awaiting is not None:
                request, awaiting = awaiting, None
                if arg == "fail":
                    perform(
                        session.identify_failed("no")
                        if isinstance(request, Authenticate)
                        else session.resume_failed()
                    )
                elif isinstance(request, Authenticate):
                    if arg == "device":
                        who = Identity(Role.DEVICE, device_id="dev-read")
                        grants_now = {"dev-read": GRANTS["dev-read"]}
                    else:
                        who = Identity(Role.OPERATOR, user_id=1, username="u")
                        grants_now = dict(GRANTS)
                    perform(session.identified(who, grants_now, lambda d: True))
                else:
                    perform(session.resume_failed())
            elif kind == "grants" and session.state is State.READY:
                views = {
                    d: DeviceView(
                        d, d, "toggle", 5, Permission.CHANGE if "change" in d else Permission.READ
                    )
                    for d in arg
                }
                if session.identity is not None and session.identity.role is Role.DEVICE:
                    views = {d: v for d, v in views.items() if d == session.identity.device_id}
                session.update_grants(views)
                grants_now = dict(session.grants)
                self.assertEqual(set(grants_now), set(views))
                self.assertLessEqual(session.subscriptions, set(grants_now))
            elif kind == "status" and arg in session.subscriptions:
                body = protocol.status_body(arg, {"v": 1}, 1, None, None)
                session.push(protocol.status_dispatch(arg, body))
            elif kind == "tick":
                now += arg
                perform(session.check_timeouts(now))
            elif kind == "pause":
                session.pause_output(now)
            elif kind == "drain":
                session.resume_output()
            elif kind == "burst" and arg[0] in session.subscriptions:
                # Many statuses at once: a paused viewer keeps the newest per device.
                for _ in range(arg[1]):
                    burst_n += 1
                    body = protocol.status_body(arg[0], {"n": burst_n}, 1, None, None)
                    session.push(protocol.status_dispatch(arg[0], body))
                    if closed:
                        break
            elif kind == "revoke":
                perform(session.revoke("gone"))
            if closed:
                self.assertEqual(
                    len(link.written), link.closed_at, f"written after Close by step {kind}"
                )
            else:
                self.assertGreaterEqual(len(link.written), before)

        # Every frame is a JSON object with an integer op; op 5/6 carry s = 1, 2, 3...
        expected_s = 1
        for data in link.written:
            frame = json.loads(data)
            self.assertIsInstance(frame, dict)
            self.assertIn(frame["op"], range(10))
            if frame["op"] in (5, 6):
                self.assertEqual(frame["s"], expected_s, link.written[-5:])
                expected_s += 1
            else:
                self.assertNotIn("s", frame)
            if frame["op"] == 5 and isinstance(frame["d"]["payload"].get("n"), int):
                # Older statuses may be dropped for a slow viewer, never reordered.
                device, n = frame["d"]["device"], frame["d"]["payload"]["n"]
                self.assertGreater(n, last_n.get(device, -1), "a status went back in time")
                last_n[device] = n
        self.assertEqual(session.seq, expected_s - 1)
        # An ERROR is the last numbered frame before a close, with its code.
        errors = [json.loads(d) for d in link.written if b'"t":"ERROR"' in d]
        if errors:
            self.assertTrue(closed)
            self.assertEqual(len(errors), 1)
        if closed:
            self.assertIs(session.state, State.CLOSED)

    def test_binary_and_too_large_after_close_write_nothing(self) -> None:
        # receive(), identify_failed() and revoke() do nothing once the session is
        # closed; binary() and too_large() must not answer with a second ERROR and Close.
        for late in (lambda s: s.binary(), lambda s: s.too_large(70_000, 65536)):
            session = Session("sid", Limits(), 0.0)
            session.attach(Recorder(), 0.0)
            first = session.receive(b"not json", 0.0)
            self.assertIsInstance(first[-1], Close)
            self.assertIs(session.state, State.CLOSED)
            self.assertEqual(late(session), [])

    @settings(FUZZ, max_examples=400)
    @given(steps)
    def test_random_sequences(self, script: list[tuple[str, Any]]) -> None:
        self.run_steps(script)

    @FUZZ
    @given(steps)
    def test_random_sequences_after_identify(self, script: list[tuple[str, Any]]) -> None:
        # Most random scripts die before READY: start these ones identified.
        prefix: list[tuple[str, Any]] = [
            ("frame", b'{"op":3,"d":{"token":"t"}}'),
            ("answer", "ok"),
            ("frame", b'{"op":7,"d":{"devices":["dev-read","dev-change"]}}'),
        ]
        self.run_steps(prefix + script)

    @FUZZ
    @given(
        st.lists(st.sampled_from(["dev-read", "dev-change", None]), max_size=60),
        st.integers(0, 70),
        st.sets(st.sampled_from(["dev-read", "dev-change"])),
    )
    def test_resume_replays_exactly_the_missed_frames(
        self, pushes: list[str | None], seq: int, still_readable: set[str]
    ) -> None:
        link = Recorder()
        session = Session("sid", Limits(replay_size=25), 0.0)
        session.attach(link, 0.0)
        who = Identity(Role.OPERATOR, user_id=1, username="u")
        session.identified(who, GRANTS, lambda d: True)
        session.subscriptions.update(GRANTS)
        session.detach(1.0)
        for device in pushes:
            if device is None:
                session.event("NOTIFY", {"event": "x", "data": None})
            else:
                body = protocol.status_body(device, {"v": 1}, 1, None, None)
                session.push(protocol.status_dispatch(device, body))
        last = session.seq
        if seq > last or not session.can_replay_from(seq):
            return
        grants = {d: GRANTS[d] for d in still_readable}
        kept = session.kept()
        missed = kept[len(kept) - (last - seq) :] if last > seq else []
        expected = [d for d in missed if d[1] is None or d[1] in still_readable]
        new_link = Recorder()
        frames_out, dropped = session.resume(seq, who, grants, new_link, 2.0)
        decoded = [json.loads(f) for f in frames_out]
        self.assertEqual(decoded[-1]["t"], "RESUMED")
        numbers = [f["s"] for f in decoded]
        # Gap-free from the client's seq on, even where frames were withheld.
        self.assertEqual(numbers, list(range(seq + 1, seq + 1 + len(numbers))))
        for frame in decoded:
            if frame["op"] == 5:
                self.assertIn(frame["d"]["device"], still_readable)
        self.assertEqual(decoded[-1]["d"]["replayed"], len(expected))
        self.assertEqual(
            [json.loads(f) for f in frames_out[: len(expected)]],
            [json.loads(protocol.frame(d, n)) for n, d in enumerate(expected, seq + 1)],
        )
        self.assertEqual(set(dropped), set(GRANTS) - still_readable)
        # And numbering goes on from there.
        session.event("NOTIFY", {"event": "after", "data": None})
        self.assertEqual(json.loads(new_link.written[-1])["s"], numbers[-1] + 1)


# ----------------------------------------------------------------- Node-RED


class NodeRedFuzzTests(unittest.SynchronousTestCase):
    def check(self, data: bytes | str) -> None:
        try:
            status = nodered.decode_status(data)
        except nodered.MalformedMessage as e:
            # The reason never quotes the message (it may hold a payload).
            if len(str(data)) > 60:
                self.assertNotIn(str(data)[:40], str(e))
            return
        self.assertIsInstance(status.group_id, str)
        self.assertTrue(status.group_id)
        self.assertTrue(status.command_id is None or isinstance(status.command_id, str))

    @FUZZ
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        self.check(data)

    @FUZZ
    @given(json_values)
    def test_any_json_value(self, value: Any) -> None:
        self.check(encode(value))

    @FUZZ
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "group_id": device_ids | json_scalars,
                "payload": json_values,
                "command_id": st.text(max_size=10) | json_scalars,
                "_msgid": json_scalars,
                "topic": json_values,
            },
        )
    )
    def test_status_shaped_objects(self, obj: dict[str, Any]) -> None:
        self.check(encode(obj))

    @FUZZ
    @given(
        mutated(
            st.sampled_from(
                [
                    b'{"group_id":"dev-read","payload":{"on":true}}',
                    b'{"group_id":"a","payload":1,"command_id":"c","_msgid":"m"}',
                ]
            )
        )
    )
    def test_mutated_statuses(self, data: bytes) -> None:
        self.check(data)

    def test_deep_nesting_and_huge_numbers(self) -> None:
        for data in (
            b"[" * 100_000,
            b'{"group_id":"a","payload":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"group_id":"a","payload":1e400}',
            b'{"group_id":"a","payload":' + b"9" * 5000 + b"}",
            b'{"group_id":"a","payload":NaN}',
            b'{"group_id":"a","payload":1,"command_id":' + b"9" * 5000 + b"}",
        ):
            self.check(data)


# ------------------------------------------------------------------- tokens


def _mutations(token: str) -> st.SearchStrategy[str]:
    alphabet = st.sampled_from("ABCxyz019:-_=.+/ \x00é")

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        chars = list(token)
        for _ in range(draw(st.integers(1, 4))):
            how = draw(st.integers(0, 3))
            pos = draw(st.integers(0, len(chars)))
            if how == 0 and pos < len(chars):
                chars[pos] = draw(alphabet)
            elif how == 1:
                chars.insert(pos, draw(alphabet))
            elif how == 2 and pos < len(chars):
                del chars[pos]
            else:
                parts = "".join(chars).split(":")
                draw_index = draw(st.integers(0, len(parts) - 1))
                parts[draw_index] = draw(st.text(max_size=30))
                chars = list(":".join(parts))
        return "".join(chars)

    return mutate() | st.text(max_size=200)


class TokenFuzzTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        from tests.support import make_user, reset_database

        reset_database()
        self.user = make_user("fuzz", "a-long-enough-password-1")

    def test_mutated_tokens_only_fail_authentication(self) -> None:
        from bridge import identity

        token = identity.make_token(self.user)

        @LIGHT
        @given(_mutations(token))
        def check(candidate: str) -> None:
            try:
                found = identity.identity_from_token(candidate)
            except identity.AuthenticationFailed:
                return
            # Only the untouched token may pass (no other string carries its HMAC).
            self.assertEqual(candidate, token)
            self.assertEqual(found.user_id, self.user.pk)

        check()

    def test_signed_garbage_only_fails_authentication(self) -> None:
        # Defence in depth: even a payload signed with the right key (which an
        # attacker does not have) must not crash the parser or name another user.
        from django.core import signing

        from bridge import identity

        @LIGHT
        @given(
            st.fixed_dictionaries(
                {},
                optional={"u": json_scalars | json_values, "h": json_values, "s": json_values},
            )
            | json_values
        )
        def check(payload: Any) -> None:
            token = signing.dumps(payload, salt=identity.TOKEN_SALT, compress=False)
            try:
                found = identity.identity_from_token(token)
            except identity.AuthenticationFailed:
                return
            self.assertEqual(found.user_id, self.user.pk)
            self.assertEqual(payload.get("h"), self.user.get_session_auth_hash()[:16])

        check()


# ----------------------------------------------------------------- envelope

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _sealed(payload: Any, aad: bytes, key: bytes = KEY) -> dict[str, Any]:
    return envelope.seal(payload, key, envelope.key_id(key), aad)


class EnvelopeFuzzTests(unittest.SynchronousTestCase):
    keys = {envelope.key_id(KEY): KEY}

    def opens_or_refuses(self, candidate: Any, aad: bytes) -> Any:
        try:
            return envelope.open_(candidate, self.keys, aad)
        except envelope.EnvelopeError as e:
            text = str(e)
            self.assertNotIn(KEY.hex(), text)
            return e

    @FUZZ
    @given(json_values)
    def test_any_json_is_refused_unless_sealed(self, value: Any) -> None:
        result = self.opens_or_refuses(value, envelope.status_aad("a", None))
        self.assertIsInstance(result, envelope.EnvelopeError)

    @FUZZ
    @given(
        json_values.filter(lambda v: not isinstance(v, float) or math.isfinite(v)),
        st.sampled_from(["v", "kid", "alg", "nonce", "ct", "tag"]),
        json_values | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    )
    def test_any_changed_field_is_refused(self, payload: Any, name: str, value: Any) -> None:
        aad = envelope.status_aad("dev", "cmd")
        sealed = _sealed(payload, aad)
        self.assertEqual(envelope.open_(sealed, self.keys, aad), payload)
        changed = {**sealed, name: value}
        result = self.opens_or_refuses(changed, aad)
        if not isinstance(result, envelope.EnvelopeError):
            # Only a value equal to the original (or an equal "v") can open.
            self.assertEqual(changed[name], sealed[name])
            self.assertEqual(result, payload)

    @FUZZ
    @given(
        st.integers(0, 2),
        st.integers(0, 10_000),
        st.integers(1, 255),
        json_values,
    )
    def test_flipped_bits_are_refused(self, which: int, pos: int, flip: int, payload: Any) -> None:
        aad = envelope.command_aad("dev", "cmd", "alice", 123)
        sealed = _sealed(payload, aad)
        name = ("nonce", "ct", "tag")[which]
        raw = bytearray(base64.b64decode(sealed[name]))
        if not raw:
            return
        raw[pos % len(raw)] ^= flip
        changed = {**sealed, name: base64.b64encode(bytes(raw)).decode()}
        self.assertIsInstance(self.opens_or_refuses(changed, aad), envelope.EnvelopeError)

    @FUZZ
    @given(json_values, st.text(max_size=10), st.text(max_size=10) | st.none())
    def test_wrong_binding_or_key_is_refused(
        self, payload: Any, device: str, command: str | None
    ) -> None:
        aad = envelope.status_aad("dev", "cmd")
        sealed = _sealed(payload, aad)
        if (device, command) != ("dev", "cmd"):
            wrong = self.opens_or_refuses(sealed, envelope.status_aad(device, command))
            self.assertIsInstance(wrong, envelope.EnvelopeError)
        other = _sealed(payload, aad, OTHER_KEY)
        self.assertIsInstance(self.opens_or_refuses(other, aad), envelope.EnvelopeError)
        # A sealed command cannot be passed off as a status, nor the reverse.
        as_command = envelope.command_aad("dev", "cmd", None, 0)
        self.assertIsInstance(self.opens_or_refuses(sealed, as_command), envelope.EnvelopeError)

    @FUZZ
    @given(mutated(st.just(json.dumps(_sealed({"on": True}, b"x")).encode())))
    def test_mutated_envelope_text(self, data: bytes) -> None:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            return
        self.opens_or_refuses(value, b"x")

    def test_huge_fields_are_refused_cheaply(self) -> None:
        aad = b"x"
        sealed = _sealed(1, aad)
        for name, value in (
            ("ct", "A" * (envelope.MAX_PLAINTEXT_BYTES * 2)),
            ("nonce", "A" * 4000),
            ("kid", "k" * 100_000),
        ):
            result = self.opens_or_refuses({**sealed, name: value}, aad)
            self.assertIsInstance(result, envelope.EnvelopeError)

    def test_random_keys_files(self) -> None:
        # load_keys on garbage: an EnvelopeError naming the file, never the content.
        import tempfile

        for data in (os.urandom(31), os.urandom(33), b"\xff" * 64, b"zz" * 32 + b"\n", b""):
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                try:
                    envelope.load_keys(f.name)
                except envelope.EnvelopeError as e:
                    self.assertIn(f.name, str(e))
