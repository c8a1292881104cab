"""The vault: sessions kept across restarts and moved between replicas (fake Redis).

The real-Redis, real-process behaviour is in tests/test_replicas.py and
tests/test_continuity.py; here each path of the vault is driven on its own.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial import unittest

from bridge import snapshots
from bridge.session import Limits, Session
from bridge.vault import CLAIM_CHECKPOINT, CLAIM_KEY, FileVault, RedisVault, principal
from tests.test_session import Link
from tests.test_snapshots import ANN, WALL, Replica, SnapshotTestCase


class FakeBus:
    """Records commands; answers them from ``replies`` (a function of the command)."""

    def __init__(self) -> None:
        self.up = True
        self.listeners: list[Callable[[bool], None]] = []
        self.handlers: dict[str, Callable[[str], None]] = {}
        self.commands: list[tuple[Any, ...]] = []
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.replies: Callable[[tuple[Any, ...]], Any] = lambda command: None

    def key(self, name: str) -> str:
        return f"p:{name}"

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        self.handlers[channel] = handler

    def execute(self, *args: Any) -> Deferred[Any]:
        self.commands.append(args)
        try:
            return succeed(self.replies(args))
        except Exception as e:
            return fail(e)

    def publish(self, channel: str, message: str) -> None:
        self.published.append((channel, json.loads(message)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.commands if c[0] == name]


class RedisVaultTestCase(SnapshotTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.bus = FakeBus()
        self.vault = RedisVault(self.bus, self.b.hub, Limits(), self.b.clock, "replica-b")
        self.vault.wall = lambda: WALL

    def settle(self) -> None:
        """Let a checkpoint pass run all its slices."""
        for _ in range(100):
            self.b.clock.advance(0)


class CheckpointWriterTests(RedisVaultTestCase):
    def sessions(self, n: int) -> list[Session]:
        made = []
        for i in range(n):
            session = Session(f"{self.vault.tag}.s{i}", Limits(), self.b.clock.seconds())
            session.attach(Link(), self.b.clock.seconds())
            session.identified(ANN, {"t": self.grants["t"]}, self.b.hub.is_online)
            self.b.hub.register(session)
            session.subscriptions.add("t")
            self.b.hub.subscribe(session, ("t",), history=False)
            made.append(session)
        return made

    @property
    def grants(self) -> Any:
        from tests.test_snapshots import GRANTS

        return GRANTS

    def written(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for command in self.bus.named("HSET"):
            pairs = command[2:]
            fields.update(zip(pairs[::2], pairs[1::2], strict=True))
        return fields

    def test_a_pass_writes_each_session_once_in_slices(self) -> None:
        self.vault.slice = 2
        self.sessions(5)
        self.vault.tick()
        self.assertEqual(len(self.bus.named("HSET")), 1, "one slice per reactor turn")
        self.settle()
        self.assertEqual(len(self.bus.named("HSET")), 3)
        fields = self.written()
        self.assertEqual(len(fields), 10, "static and dynamic part of each")
        static = fields[f"{self.vault.tag}.s0#s"]
        self.assertTrue(static.startswith(principal(ANN) + " "))
        self.assertEqual(json.loads(static.split(" ", 1)[1])["grants"][0][0], "t")
        self.assertEqual(self.bus.named("SET")[0][1], f"p:alive:{self.vault.tag}")

    def test_only_what_changed_is_written_again(self) -> None:
        self.sessions(3)
        self.vault.tick()
        self.settle()
        self.bus.commands.clear()
        self.vault.tick()
        self.settle()
        self.assertEqual(self.bus.named("HSET"), [])
        self.b.hear("t", 1, 1)
        self.vault.tick()
        self.settle()
        self.assertEqual(sorted(self.written()), [f"{self.vault.tag}.s{i}" for i in range(3)])

    def test_sessions_gone_are_deleted(self) -> None:
        [first, _] = self.sessions(2)
        self.vault.tick()
        self.settle()
        self.b.hub.forget(first)
        self.vault.tick()
        self.settle()
        [hdel] = self.bus.named("HDEL")
        self.assertEqual(hdel[2:], (first.session_id, f"{first.session_id}#s"))

    def test_a_checkpoint_restores_as_recovered(self) -> None:
        [session] = self.sessions(1)
        self.b.hear("t", 1, 1)
        self.vault.tick()
        self.settle()
        fields = self.written()
        data = json.loads(fields[f"{session.session_id}#s"].split(" ", 1)[1])
        data.update(json.loads(fields[session.session_id]))
        self.b.hear("t", 2, 2)
        moved = snapshots.restore(data, self.a.hub, Limits(), WALL, session.seq)
        assert moved is not None
        self.assertTrue(moved.recovered)


class ClaimTests(RedisVaultTestCase):
    def held_elsewhere(self) -> tuple[Session, dict[str, Any]]:
        session, link = self.viewer(self.a)
        self.both_hear("t", "x", 1)
        session.detach(self.a.clock.seconds())
        return session, snapshots.take(session, self.a.hub, WALL)

    def claim(self, session_id: str, seq: int) -> Any:
        results: list[Any] = []
        self.vault.claim(session_id, ANN, seq).addCallback(results.append)
        return results

    def test_a_parked_session_is_claimed_for_its_principal_only(self) -> None:
        session, data = self.held_elsewhere()
        who = principal(ANN) + " "

        def replies(command: tuple[Any, ...]) -> Any:
            if command[:2] == ("EVAL", CLAIM_KEY) and command[4] == who:
                return who + json.dumps(data)
            return None

        self.bus.replies = replies
        [claimed] = self.claim("rOTHER.abc", session.seq)
        self.assertIsNotNone(claimed)
        self.assertIn(claimed.session_id, self.b.hub.sessions)
        self.assertEqual(self.vault.counters["claimed_parked"], 1)

    def test_a_live_holder_is_asked_and_its_answer_restores_exactly(self) -> None:
        session, data = self.held_elsewhere()
        self.bus.replies = lambda c: 1 if c[0] == "EXISTS" else None
        results = self.claim("rHOLDER.abc", session.seq)
        [(channel, request)] = self.bus.published
        self.assertEqual(channel, "sx:rHOLDER")
        self.assertEqual((request["sid"], request["seq"]), ("rHOLDER.abc", session.seq))
        self.assertEqual(results, [])
        reply = {"k": "given", "rid": request["rid"], "snap": data}
        self.bus.handlers[f"sx:{self.vault.tag}"](json.dumps(reply))
        [claimed] = results
        self.assertFalse(claimed.recovered)
        self.assertEqual(claimed.seq, session.seq)

    def test_a_holder_that_never_answers_leaves_the_checkpoint(self) -> None:
        session, data = self.held_elsewhere()
        static = {k: data[k] for k in ("v", "id", "who", "grants")}
        dynamic = {k: v for k, v in data.items() if k not in static and k not in ("kept", "first")}
        who = principal(ANN) + " "

        def replies(command: tuple[Any, ...]) -> Any:
            if command[0] == "EXISTS":
                return 1
            if command[:2] == ("EVAL", CLAIM_CHECKPOINT):
                return [json.dumps(dynamic), who + json.dumps(static)]
            return None

        self.bus.replies = replies
        results = self.claim("rDEAD.abc", session.seq)
        self.b.clock.advance(self.vault.ask_timeout)
        [claimed] = results
        self.assertTrue(claimed.recovered)
        self.assertEqual(self.vault.counters["handover_timeouts"], 1)

    def test_a_holder_parking_meanwhile_is_looked_for_again(self) -> None:
        session, data = self.held_elsewhere()
        who = principal(ANN) + " "
        parked_yet = [False]

        def replies(command: tuple[Any, ...]) -> Any:
            if command[0] == "EXISTS":
                return 1
            if command[:2] == ("EVAL", CLAIM_KEY) and parked_yet[0]:
                return who + json.dumps(data)
            return None

        self.bus.replies = replies
        results = self.claim("rSTOPPING.abc", session.seq)
        [(_, request)] = self.bus.published
        parked_yet[0] = True  # it parked, then says it has nothing
        self.bus.handlers[f"sx:{self.vault.tag}"](
            json.dumps({"k": "given", "rid": request["rid"], "snap": None})
        )
        [claimed] = results
        self.assertIsNotNone(claimed)
        self.assertEqual(self.vault.counters["claimed_parked"], 1)

    def test_an_unknown_session_is_none_and_redis_errors_are_too(self) -> None:
        self.assertEqual(self.claim("rGONE.abc", 3), [None])

        def broken(command: tuple[Any, ...]) -> Any:
            raise ConnectionError("Redis is not connected")

        self.bus.replies = broken
        self.assertEqual(self.claim("rGONE.abc", 3), [None])
        self.assertEqual(self.vault.counters["claim_failures"], 1)


class HandOverTests(RedisVaultTestCase):
    def test_the_holder_gives_the_session_to_its_principal_only(self) -> None:
        session, link = self.viewer(self.b)
        replaced: list[bool] = []
        link.replaced = lambda: (replaced.append(True), session.detach(0.0))  # type: ignore[attr-defined]
        handler = self.bus.handlers[f"sx:{self.vault.tag}"]
        request = {"k": "take", "rid": "1", "sid": session.session_id, "seq": 0, "from": "rA"}
        handler(json.dumps({**request, "who": "operator|99| ", "o": "a"}))
        self.assertIsNone(self.bus.published[-1][1]["snap"], "another principal: nothing")
        self.assertIn(session.session_id, self.b.hub.sessions)
        handler(json.dumps({**request, "who": principal(ANN) + " ", "o": "replica-a"}))
        channel, reply = self.bus.published[-1]
        self.assertEqual(channel, "sx:rA")
        self.assertEqual(reply["snap"]["id"], session.session_id)
        self.assertEqual(replaced, [True], "the old connection is dropped")
        self.assertNotIn(session.session_id, self.b.hub.sessions)


class FileVaultTests(unittest.SynchronousTestCase):
    def test_sessions_outlive_a_restart_in_a_private_file(self) -> None:
        path = Path(self.mktemp())
        old = Replica()
        session = Session("sid", Limits(), old.clock.seconds())
        session.attach(Link(), old.clock.seconds())
        from tests.test_snapshots import GRANTS

        session.identified(ANN, GRANTS, old.hub.is_online)
        old.hub.register(session)
        FileVault(path, old.hub, Limits()).stopService()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        new = Replica()
        vault = FileVault(path, new.hub, Limits())
        vault.startService()
        self.assertIn("sid", new.hub.sessions)
        self.assertFalse(path.exists(), "a kept session is restored once")
        self.assertEqual(vault.restored, 1)

    def test_an_unreadable_file_is_logged_and_removed(self) -> None:
        path = Path(self.mktemp())
        path.write_text("{not json")
        FileVault(path, Replica().hub, Limits()).startService()
        self.assertFalse(path.exists())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
