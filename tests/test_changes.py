"""Changes made anywhere reach live sessions (spec §5's one-second rule)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from bridge import permissions
from bridge.changes import ChangeFeed, Reconciler, fetch_changes, latest_change_id
from bridge.devices.models import Change, Device, Grant
from bridge.hub import DeviceConfig, Hub
from bridge.protocol import CloseCode
from bridge.session import Close, Identity, Limits, Role, Session
from bridge.threads import PoolService
from tests.support import make_user, reset_database
from tests.test_session import Link


class SignalTests(unittest.SynchronousTestCase):
    """Signal handlers write one Change row per thing live sessions must hear of."""

    def setUp(self) -> None:
        reset_database()
        self.user = make_user("ann")
        self.device = Device.objects.create(name="A", kind="toggle")
        Change.objects.all().delete()

    def kinds(self) -> list[tuple[str, Any]]:
        rows = Change.objects.order_by("id")
        return [(c.kind, c.user_id or c.group_id or c.device_id or None) for c in rows]

    def test_grants_users_groups_devices(self) -> None:
        group = Group.objects.create(name="g")
        grant = Grant.objects.create(device=self.device, user=self.user)
        Grant.objects.create(device=self.device, group=group)
        self.user.groups.add(group)
        group.user_set.remove(self.user)
        grant.delete()
        self.device.name = "B"
        self.device.save()
        self.assertEqual(
            self.kinds(),
            [
                ("user", self.user.pk),
                ("group", group.pk),
                ("user", self.user.pk),
                ("user", self.user.pk),
                ("user", self.user.pk),
                ("device", self.device.pk),
            ],
        )

    def test_feed_reads_after_a_position(self) -> None:
        start = latest_change_id()
        self.user.is_active = False
        self.user.save()
        last, events = fetch_changes(start)
        self.assertEqual([(e.kind, e.user_id) for e in events], [("user", self.user.pk)])
        self.assertEqual(fetch_changes(last), (last, []))


class ReconcilerTests(unittest.TestCase):
    def setUp(self) -> None:
        reset_database()
        self.pool = PoolService(reactor, "test-changes", 1, 2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.clock = Clock()
        self.hub = Hub(self.clock)
        self.user = make_user("ann")
        self.device = Device.objects.create(name="A", kind="toggle")
        Grant.objects.create(device=self.device, user=self.user, permission="change")
        self.hub.set_device(DeviceConfig(self.device.id, "A", "toggle"))
        self.reconciler = Reconciler(self.hub, self.pool, self.clock)

    def live(self) -> tuple[Session, Link]:
        identity = Identity(
            Role.OPERATOR,
            user_id=self.user.pk,
            username="ann",
            auth_hash=self.user.get_session_auth_hash(),
        )
        session = Session("s1", Limits(), now=0.0)
        link = Link()
        session.attach(link, 0.0)
        session.identified(identity, permissions.grants_for(identity), lambda d: True)
        self.hub.register(session)
        session.subscriptions.add(self.device.id)
        self.hub.subscribe(session, [self.device.id], history=False)
        return session, link

    @defer.inlineCallbacks
    def apply_new_changes(self) -> Any:
        last, events = yield self.pool.orm(fetch_changes, 0)
        yield self.reconciler.apply(events)
        yield self.pool.orm(Change.objects.all().delete)

    @defer.inlineCallbacks
    def test_revoked_grant_removes_device_and_unsubscribes(self) -> Any:
        session, link = self.live()
        Change.objects.all().delete()
        Grant.objects.filter(user=self.user).get().delete()
        yield self.apply_new_changes()
        self.assertEqual(link.events("DEVICE_REMOVED"), [{"device": self.device.id}])
        self.assertNotIn(session, self.hub.devices[self.device.id].subscribers)
        self.assertEqual(session.subscriptions, set())

    @defer.inlineCallbacks
    def test_group_grant_reaches_members(self) -> Any:
        session, link = self.live()
        other = Device.objects.create(name="B", kind="sensor")
        group = Group.objects.create(name="g")
        self.user.groups.add(group)
        Change.objects.all().delete()
        Grant.objects.create(device=other, group=group, permission="read")
        yield self.apply_new_changes()
        changed = link.events("DEVICE_CHANGED")
        self.assertEqual([(c["device"], c["permission"]) for c in changed], [(other.id, "read")])

    @defer.inlineCallbacks
    def test_device_configuration_change(self) -> Any:
        session, link = self.live()
        self.device.history_size = 7
        self.device.name = "Renamed"
        self.device.save()
        yield self.apply_new_changes()
        [changed] = link.events("DEVICE_CHANGED")
        self.assertEqual((changed["name"], changed["history_size"]), ("Renamed", 7))
        self.assertEqual(self.hub.devices[self.device.id].history.maxlen, 7)

    @defer.inlineCallbacks
    def test_disabled_device_goes_offline_then_leaves_the_hub(self) -> Any:
        session, link = self.live()
        self.hub.devices[self.device.id].online = True
        self.device.enabled = False
        self.device.save()
        yield self.apply_new_changes()
        # Spec §4: DEVICE_STATE for "device disabled", DEVICE_REMOVED for "disabled".
        self.assertEqual(
            [(f["t"], f["d"]) for f in link.frames if f.get("t") != "READY"],
            [
                ("SUBSCRIBED", {"device": self.device.id, "permission": "change", "history": []}),
                ("DEVICE_STATE", {"device": self.device.id, "online": False}),
                ("DEVICE_REMOVED", {"device": self.device.id}),
            ],
        )
        self.assertNotIn(self.device.id, self.hub.devices)

    @defer.inlineCallbacks
    def test_deleted_device_is_removed_only(self) -> Any:
        session, link = self.live()
        device_id = self.device.id
        self.hub.devices[device_id].online = True
        self.device.delete()
        yield self.apply_new_changes()
        self.assertEqual(link.events("DEVICE_STATE"), [])
        self.assertEqual(link.events("DEVICE_REMOVED"), [{"device": device_id}])

    @defer.inlineCallbacks
    def test_deactivated_user_or_password_change_closes_4011(self) -> Any:
        for change in ("is_active", "password"):
            self.user.refresh_from_db()
            self.user.is_active = True
            self.user.save()
            session, link = self.live()
            if change == "is_active":
                self.user.is_active = False
            else:
                self.user.set_password("a-brand-new-password-9")
            self.user.save()
            yield self.apply_new_changes()
            closes = [a for a in link.executed if isinstance(a, Close)]
            self.assertEqual([c.code for c in closes], [int(CloseCode.IDENTITY_REVOKED)], change)
            self.assertNotIn(session.session_id, self.hub.sessions)

    @defer.inlineCallbacks
    def test_logout_closes_sessions_of_that_browser_session(self) -> Any:
        session, link = self.live()
        session.identity = Identity(
            Role.OPERATOR, user_id=self.user.pk, username="ann", session_key="k1"
        )
        Change.objects.create(kind=Change.LOGOUT, session_key="k1")
        yield self.apply_new_changes()
        self.assertEqual(
            [c.code for c in link.executed if isinstance(c, Close)],
            [int(CloseCode.IDENTITY_REVOKED)],
        )

    @defer.inlineCallbacks
    def test_feed_delivers_rows_written_after_it_started(self) -> Any:
        delivered: list[Any] = []
        feed = ChangeFeed(self.pool, reactor, delivered.extend)
        yield feed.poll()  # the first poll only finds where the log ends
        self.assertIsNotNone(feed.last_id)
        yield self.pool.orm(Change.objects.create, kind="all")
        yield feed.poll()
        self.assertEqual([e.kind for e in delivered], ["all"])
