"""The hub's fan-out, history and command lifecycle, driven by a fake clock."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from bridge import protocol
from bridge.hub import CommandRecord, DeviceConfig, HistoryEntry, Hub, IRecorder
from bridge.session import DeviceView, Identity, Limits, Permission, Role, Session
from bridge.upstream import IUpstream, IUpstreamListener, UpstreamCommand
from tests.test_session import Link


@implementer(IUpstream)
class FakeUpstream:
    description = "fake"

    def __init__(self) -> None:
        self.available = True
        self.sent: list[UpstreamCommand] = []
        self.listener: IUpstreamListener | None = None

    def attach(self, listener: IUpstreamListener) -> None:
        self.listener = listener

    def send_command(self, command: UpstreamCommand) -> bool:
        if not self.available:
            return False
        self.sent.append(command)
        return True

    def health(self) -> dict[str, Any]:
        return {"state": "up" if self.available else "down"}


@implementer(IRecorder)
class FakeRecorder:
    def __init__(self) -> None:
        self.statuses: list[tuple[str, HistoryEntry]] = []
        self.commands: list[CommandRecord] = []

    def status(self, device_id: str, entry: HistoryEntry, payload_json: bytes) -> None:
        self.assertion = json.loads(payload_json) == entry.payload
        self.statuses.append((device_id, entry))

    def command(self, record: CommandRecord) -> None:
        self.commands.append(record)


def identity(name: str) -> Identity:
    return Identity(Role.OPERATOR, user_id=hash(name) % 1000, username=name)


class HubTestCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.upstream = FakeUpstream()
        self.recorder = FakeRecorder()
        self.hub = Hub(self.clock, self.upstream, self.recorder)
        self.hub.set_device(
            DeviceConfig("t", "Toggle", "toggle", history_size=3, command_timeout=5.0)
        )
        self.hub.set_device(DeviceConfig("s", "Sensor", "sensor"))
        self.hub.upstream_state(True)

    def viewer(
        self, name: str = "ann", subscribe: tuple[str, ...] = ("t",)
    ) -> tuple[Session, Link]:
        session = Session(f"sid-{name}", Limits(), now=0.0)
        link = Link()
        session.attach(link, 0.0)
        grants = {d: DeviceView(d, d, "k", 3, Permission.CHANGE) for d in ("t", "s")}
        session.identified(identity(name), grants, self.hub.is_online)
        self.hub.register(session)
        session.subscriptions.update(subscribe)
        self.hub.subscribe(session, subscribe, history=True)
        return session, link

    def statuses(self, link: Link) -> list[dict[str, Any]]:
        return [f["d"] for f in link.frames if f["op"] == 5]

    def results(self, link: Link) -> list[str]:
        return [d["result"] for d in link.events("COMMAND_RESULT")]


class FanOutTests(HubTestCase):
    def test_status_reaches_every_subscriber_once_and_only_them(self) -> None:
        _, a = self.viewer("ann")
        _, b = self.viewer("bob")
        _, c = self.viewer("cy", subscribe=("s",))
        self.hub.upstream_status("t", {"on": True}, None)
        for link in (a, b):
            [status] = self.statuses(link)
            self.assertEqual(
                status,
                {
                    "device": "t",
                    "payload": {"on": True},
                    "ts": 1_700_000_000_000,
                    "by": None,
                    "command_id": None,
                },
            )
        self.assertEqual(self.statuses(c), [])
        self.assertEqual(self.hub.counters["deliveries"], 2)
        self.assertTrue(self.recorder.assertion, "the recorder gets the payload's JSON")

    def test_status_is_encoded_once(self) -> None:
        calls = []
        original = protocol.status_body_json

        def counting(*args: Any) -> bytes:
            calls.append(args)
            return original(*args)

        self.patch(protocol, "status_body_json", counting)
        for name in ("a", "b", "c", "d"):
            self.viewer(name)
        self.hub.upstream_status("t", 1, None)
        self.assertEqual(len(calls), 1)

    def test_unknown_device_is_dropped_and_counted(self) -> None:
        _, a = self.viewer()
        self.hub.upstream_status("nope", 1, None)
        self.assertEqual(self.hub.counters["statuses_unknown_device"], 1)
        self.assertEqual(self.statuses(a), [])

    def test_non_json_payload_is_dropped(self) -> None:
        _, a = self.viewer()
        self.hub.upstream_status("t", float("nan"), None)
        self.assertEqual(self.statuses(a), [])
        self.assertEqual(self.hub.counters["statuses_invalid"], 1)

    def test_history_keeps_last_n_and_is_replayed_on_subscribe(self) -> None:
        for i in range(5):
            self.hub.upstream_status("t", i, None)
        self.assertEqual([e.payload for _, e in self.recorder.statuses], [0, 1, 2, 3, 4])
        _, link = self.viewer()
        [subscribed] = link.events("SUBSCRIBED")
        self.assertEqual([h["payload"] for h in subscribed["history"]], [2, 3, 4])
        self.assertEqual(set(subscribed["history"][0]), {"payload", "ts", "by"})

    def test_history_size_changes_at_runtime(self) -> None:
        for i in range(3):
            self.hub.upstream_status("t", i, None)
        self.hub.set_device(DeviceConfig("t", "Toggle", "toggle", history_size=1))
        self.assertEqual(
            self.hub.history("t"), [{"payload": 2, "ts": 1_700_000_000_000, "by": None}]
        )
        self.hub.set_device(DeviceConfig("t", "Toggle", "toggle", history_size=10))
        for i in range(3, 6):
            self.hub.upstream_status("t", i, None)
        self.assertEqual([h["payload"] for h in self.hub.history("t")], [2, 3, 4, 5])

    def test_unsubscribe_stops_statuses(self) -> None:
        session, link = self.viewer()
        self.hub.unsubscribe(session, ["t"])
        self.hub.upstream_status("t", 1, None)
        self.assertEqual(self.statuses(link), [])
        self.assertEqual(link.events("UNSUBSCRIBED"), [{"device": "t"}])

    def test_link_state_reaches_subscribers(self) -> None:
        _, link = self.viewer()
        self.hub.upstream_state(False)
        self.hub.upstream_state(False)
        self.hub.upstream_state(True)
        self.assertEqual(
            link.events("DEVICE_STATE"),
            [{"device": "t", "online": False}, {"device": "t", "online": True}],
        )


class OrdinalTests(HubTestCase):
    """Each status's ordinal in its device's history, which snapshots rely on."""

    def test_statuses_are_numbered_per_device(self) -> None:
        for payload in (1, 2, 3):
            self.hub.upstream_status("t", payload, None)
        self.hub.upstream_status("s", 9, None)
        self.assertEqual([e.n for _, e in self.recorder.statuses], [1, 2, 3, 1])
        self.assertEqual(self.hub.devices["t"].last_n, 3)

    def test_loaded_history_continues_its_numbering(self) -> None:
        self.hub.set_device(
            DeviceConfig("old", "Old", "toggle"),
            [HistoryEntry(1, 1, None, None, 40), HistoryEntry(2, 2, None, None, 41)],
        )
        self.hub.upstream_status("old", 3, None)
        self.assertEqual(self.recorder.statuses[-1][1].n, 42)

    def test_a_new_term_numbers_above_everything_before_it(self) -> None:
        self.hub.upstream_status("t", 1, None)
        self.hub.ordinal_floor = 7 << 32
        self.hub.upstream_status("t", 2, None)
        self.hub.upstream_status("t", 3, None)
        self.assertEqual([e.n for _, e in self.recorder.statuses], [1, 7 << 32, (7 << 32) + 1])

    def test_a_session_ahead_of_this_replica_joins_with_the_first_newer_status(self) -> None:
        session, link = self.viewer()
        state = self.hub.devices["t"]
        state.subscribers.discard(session)
        state.ahead[session] = 2
        for n in (1, 2, 3, 4):
            self.hub.apply_remote_status("t", HistoryEntry(n, n, None, None, n))
        self.assertEqual([d["payload"] for d in self.statuses(link)], [3, 4])
        self.assertEqual(state.ahead, {})

    def test_remote_statuses_keep_their_ordinal(self) -> None:
        _, a = self.viewer()
        self.hub.apply_remote_status("t", HistoryEntry("x", 5, None, None, 12))
        self.assertEqual(self.hub.devices["t"].last_n, 12)
        self.hub.apply_remote_status("t", HistoryEntry("y", 6, None, None, 0))
        self.assertEqual(self.hub.devices["t"].history[-1].n, 13)
        self.assertEqual([d["payload"] for d in self.statuses(a)], ["x", "y"])


class CommandTests(HubTestCase):
    def command(self, session: Session, device: str = "t", client_id: str = "c1") -> str:
        return self.hub.submit_command(
            session, protocol.Command(device, {"on": True}, client_id), "1.2.3.4"
        )

    def test_confirmed_by_command_id(self) -> None:
        session, link = self.viewer("ann")
        _, other = self.viewer("bob")
        command_id = self.command(session)
        [sent] = self.upstream.sent
        self.assertEqual(
            sent.to_json(),
            {
                "group_id": "t",
                "payload": {"on": True},
                "user": "ann",
                "command_id": command_id,
                "ts": 1_700_000_000_000,
            },
        )
        self.assertEqual(self.results(link), ["sent"])
        # A command alone changes nothing viewers see.
        self.assertEqual(self.statuses(link), [])
        self.hub.upstream_status("t", {"on": True}, command_id)
        self.assertEqual(self.results(link), ["sent", "confirmed"])
        self.assertEqual(self.results(other), [])
        for viewer in (link, other):
            [status] = self.statuses(viewer)
            self.assertEqual((status["by"], status["command_id"]), ("ann", command_id))
        self.assertEqual(
            [(r.result, r.remote_addr) for r in self.recorder.commands],
            [("sent", "1.2.3.4"), ("confirmed", "1.2.3.4")],
        )
        # The timer is gone: nothing more happens.
        self.clock.advance(10)
        self.assertEqual(self.results(link), ["sent", "confirmed"])

    def test_first_status_confirms_when_the_flow_drops_command_id(self) -> None:
        session, link = self.viewer()
        first = self.command(session, client_id="a")
        self.command(session, client_id="b")
        self.hub.upstream_status("t", {"on": True}, None)
        results = link.events("COMMAND_RESULT")
        self.assertEqual(
            [(r["id"], r["result"]) for r in results],
            [("a", "sent"), ("b", "sent"), ("a", "confirmed")],
        )
        self.assertEqual(self.statuses(link)[0]["command_id"], first)

    def test_status_for_another_device_confirms_nothing(self) -> None:
        session, link = self.viewer()
        command_id = self.command(session)
        self.hub.upstream_status("s", 1, command_id)
        self.assertEqual(self.results(link), ["sent"])

    def test_timeout(self) -> None:
        session, link = self.viewer()
        self.command(session)
        self.clock.advance(4.9)
        self.assertEqual(self.results(link), ["sent"])
        self.clock.advance(0.2)
        self.assertEqual(self.results(link), ["sent", "timeout"])
        self.assertEqual(self.recorder.commands[-1].result, "timeout")

    def test_upstream_unavailable_at_once(self) -> None:
        session, link = self.viewer()
        self.hub.upstream_state(False)
        self.command(session)
        self.assertEqual(self.results(link), ["sent", "upstream_unavailable"])
        self.assertEqual(self.upstream.sent, [])

    def test_link_lost_ends_pending_commands(self) -> None:
        session, link = self.viewer()
        self.command(session)
        self.hub.upstream_state(False)
        self.assertEqual(self.results(link), ["sent", "upstream_unavailable"])
        self.clock.advance(10)
        self.assertEqual(self.results(link), ["sent", "upstream_unavailable"])

    def test_result_reaches_a_detached_session_for_resume(self) -> None:
        session, link = self.viewer()
        command_id = self.command(session)
        session.detach(1.0)
        self.hub.upstream_status("t", 1, command_id)
        replay, _ = session.resume(
            session.seq - 2,
            session.identity,
            session.grants,  # type: ignore[arg-type]
            Link(),
            2.0,
        )
        kinds = [json.loads(f).get("t", "STATUS") for f in replay]
        self.assertEqual(kinds, ["STATUS", "COMMAND_RESULT", "RESUMED"])

    def test_removed_device_rejects_pending(self) -> None:
        session, link = self.viewer()
        self.command(session)
        self.hub.remove_device("t")
        self.assertEqual(self.results(link), ["sent", "rejected"])


class SessionIndexTests(HubTestCase):
    def test_sessions_are_indexed_by_user_until_forgotten(self) -> None:
        a, _ = self.viewer("ann")
        b, _ = self.viewer("ann")
        assert a.identity is not None and a.identity.user_id is not None
        self.assertEqual(self.hub.sessions_of_user(a.identity.user_id), {a, b})
        self.hub.forget(a)
        self.assertEqual(self.hub.sessions_of_user(a.identity.user_id), {b})
        self.hub.forget(b)
        self.assertEqual(self.hub.sessions_of_user(a.identity.user_id), set())
        self.assertEqual(self.hub._by_user, {})
