"""Devices, who may read or change them, and what happened to them."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q


def new_device_id() -> str:
    """At least 128 random bits, URL-safe: ids are unguessable (spec §8).

    22 base64url characters carry 132 bits; one that starts with '-' is drawn
    again, so an id never reads as an option on a command line.
    """
    while True:
        candidate = secrets.token_urlsafe(16)
        if not candidate.startswith("-"):
            return candidate


device_id_validator = RegexValidator(
    r"^[A-Za-z0-9_-]{1,64}$", "Letters, digits, '-' and '_' only, at most 64."
)

MAX_HISTORY = 10_000


class Device(models.Model):
    id = models.CharField(
        primary_key=True,
        max_length=64,
        default=new_device_id,
        validators=[device_id_validator],
        help_text="Random by default; import a chosen id to match an existing flow's group_id.",
    )
    name = models.CharField(max_length=200)
    kind = models.CharField(
        max_length=50, help_text="Picks the dashboard widget: toggle, dimmer, sensor, ..."
    )
    history_size = models.PositiveIntegerField(
        default=50, validators=[MaxValueValidator(MAX_HISTORY)]
    )
    command_timeout = models.FloatField(
        default=5.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(300)],
        help_text="Seconds to wait for the device to confirm a command.",
    )
    public = models.BooleanField(default=False, help_text="Readable by everyone.")
    enabled = models.BooleanField(default=True)
    key_hash = models.CharField(
        max_length=64,
        blank=True,
        db_index=True,
        editable=False,
        help_text="SHA-256 of the device client's key; empty when the device has none.",
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [("use_nodered", "Can use the Node-RED editor")]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    @property
    def has_client(self) -> bool:
        """Driven by its own device client rather than by Node-RED."""
        return bool(self.key_hash)

    def new_key(self) -> str:
        """Give the device a fresh client key; returns it (it is stored hashed only)."""
        key = "bdk_" + secrets.token_urlsafe(32)
        self.key_hash = hash_device_key(key)
        return key


def hash_device_key(key: str) -> str:
    """Keys carry 256 random bits, so a fast hash is as safe as a slow one."""
    return hashlib.sha256(key.encode()).hexdigest()


class Grant(models.Model):
    READ = "read"
    CHANGE = "change"
    PERMISSIONS = [(READ, "read"), (CHANGE, "read and change")]

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="grants")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="device_grants",
    )
    group = models.ForeignKey(
        Group, null=True, blank=True, on_delete=models.CASCADE, related_name="device_grants"
    )
    permission = models.CharField(max_length=6, choices=PERMISSIONS, default=READ)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=False, group__isnull=True)
                | Q(user__isnull=True, group__isnull=False),
                name="grant_user_xor_group",
            ),
            models.UniqueConstraint(
                fields=["device", "user"],
                condition=Q(user__isnull=False),
                name="grant_unique_user",
            ),
            models.UniqueConstraint(
                fields=["device", "group"],
                condition=Q(group__isnull=False),
                name="grant_unique_group",
            ),
        ]

    def __str__(self) -> str:
        who = f"user {self.user}" if self.user_id else f"group {self.group}"
        return f"{who}: {self.permission} on {self.device_id}"


class AuditEntry(models.Model):
    """One attributed action; denied attempts too. Never edited by people."""

    time = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    # Kept as text so entries survive deleted users and name guessed devices.
    username = models.CharField(max_length=150, blank=True)
    device_id = models.CharField(max_length=64, blank=True, db_index=True)
    action = models.CharField(max_length=32)
    payload = models.JSONField(null=True, blank=True)
    command_id = models.CharField(max_length=64, blank=True, db_index=True)
    result = models.CharField(max_length=32, blank=True)
    detail = models.TextField(blank=True)
    remote_addr = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-time", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.username or '-'} {self.action}"


class StatusRecord(models.Model):
    """The persisted part of a device's history: its last ``history_size`` statuses."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="statuses")
    ts = models.BigIntegerField(help_text="Milliseconds since the epoch, server clock.")
    payload = models.JSONField()
    by = models.CharField(max_length=150, null=True, blank=True)
    command_id = models.CharField(max_length=64, null=True, blank=True)
    n = models.BigIntegerField(
        default=0, help_text="The status's ordinal in its device's history, as replicas share it."
    )

    class Meta:
        indexes = [models.Index(fields=["device", "-id"])]


class Change(models.Model):
    """A change that live connections must hear of, from any process.

    Written by signal handlers wherever Django runs (the bridge, bridge-admin,
    a worker) and read by every bridge process, so that the one-second rule of
    spec §5 holds without anything but the database in common.
    """

    USER = "user"
    GROUP = "group"
    DEVICE = "device"
    ALL = "all"
    LOGOUT = "logout"
    NOTIFY = "notify"

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=16)
    user_id = models.BigIntegerField(null=True)
    group_id = models.BigIntegerField(null=True)
    device_id = models.CharField(max_length=64, blank=True)
    session_key = models.CharField(max_length=64, blank=True)
    data = models.JSONField(null=True)
