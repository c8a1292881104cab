"""The shared grants cache: one load per identity, never trusted past a change."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from bridge import permissions
from bridge.changes import ChangeFeed, Reconciler
from bridge.devices.models import Device, Grant
from bridge.grants import GrantsCache
from bridge.hub import DeviceConfig, Hub
from bridge.session import DeviceView, Identity, Limits, Permission, Role, Session
from bridge.threads import PoolService
from tests.support import make_user, reset_database
from tests.test_session import Link

ANN = Identity(Role.OPERATOR, user_id=1, username="ann")
BOB = Identity(Role.OPERATOR, user_id=2, username="bob")


def view(device: str) -> DeviceView:
    return DeviceView(device, device, "sensor", 10, Permission.READ)


class FakePool:
    """Loads that finish when the test says, with what the 'database' holds then."""

    def __init__(self) -> None:
        self.db: dict[int | None, list[str]] = {1: ["a"], 2: ["b"]}
        self.calls: list[tuple[Identity, defer.Deferred[Any]]] = []

    def orm(self, fn: Any, identity: Identity) -> defer.Deferred[Any]:
        assert fn is permissions.grants_for
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((identity, d))
        return d

    def finish(self, index: int = -1) -> None:
        identity, d = self.calls[index]
        d.callback({x: view(x) for x in self.db[identity.user_id]})


class GrantsCacheTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.pool = FakePool()
        self.cache = GrantsCache(self.pool, self.clock)  # type: ignore[arg-type]

    def got(self, identity: Identity) -> list[Any]:
        out: list[Any] = []
        self.cache.get(identity).addBoth(out.append)
        return out

    def test_concurrent_requests_share_one_load(self) -> None:
        first, second, other = self.got(ANN), self.got(ANN), self.got(BOB)
        self.assertEqual(len(self.pool.calls), 2)
        self.pool.finish(0)
        self.assertEqual([dict(first[0]), dict(second[0])], [{"a": view("a")}] * 2)
        self.assertIs(first[0], second[0])
        self.assertEqual(other, [])

    def test_not_trusted_until_the_feed_has_caught_up(self) -> None:
        self.got(ANN)
        self.pool.finish()
        self.got(ANN)
        self.assertEqual(len(self.pool.calls), 2, "no feed yet: every IDENTIFY loads")
        self.pool.finish()
        self.cache.fresh(self.clock.seconds())
        [grants] = self.got(ANN)
        self.assertEqual((len(self.pool.calls), self.cache.hits), (2, 1))
        self.assertEqual(dict(grants), {"a": view("a")})

    def test_a_stalled_feed_turns_the_cache_off(self) -> None:
        self.cache.fresh(self.clock.seconds())
        self.got(ANN)
        self.pool.finish()
        self.clock.advance(0.9)
        self.got(ANN)
        self.assertEqual(len(self.pool.calls), 1)
        self.clock.advance(0.2)  # the feed's last good read began 1.1 s ago
        self.got(ANN)
        self.assertEqual(len(self.pool.calls), 2)

    def test_a_change_drops_that_user_or_everyone(self) -> None:
        self.cache.fresh(self.clock.seconds())
        for who in (ANN, BOB):
            self.got(who)
            self.pool.finish()
        self.pool.db[1] = []
        self.cache.changed([1], everyone=False)
        ann = self.got(ANN)
        self.got(BOB)
        self.assertEqual(len(self.pool.calls), 3, "bob's grants were kept")
        self.assertEqual(ann, [])
        self.pool.finish()
        self.assertEqual(dict(ann[0]), {})
        self.cache.changed([], everyone=True)
        self.got(BOB)
        self.assertEqual(len(self.pool.calls), 4)

    def test_a_load_overtaken_by_a_change_is_done_again(self) -> None:
        self.cache.fresh(self.clock.seconds())
        waiting = self.got(ANN)
        self.pool.db[1] = ["a", "new"]  # committed while the first load ran...
        self.cache.changed([1], everyone=False)  # ...and read by the feed
        self.pool.calls[0][1].callback({"a": view("a")})  # the old answer comes back
        self.assertEqual(waiting, [], "the stale answer is not handed out")
        self.assertEqual(len(self.pool.calls), 2)
        self.pool.finish()
        self.assertEqual(set(waiting[0]), {"a", "new"})
        self.got(ANN)
        self.assertEqual(len(self.pool.calls), 2, "the fresh answer is cached")

    def test_endless_changes_bound_the_reloads_and_cache_nothing(self) -> None:
        self.cache.fresh(self.clock.seconds())
        waiting = self.got(ANN)
        for _ in range(GrantsCache.RETRIES + 1):
            self.cache.changed([1], everyone=False)
            self.pool.finish()
        self.assertEqual(len(self.pool.calls), GrantsCache.RETRIES + 1)
        self.assertEqual(set(waiting[0]), {"a"})
        self.got(ANN)
        self.assertEqual(len(self.pool.calls), GrantsCache.RETRIES + 2)

    def test_a_failed_load_fails_every_waiter_and_is_not_kept(self) -> None:
        first, second = self.got(ANN), self.got(ANN)
        self.pool.calls[0][1].errback(RuntimeError("database down"))
        self.assertTrue(first[0].check(RuntimeError) and second[0].check(RuntimeError))
        self.got(ANN)
        self.assertEqual(len(self.pool.calls), 2)

    def test_the_shared_mapping_cannot_be_changed_by_a_session(self) -> None:
        out = self.got(ANN)
        self.pool.finish()
        grants = out[0]
        with self.assertRaises(TypeError):
            grants["b"] = view("b")  # type: ignore[index]
        session = Session("s", Limits(), 0.0)
        session.attach(Link(), 0.0)
        session.identified(ANN, grants, lambda d: True)
        session.update_grants({})
        self.assertEqual(dict(grants), {"a": view("a")})

    def test_identities_that_see_different_grants_are_kept_apart(self) -> None:
        self.cache.fresh(self.clock.seconds())
        for who in (
            ANN,
            Identity(Role.OPERATOR, user_id=1, username="ann", is_superuser=True),
            Identity(Role.DEVICE, device_id="a"),
            Identity(Role.DEVICE, device_id="b"),
            Identity(Role.ANONYMOUS),
        ):
            self.got(who)
        self.assertEqual(len(self.pool.calls), 5)
        self.got(Identity(Role.OPERATOR, user_id=1, username="ann", session_key="k"))
        self.assertEqual(len(self.pool.calls), 5, "same grants whatever the credential")


class OneSecondRuleTests(unittest.TestCase):
    """Through the real ORM, feed and reconciler: a cached grant never outlives its revocation."""

    def setUp(self) -> None:
        reset_database()
        self.pool = PoolService(reactor, "test-grants", 1, 2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.hub = Hub(reactor)
        self.user = make_user("ann")
        self.device = Device.objects.create(name="A", kind="sensor")
        self.hub.set_device(DeviceConfig(self.device.id, "A", "sensor"))
        self.group = Group.objects.create(name="line1")
        self.user.groups.add(self.group)
        Grant.objects.create(device=self.device, group=self.group, permission="read")
        self.cache = GrantsCache(self.pool, reactor)
        self.reconciler = Reconciler(self.hub, self.pool, reactor, self.cache)
        self.feed = ChangeFeed(self.pool, reactor, self.reconciler.apply, fresh=self.cache.fresh)
        self.identity = Identity(Role.OPERATOR, user_id=self.user.pk, username="ann")

    @defer.inlineCallbacks
    def ready(self) -> Any:
        grants = yield self.cache.get(self.identity)
        session = Session(f"s{len(self.hub.sessions)}", Limits(), 0.0)
        link = Link()
        session.attach(link, 0.0)
        session.identified(self.identity, grants, self.hub.is_online)
        self.hub.register(session)
        return session, link

    @defer.inlineCallbacks
    def test_revoked_group_grant_reaches_live_and_new_sessions(self) -> Any:
        yield self.feed.poll()
        first, first_link = yield self.ready()
        second, _ = yield self.ready()
        self.assertEqual(self.cache.loads, 1, "the second session used the first one's load")
        self.assertIn(self.device.id, second.grants)
        yield self.pool.orm(Grant.objects.filter(group=self.group).delete)
        # Until the feed reads the change, a new session may still get the old
        # grants, but it is live by then and the reconciler corrects it too.
        early, early_link = yield self.ready()
        yield self.feed.poll()
        for session, link in ((first, first_link), (early, early_link)):
            self.assertEqual(session.grants, {})
            self.assertEqual(link.events("DEVICE_REMOVED"), [{"device": self.device.id}])
        late, _ = yield self.ready()
        self.assertEqual(late.grants, {})
        self.assertEqual(self.cache.loads, 2)
