"""Frame decoding and encoding, without sockets (spec §2, §6)."""

from __future__ import annotations

import gc
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from bridge import protocol
from bridge.protocol import CloseCode, ProtocolError


class DecodeTests(unittest.SynchronousTestCase):
    def assertRejected(self, data: bytes | str, code: CloseCode) -> None:
        with self.assertRaises(ProtocolError) as caught:
            protocol.decode(data)
        self.assertEqual(caught.exception.code, code)

    def test_not_json_or_not_object_is_4002(self) -> None:
        for data in (b"", b"nope", b"[1]", b'"x"', b"1", b"null", b"\xff\xfe{}", b'{"op": NaN}'):
            self.assertRejected(data, CloseCode.DECODE_ERROR)

    def test_lone_surrogates_are_4002_and_pairs_are_characters(self) -> None:
        # A lone surrogate decodes to a str that cannot be encoded again: echoing it
        # (UNSUBSCRIBED, COMMAND_RESULT) or storing it (audit) would raise later.
        for data in (
            rb'{"op":8,"d":{"devices":["\ud800"]}}',
            rb'{"op":4,"d":{"device":"a","payload":"\udfff","id":"x"}}',
            rb'{"op":1,"\uDBFF":null}',
            rb'{"op":1,"d":null,"x":"\ud83d"}',
        ):
            self.assertRejected(data, CloseCode.DECODE_ERROR)
        self.assertEqual(
            protocol.decode(rb'{"op":4,"d":{"device":"a","payload":"\ud83d\ude00","id":"x"}}'),
            protocol.Command("a", "\U0001f600", "x"),
        )
        self.assertEqual(protocol.decode(rb'{"op":1,"x":"\\ud800"}'), protocol.Heartbeat(None))

    def test_numbers_no_double_holds_are_4002(self) -> None:
        for literal in ("1e400", "-1e400", "1" * 400 + ".0", "1E309"):
            frame = '{"op":4,"d":{"device":"a","payload":[' + literal + '],"id":"x"}}'
            self.assertRejected(frame, CloseCode.DECODE_ERROR)
        big = protocol.decode('{"op":4,"d":{"device":"a","payload":[1e308, 5e-324],"id":"x"}}')
        self.assertEqual(big, protocol.Command("a", [1e308, 5e-324], "x"))

    def test_utf16_is_not_accepted(self) -> None:
        self.assertRejected('{"op": 1}'.encode("utf-16"), CloseCode.DECODE_ERROR)

    def test_op_must_be_an_integer(self) -> None:
        for frame in ({}, {"op": "1"}, {"op": 1.0}, {"op": True}, {"op": None}):
            self.assertRejected(json.dumps(frame), CloseCode.DECODE_ERROR)

    def test_unknown_op_is_4001(self) -> None:
        for op in (-1, 10, 99, 2**70):
            self.assertRejected(json.dumps({"op": op}), CloseCode.UNKNOWN_OP)

    def test_server_ops_decode_as_server_only(self) -> None:
        self.assertEqual(protocol.decode('{"op":0}'), protocol.ServerOnly(protocol.Op.HELLO))
        self.assertEqual(protocol.decode('{"op":6}'), protocol.ServerOnly(protocol.Op.EVENT))

    def test_heartbeat(self) -> None:
        self.assertEqual(protocol.decode('{"op":1,"d":null}'), protocol.Heartbeat(None))
        self.assertEqual(protocol.decode('{"op":1}'), protocol.Heartbeat(None))
        self.assertEqual(protocol.decode('{"op":1,"d":42}'), protocol.Heartbeat(42))
        self.assertRejected('{"op":1,"d":"42"}', CloseCode.DECODE_ERROR)
        self.assertEqual(protocol.decode('{"op":2}'), protocol.HeartbeatAck())

    def test_identify_forms(self) -> None:
        self.assertEqual(
            protocol.decode('{"op":3,"d":{"token":"t"}}'), protocol.Identify(token="t")
        )
        self.assertEqual(
            protocol.decode('{"op":3,"d":{"device_key":"k"}}'), protocol.Identify(device_key="k")
        )
        self.assertTrue(protocol.decode('{"op":3,"d":{}}').anonymous)  # type: ignore[union-attr]
        self.assertRejected('{"op":3}', CloseCode.DECODE_ERROR)
        self.assertRejected('{"op":3,"d":{"token":1}}', CloseCode.DECODE_ERROR)
        self.assertRejected('{"op":3,"d":{"token":"a","device_key":"b"}}', CloseCode.DECODE_ERROR)

    def test_command(self) -> None:
        msg = protocol.decode('{"op":4,"d":{"device":"a","payload":{"on":true},"id":"c"}}')
        self.assertEqual(msg, protocol.Command("a", {"on": True}, "c"))
        null_payload = protocol.decode('{"op":4,"d":{"device":"a","payload":null,"id":"c"}}')
        self.assertEqual(null_payload, protocol.Command("a", None, "c"))
        for d in (
            {"payload": 1, "id": "c"},
            {"device": 1, "payload": 1, "id": "c"},
            {"device": "a", "id": "c"},
            {"device": "a", "payload": 1},
            {"device": "a", "payload": 1, "id": 3},
            {"device": "a", "payload": 1, "id": "x" * 129},
        ):
            self.assertRejected(json.dumps({"op": 4, "d": d}), CloseCode.DECODE_ERROR)

    def test_subscribe_and_unsubscribe(self) -> None:
        msg = protocol.decode('{"op":7,"d":{"devices":["a","b","a"]}}')
        self.assertEqual(msg, protocol.Subscribe(("a", "b"), True))
        msg = protocol.decode('{"op":7,"d":{"devices":[],"history":false}}')
        self.assertEqual(msg, protocol.Subscribe((), False))
        self.assertEqual(
            protocol.decode('{"op":8,"d":{"devices":["a"]}}'), protocol.Unsubscribe(("a",))
        )
        for d in ({}, {"devices": "a"}, {"devices": [1]}, {"devices": ["a"], "history": 1}):
            self.assertRejected(json.dumps({"op": 7, "d": d}), CloseCode.DECODE_ERROR)
        self.assertRejected(
            json.dumps({"op": 7, "d": {"devices": [str(i) for i in range(1001)]}}),
            CloseCode.DECODE_ERROR,
        )

    def test_resume(self) -> None:
        msg = protocol.decode('{"op":9,"d":{"session_id":"s","seq":3,"token":"t"}}')
        self.assertEqual(msg, protocol.Resume("s", 3, "t"))
        self.assertEqual(
            protocol.decode('{"op":9,"d":{"session_id":"s","seq":0}}'),
            protocol.Resume("s", 0, None),
        )
        for d in ({"seq": 1}, {"session_id": "s"}, {"session_id": "s", "seq": -1}):
            self.assertRejected(json.dumps({"op": 9, "d": d}), CloseCode.DECODE_ERROR)

    def test_deep_nesting_is_a_decode_error_not_a_crash(self) -> None:
        self.assertRejected("[" * 100_000 + "]" * 100_000, CloseCode.DECODE_ERROR)

    @given(st.binary(max_size=200))
    def test_any_bytes_decode_or_raise_protocol_error(self, data: bytes) -> None:
        try:
            protocol.decode(data)
        except ProtocolError as e:
            self.assertIn(e.code, (CloseCode.DECODE_ERROR, CloseCode.UNKNOWN_OP))

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.sampled_from(["op", "d", "devices", "token", "seq"]), children)
            ),
            max_leaves=12,
        )
    )
    def test_any_json_decodes_or_raises_protocol_error(self, value: object) -> None:
        try:
            protocol.decode(json.dumps(value))
        except ProtocolError as e:
            self.assertIn(e.code, (CloseCode.DECODE_ERROR, CloseCode.UNKNOWN_OP))


