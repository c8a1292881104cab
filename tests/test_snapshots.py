"""Sessions taken over by another process, from snapshots (no sockets).

Two hubs stand for two processes that heard the same statuses: the session
lives on one, is snapshotted, crosses as JSON, and is resumed on the other.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from bridge import snapshots
from bridge.hub import DeviceConfig, HistoryEntry, Hub
from bridge.session import DeviceView, Identity, Limits, Permission, Role, Session
from tests.test_hub import FakeRecorder, FakeUpstream
from tests.test_session import Link

ANN = Identity(Role.OPERATOR, user_id=1, username="ann", auth_hash="h", session_key="k")
GRANTS = {
    "t": DeviceView("t", "Toggle", "toggle", 10, Permission.CHANGE),
    "s": DeviceView("s", "Sensor", "sensor", 10, Permission.READ),
}
WALL = 1_800_000_000.0
TIMES = itertools.count(1_800_000_000_000)


class Replica:
    """A hub with the two devices, on its own clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.upstream = FakeUpstream()
        self.recorder = FakeRecorder()
        self.hub = Hub(self.clock, self.upstream, self.recorder)
        for device in ("t", "s"):
            self.hub.set_device(DeviceConfig(device, device, "toggle", history_size=10))
        self.hub.upstream_state(True)

    def hear(
        self, device: str, payload: Any, n: int, command_id: str | None = None, ts: int = 0
    ) -> None:
        """A status the cluster accepted, with its shared ordinal (and the leader's clock)."""
        ts = ts or next(TIMES)
        by = "ann" if command_id else None
        self.hub.apply_remote_status(device, HistoryEntry(payload, ts, by, command_id, n))


def statuses(frames: list[dict[str, Any]]) -> list[Any]:
    return [f["d"]["payload"] for f in frames if f["op"] == 5]


def parse(frames: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(f) for f in frames]


class SnapshotTestCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.a, self.b = Replica(), Replica()

    def viewer(
        self, replica: Replica, devices: tuple[str, ...] = ("t", "s")
    ) -> tuple[Session, Link]:
        session = Session("sid-1", Limits(), replica.clock.seconds())
        link = Link()
        session.attach(link, replica.clock.seconds())
        session.identified(ANN, GRANTS, replica.hub.is_online)
        replica.hub.register(session)
        session.subscriptions.update(devices)
        replica.hub.subscribe(session, devices, history=False)
        return session, link

    def both_hear(self, device: str, payload: Any, n: int) -> None:
        ts = next(TIMES)
        self.a.hear(device, payload, n, ts=ts)
        self.b.hear(device, payload, n, ts=ts)

    def cross(self, data: dict[str, Any]) -> dict[str, Any]:
        """Through JSON, as over Redis or a file."""
        loaded: dict[str, Any] = json.loads(json.dumps(data))
        return loaded

    def resume(
        self, session: Session, seq: int, grants: dict[str, DeviceView] = GRANTS
    ) -> tuple[list[dict[str, Any]], Link]:
        link = Link()
        frames, dropped = session.resume(seq, ANN, grants, link, self.b.clock.seconds())
        self.b.hub.drop_subscriptions(session, dropped)
        return parse(frames), link


