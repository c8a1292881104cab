"""Who may read or change what (spec §5), against the real ORM."""

from __future__ import annotations

from django.contrib.auth.models import Group
from twisted.trial import unittest

from bridge.devices.models import Device, Grant, new_device_id
from bridge.permissions import grants_for, grants_for_users
from bridge.session import Identity, Permission, Role
from tests.support import make_user, reset_database


def operator(user: object) -> Identity:
    return Identity(
        Role.OPERATOR,
        user_id=user.pk,  # type: ignore[attr-defined]
        username=user.username,  # type: ignore[attr-defined]
        is_superuser=user.is_superuser,  # type: ignore[attr-defined]
    )


class GrantsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        self.ann = make_user("ann")
        self.bob = make_user("bob")
        self.root = make_user("root", is_superuser=True)
        self.line = Group.objects.create(name="line")
        self.bob.groups.add(self.line)
        self.a = Device.objects.create(name="A", kind="toggle")
        self.b = Device.objects.create(name="B", kind="dimmer")
        self.pub = Device.objects.create(name="P", kind="sensor", public=True)
        self.off = Device.objects.create(name="Off", kind="toggle", enabled=False)

    def levels(self, identity: Identity) -> dict[str, Permission]:
        return {k: v.permission for k, v in grants_for(identity).items()}

    def test_user_grant_and_public(self) -> None:
        Grant.objects.create(device=self.a, user=self.ann, permission="change")
        self.assertEqual(
            self.levels(operator(self.ann)),
            {self.a.id: Permission.CHANGE, self.pub.id: Permission.READ},
        )

    def test_highest_of_user_and_group_grants(self) -> None:
        Grant.objects.create(device=self.a, user=self.bob, permission="read")
        Grant.objects.create(device=self.a, group=self.line, permission="change")
        Grant.objects.create(device=self.b, group=self.line, permission="read")
        Grant.objects.create(device=self.pub, user=self.bob, permission="change")
        self.assertEqual(
            self.levels(operator(self.bob)),
            {
                self.a.id: Permission.CHANGE,
                self.b.id: Permission.READ,
                self.pub.id: Permission.CHANGE,
            },
        )

    def test_superuser_changes_every_enabled_device(self) -> None:
        self.assertEqual(
            self.levels(operator(self.root)),
            {d.id: Permission.CHANGE for d in (self.a, self.b, self.pub)},
        )

    def test_disabled_devices_are_readable_by_nobody(self) -> None:
        Grant.objects.create(device=self.off, user=self.ann, permission="change")
        self.assertNotIn(self.off.id, grants_for(operator(self.ann)))
        self.assertNotIn(self.off.id, grants_for(operator(self.root)))

    def test_anonymous_reads_public_only(self) -> None:
        self.assertEqual(self.levels(Identity(Role.ANONYMOUS)), {self.pub.id: Permission.READ})

    def test_device_views_carry_configuration(self) -> None:
        Grant.objects.create(device=self.b, user=self.ann, permission="read")
        view = grants_for(operator(self.ann))[self.b.id]
        self.assertEqual((view.name, view.kind, view.history_size), ("B", "dimmer", 50))

    def test_bulk_matches_single(self) -> None:
        Grant.objects.create(device=self.a, user=self.ann, permission="change")
        Grant.objects.create(device=self.b, group=self.line, permission="read")
        bulk = grants_for_users([self.ann.pk, self.bob.pk])
        self.assertEqual(bulk[self.ann.pk], grants_for(operator(self.ann)))
        self.assertEqual(bulk[self.bob.pk], grants_for(operator(self.bob)))

    def test_grant_must_name_a_user_or_a_group_once(self) -> None:
        from django.db import IntegrityError, transaction

        with self.assertRaises(IntegrityError), transaction.atomic():
            Grant.objects.create(device=self.a, permission="read")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Grant.objects.create(device=self.a, user=self.ann, group=self.line)
        Grant.objects.create(device=self.a, user=self.ann)
        with self.assertRaises(IntegrityError), transaction.atomic():
            Grant.objects.create(device=self.a, user=self.ann, permission="change")


class DeviceIdTests(unittest.SynchronousTestCase):
    def test_ids_are_random_url_safe_and_never_look_like_options(self) -> None:
        ids = {new_device_id() for _ in range(2000)}
        self.assertEqual(len(ids), 2000)
        for device_id in ids:
            self.assertEqual(len(device_id), 22)  # 22 base64url characters: 132 bits
            self.assertFalse(device_id.startswith("-"))
            self.assertRegex(device_id, r"^[A-Za-z0-9_-]+$")


class SharedViewTests(unittest.SynchronousTestCase):
    def test_sessions_share_identical_device_views(self) -> None:
        reset_database()
        ann, bob = make_user("ann"), make_user("bob")
        device = Device.objects.create(name="A", kind="toggle", public=True)
        a, b = grants_for(operator(ann))[device.id], grants_for(operator(bob))[device.id]
        self.assertIs(a, b)
        device.name = "B"
        device.save()
        renamed = grants_for(operator(ann))[device.id]
        self.assertEqual(renamed.name, "B")
        self.assertIsNot(renamed, a)