class EncodeTests(unittest.SynchronousTestCase):
    def test_status_dispatch_is_numbered_per_connection_without_reencoding(self) -> None:
        body = protocol.status_body("dev", {"v": 1}, 123, "ann", "cid")
        dispatch = protocol.status_dispatch("dev", body)
        first, second = (
            json.loads(protocol.frame(dispatch, 7)),
            json.loads(protocol.frame(dispatch, 8)),
        )
        self.assertEqual(first["op"], 5)
        self.assertEqual(first["s"], 7)
        self.assertEqual(second["s"], 8)
        self.assertEqual(
            first["d"],
            {"device": "dev", "payload": {"v": 1}, "ts": 123, "by": "ann", "command_id": "cid"},
        )
        self.assertNotIn("t", first)
        self.assertEqual(dispatch[1], "dev")
        gc.collect()
        self.assertFalse(gc.is_tracked(dispatch), "replay buffers must not grow full collections")

    @given(
        device=st.text(max_size=8),
        by=st.none() | st.text(max_size=8),
        command_id=st.none() | st.text(max_size=8),
        payload=st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=3), children, max_size=3)
            ),
            max_leaves=8,
        ),
    )
    def test_status_body_is_the_compact_strict_json_of_its_fields(
        self, device: str, by: str | None, command_id: str | None, payload: object
    ) -> None:
        """Byte for byte what json.dumps makes, however the encoding is sped up."""
        want = json.dumps(
            {"device": device, "payload": payload, "ts": 17, "by": by, "command_id": command_id},
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode()
        self.assertEqual(protocol.status_body(device, payload, 17, by, command_id), want)

    def test_dumps_refuses_what_json_cannot_carry(self) -> None:
        for bad in (float("nan"), [float("inf")], {"a": float("-inf")}):
            self.assertRaises(ValueError, protocol.dumps, bad)
        self.assertRaises(TypeError, protocol.dumps, {"a": object()})
        self.assertEqual(protocol.dumps({"é": "\u2028\n"}), '{"é":"\u2028\\n"}'.encode())

    def test_event_dispatch_carries_t(self) -> None:
        frame = json.loads(protocol.frame(protocol.event_dispatch("READY", {"a": "é"}), 1))
        self.assertEqual(frame, {"op": 6, "t": "READY", "d": {"a": "é"}, "s": 1})

    def test_hello(self) -> None:
        hello = json.loads(protocol.hello(30000, "sid"))
        self.assertEqual(
            hello,
            {"op": 0, "d": {"heartbeat_interval": 30000, "session_id": "sid", "protocol": 1}},
        )
        self.assertNotIn("s", hello)

    def test_json_safety(self) -> None:
        self.assertTrue(protocol.is_json_safe({"a": [1, 2.5, None, "x"]}))
        self.assertFalse(protocol.is_json_safe({"a": [float("nan")]}))
        self.assertFalse(protocol.is_json_safe(float("inf")))

    def test_device_ids(self) -> None:
        self.assertTrue(protocol.is_device_id("Ab-_09"))
        for bad in ("", "a b", "a/b", "x" * 65, 3, None, "é"):
            self.assertFalse(protocol.is_device_id(bad))