class ExactSnapshotTests(SnapshotTestCase):
    def test_resume_elsewhere_replays_exactly_what_the_original_would(self) -> None:
        session, link = self.viewer(self.a)
        for i in range(1, 6):
            self.both_hear("t" if i % 2 else "s", i, (i + 1) // 2)
        seen = link.frames[-1]["s"]
        session.detach(self.a.clock.seconds())
        self.a.clock.advance(5)
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL + 2, seen - 2)
        assert moved is not None
        frames, _ = self.resume(moved, seen - 2)
        self.assertEqual([f["s"] for f in frames], [seen - 1, seen, seen + 1])
        self.assertEqual(statuses(frames), [4, 5])
        self.assertEqual(frames[-1]["t"], "RESUMED")
        self.assertNotIn("recovered", frames[-1]["d"])
        # The taker goes on: new statuses reach the moved session once, numbered on.
        link = Link()
        moved.attach(link, self.b.clock.seconds())
        self.b.hear("t", 6, 4)
        self.assertEqual([(f["s"], f["d"]["payload"]) for f in link.frames], [(seen + 2, 6)])

    def test_statuses_heard_after_the_snapshot_are_replayed_from_history(self) -> None:
        session, link = self.viewer(self.a)
        self.both_hear("t", "before", 1)
        seen = link.frames[-1]["s"]
        session.detach(self.a.clock.seconds())
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        self.b.hear("t", "during", 2)
        self.b.hear("s", "during-s", 1)
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL + 1, seen)
        assert moved is not None
        frames, _ = self.resume(moved, seen)
        self.assertEqual(statuses(frames), ["during", "during-s"])
        self.assertEqual([f["s"] for f in frames], list(range(seen + 1, seen + 4)))

    def test_a_taker_behind_the_snapshot_does_not_repeat_what_the_session_had(self) -> None:
        session, link = self.viewer(self.a)
        self.a.hear("t", 1, 1)
        self.a.hear("t", 2, 2)  # the taker has not heard these yet
        session.detach(self.a.clock.seconds())
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, link.frames[-1]["s"])
        assert moved is not None
        frames, new_link = self.resume(moved, link.frames[-1]["s"])
        self.assertEqual(statuses(frames), [])
        for n in (1, 2, 3):
            self.b.hear("t", n, n)
        self.assertEqual(statuses(new_link.frames), [3])

    def test_frames_shared_by_sessions_are_written_once(self) -> None:
        first, _ = self.viewer(self.a)
        second = Session("sid-2", Limits(), self.a.clock.seconds())
        second.attach(Link(), self.a.clock.seconds())
        second.identified(ANN, GRANTS, self.a.hub.is_online)
        second.subscriptions.add("t")
        self.a.hub.subscribe(second, ("t",), history=False)
        for n in range(1, 4):
            self.a.hear("t", n, n)
        table = snapshots.FrameTable()
        one = snapshots.take(first, self.a.hub, WALL, table)
        two = snapshots.take(second, self.a.hub, WALL, table)
        # Three statuses shared, and SUBSCRIBED to "t" (without history the
        # same frame for every session), then SUBSCRIBED to "s"; READY is each
        # session's own.
        self.assertEqual(len(table.frames), 3 + 2 + 2)
        self.assertEqual(set(one["kept"][-3:]), set(two["kept"][-3:]))
        frames = snapshots.dispatches(self.cross({"f": table.frames})["f"])
        moved = snapshots.restore(self.cross(two), self.b.hub, Limits(), WALL, 0, frames)
        assert moved is not None
        replay, _ = self.resume(moved, 0)
        self.assertEqual([f.get("t") for f in replay][:2], ["READY", "SUBSCRIBED"])

    def test_only_frames_after_the_clients_seq_travel(self) -> None:
        session, link = self.viewer(self.a)
        for n in range(1, 6):
            self.a.hear("t", n, n)
        last = link.frames[-1]["s"]
        data = snapshots.take(session, self.a.hub, WALL, after=last - 2)
        self.assertEqual(len(data["kept"]), 2)
        self.assertEqual(data["first"], last - 1)

    def test_a_seq_never_sent_still_travels_so_the_taker_can_answer_4007(self) -> None:
        session, link = self.viewer(self.a)
        last = link.frames[-1]["s"]
        data = self.cross(snapshots.take(session, self.a.hub, WALL, after=last + 5))
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, last + 5)
        assert moved is not None
        self.assertEqual(moved.seq, last)  # RESUME's seq > the session's: 4007

    def test_a_session_past_its_resume_window_is_not_restored(self) -> None:
        session, _ = self.viewer(self.a)
        session.detach(self.a.clock.seconds())
        self.a.clock.advance(50)
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        self.assertIsNone(snapshots.restore(data, self.b.hub, Limits(), WALL + 11, 0))
        self.assertEqual(self.b.hub.sessions, {})

    def test_grants_withdrawn_meanwhile_come_back_as_device_removed(self) -> None:
        session, link = self.viewer(self.a)
        seen = link.frames[-1]["s"]
        session.detach(self.a.clock.seconds())
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, seen)
        assert moved is not None
        frames, new_link = self.resume(moved, seen, {"t": GRANTS["t"]})
        self.assertEqual(
            [(f.get("t"), f["d"].get("device")) for f in frames],
            [("DEVICE_REMOVED", "s"), ("RESUMED", None)],
        )
        self.b.hear("s", "hidden", 1)
        self.assertEqual(new_link.frames, [])

    def test_a_device_that_went_offline_meanwhile_is_told(self) -> None:
        session, link = self.viewer(self.a, ("t",))
        seen = link.frames[-1]["s"]
        session.detach(self.a.clock.seconds())
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        self.b.hub.upstream_state(False)
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, seen)
        assert moved is not None
        frames, _ = self.resume(moved, seen)
        self.assertEqual(frames[0]["d"], {"device": "t", "online": False})


