"""Lookups shared by the bridge's management commands: one-line errors."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import CommandError

from bridge.devices.models import Device


def get_user(username: str) -> Any:
    try:
        return get_user_model()._default_manager.get_by_natural_key(username)
    except get_user_model().DoesNotExist:
        raise CommandError(f"unknown user {username!r}") from None


def get_group(name: str) -> Group:
    try:
        return Group.objects.get(name=name)
    except Group.DoesNotExist:
        raise CommandError(f"unknown group {name!r}") from None


def get_device(device_id: str) -> Device:
    try:
        return Device.objects.get(pk=device_id)
    except Device.DoesNotExist:
        raise CommandError(f"unknown device {device_id!r}") from None


def add_principal_arguments(parser: Any) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="USERNAME")
    who.add_argument("--group", metavar="GROUP")
