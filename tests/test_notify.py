"""Publishing NOTIFY to the people a target names (issue 7)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, Permission
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

import bridge
from bridge.changes import Reconciler, fetch_changes
from bridge.devices.models import Change
from bridge.hub import Hub
from bridge.notify import BadTarget, parse_target, recipients
from bridge.session import Identity, Limits, Role, Session
from bridge.threads import PoolService
from tests.support import make_user, reset_database
from tests.test_session import Link


class TargetTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        self.ann = make_user("ann")
        self.bob = make_user("bob")
        group = Group.objects.create(name="line")
        self.bob.groups.add(group)
        self.bob.user_permissions.add(Permission.objects.get(codename="view_device"))
        self.people = {
            "ann": Identity(Role.OPERATOR, user_id=self.ann.pk, username="ann", session_key="k1"),
            "bob": Identity(Role.OPERATOR, user_id=self.bob.pk, username="bob"),
            "anon": Identity(Role.ANONYMOUS),
            "robot": Identity(Role.DEVICE, device_id="d"),
        }

    def who(self, target: str) -> set[str]:
        found = recipients(target, self.people.values())
        return {name for name, i in self.people.items() if i in found}

    def test_targets(self) -> None:
        self.assertEqual(self.who("all"), {"ann", "bob", "anon"})
        self.assertEqual(self.who("authenticated"), {"ann", "bob"})
        self.assertEqual(self.who("user:ann"), {"ann"})
        self.assertEqual(self.who("group:line"), {"bob"})
        self.assertEqual(self.who("session:k1"), {"ann"})
        self.assertEqual(self.who("perm:bridge.view_device"), {"bob"})
        self.assertEqual(self.who("user:nobody"), set())

    def test_bad_targets(self) -> None:
        for bad in ("", "everyone", "user:", "perm:nodot", "role:x"):
            with self.assertRaises(BadTarget):
                parse_target(bad)

    def test_publish_writes_a_change_and_refuses_bad_input(self) -> None:
        Change.objects.all().delete()
        bridge.publish("user:ann", "hello", {"n": 1})
        change = Change.objects.get()
        self.assertEqual(change.data, {"target": "user:ann", "event": "hello", "data": {"n": 1}})
        with self.assertRaises(BadTarget):
            bridge.publish("nope", "e")
        with self.assertRaises(ValueError):
            bridge.publish("all", "e", float("nan"))
        # A lone surrogate (json.loads makes one of "\\ud800") has no UTF-8 form: every
        # bridge would fail to encode the NOTIFY, so it is refused here.
        for event, data in (("e", "\ud800"), ("e", {"k": ["\udfff"]}), ("\ud800", None)):
            with self.assertRaises(ValueError):
                bridge.publish("all", event, data)
        self.assertEqual(Change.objects.count(), 1)


class DeliveryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_reconciler_sends_notify_to_recipients_only(self) -> Any:
        reset_database()
        pool = PoolService(reactor, "test-notify", 1, 1)
        pool.startService()
        self.addCleanup(pool.stopService)
        hub = Hub(Clock())
        links = {}
        for name in ("ann", "bob"):
            user = make_user(name)
            session = Session(f"s-{name}", Limits(), now=0.0)
            links[name] = Link()
            session.attach(links[name], 0.0)
            session.identified(
                Identity(Role.OPERATOR, user_id=user.pk, username=name), {}, lambda d: True
            )
            hub.register(session)
        Change.objects.all().delete()
        bridge.publish("user:bob", "shift", {"starts": "06:00"})
        _, events = yield pool.orm(fetch_changes, 0)
        yield Reconciler(hub, pool, Clock()).apply(events)
        self.assertEqual(links["ann"].events("NOTIFY"), [])
        self.assertEqual(
            links["bob"].events("NOTIFY"), [{"event": "shift", "data": {"starts": "06:00"}}]
        )