class CheckpointTests(SnapshotTestCase):
    def checkpoint(self, session: Session, marks: list[list[Any]]) -> dict[str, Any]:
        data = snapshots.static_part(session)
        data.update(snapshots.dynamic_part(session, self.a.hub, WALL, marks))
        return self.cross(data)

    def test_recovery_replays_every_status_after_the_clients_mark(self) -> None:
        session, link = self.viewer(self.a)
        self.both_hear("t", 1, 1)
        mark = [session.seq, snapshots.cursors_of(session, self.a.hub)]
        self.both_hear("t", 2, 2)
        self.both_hear("s", 3, 1)
        client_seq = link.frames[-1]["s"]  # the client got everything
        data = self.checkpoint(session, [mark])
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL + 1, client_seq)
        assert moved is not None
        frames, _ = self.resume(moved, client_seq)
        # At least once: 2 and 3 again (the checkpoint predates them), nothing lost.
        self.assertEqual(statuses(frames), [2, 3])
        self.assertEqual(frames[0]["s"], client_seq + 1)
        self.assertEqual(frames[-1]["d"]["recovered"], True)
        states = [f["d"] for f in frames if f.get("t") == "DEVICE_STATE"]
        self.assertEqual(states, [{"device": "s", "online": True}, {"device": "t", "online": True}])

    def test_a_client_behind_every_mark_gets_all_that_history_holds(self) -> None:
        session, link = self.viewer(self.a)
        early = link.frames[-1]["s"]
        for n in (1, 2):
            self.both_hear("t", n, n)
        data = self.checkpoint(session, [[session.seq, snapshots.cursors_of(session, self.a.hub)]])
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, early)
        assert moved is not None
        frames, _ = self.resume(moved, early)
        self.assertEqual(statuses(frames), [1, 2])

    def test_a_status_held_for_a_slow_connection_is_not_counted_as_had(self) -> None:
        session, link = self.viewer(self.a, ("t",))
        self.both_hear("t", 1, 1)
        session.pause_output(self.a.clock.seconds())
        self.both_hear("t", 2, 2)
        self.both_hear("t", 3, 3)  # replaces 2: only the newest waits
        self.assertEqual(snapshots.cursors_of(session, self.a.hub), {"t": 2})
        data = self.checkpoint(session, [[session.seq, snapshots.cursors_of(session, self.a.hub)]])
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, link.frames[-1]["s"])
        assert moved is not None
        frames, _ = self.resume(moved, link.frames[-1]["s"])
        self.assertEqual(statuses(frames), [3])


class AdoptedCommandTests(SnapshotTestCase):
    def operator_sends(self) -> tuple[Session, Link, str]:
        session, link = self.viewer(self.a, ("t",))
        from bridge import protocol

        command_id = self.a.hub.submit_command(session, protocol.Command("t", {"on": 1}, "c-1"))
        return session, link, command_id

    def moved(self, session: Session, link: Link) -> Session:
        seen = link.frames[-1]["s"]
        session.detach(self.a.clock.seconds())
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        self.assertEqual(
            [p[1] for p in data["pending"]], [self.a.hub.commands_of(session)[0][0].command_id]
        )
        self.a.hub.hand_over(session, "replica-b")
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, seen)
        assert moved is not None
        self.resume_link = Link()
        moved.resume(seen, ANN, GRANTS, self.resume_link, self.b.clock.seconds())
        return moved

    def results(self) -> list[str]:
        return [d["result"] for d in self.resume_link.events("COMMAND_RESULT")]

    def test_a_status_carrying_the_command_id_confirms_it_on_the_taker(self) -> None:
        session, link, command_id = self.operator_sends()
        self.moved(session, link)
        self.b.hear("t", {"on": 1}, 1, command_id)
        self.assertEqual(self.results(), ["confirmed"])
        self.assertEqual(self.b.recorder.commands[-1].result, "confirmed")
        self.assertEqual(self.b.recorder.commands[-1].command_id, command_id)

    def test_the_original_replica_passes_its_result_on(self) -> None:
        session, link, command_id = self.operator_sends()
        results: list[tuple[str, str, str]] = []

        class Bus:
            command_grace = 2.0

            def publish_status(self, *args: Any) -> None:
                pass

            def command_result(self, origin: str, cid: str, result: str, detail: str) -> None:
                results.append((origin, cid, result))

        self.a.hub.bus = Bus()
        self.moved(session, link)
        self.a.clock.advance(6)  # the original times it out...
        self.assertEqual(results, [("replica-b", command_id, "timeout")])
        self.assertEqual(self.a.recorder.commands[-1].result, "sent", "not audited twice")
        # ...and the taker hears of it over the bus.
        self.b.hub.remote_command_result(command_id, "timeout", "no confirmation")
        self.assertEqual(self.results(), ["timeout"])

    def test_with_no_word_at_all_the_taker_times_it_out(self) -> None:
        session, link, _ = self.operator_sends()
        self.moved(session, link)
        self.b.clock.advance(4.9)
        self.assertEqual(self.results(), [])
        self.b.clock.advance(0.2)
        self.assertEqual(self.results(), ["timeout"])

    def test_confirmed_in_transit_is_told_after_the_replay(self) -> None:
        session, link, command_id = self.operator_sends()
        seen = link.frames[-1]["s"]
        session.detach(self.a.clock.seconds())
        data = self.cross(snapshots.take(session, self.a.hub, WALL))
        self.b.hear("t", {"on": 1}, 1, command_id)
        moved = snapshots.restore(data, self.b.hub, Limits(), WALL, seen)
        assert moved is not None
        frames, _ = self.resume(moved, seen)
        kinds = [f.get("t") or f["op"] for f in frames]
        self.assertEqual(kinds, [5, "COMMAND_RESULT", "RESUMED"])
        self.assertEqual(frames[1]["d"]["result"], "confirmed")


class FormatTests(unittest.SynchronousTestCase):
    def test_identity_round_trip(self) -> None:
        for identity in (ANN, Identity(Role.DEVICE, device_id="d"), Identity(Role.ANONYMOUS)):
            self.assertEqual(snapshots.identity_from(snapshots.identity_json(identity)), identity)

    def test_unknown_version_is_refused(self) -> None:
        replica = Replica()
        with self.assertRaises(snapshots.SnapshotError):
            snapshots.restore({"v": 99}, replica.hub, Limits(), WALL, 0)
