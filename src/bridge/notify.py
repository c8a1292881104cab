"""NOTIFY: Django code anywhere tells the right people something.

``bridge.publish(target, event, data)`` writes one Change row; every bridge
process reads it (see :mod:`bridge.changes`) and sends EVENT NOTIFY to the
live sessions the target names.  The same path serves the bridge's own
process, ``bridge-admin publish``, a Celery worker, with or without Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bridge import protocol
from bridge.session import Identity, Role

TARGET_KINDS = ("user", "group", "session", "perm")


class BadTarget(ValueError):
    pass


def parse_target(target: str) -> tuple[str, str]:
    """``all``, ``authenticated``, or ``kind:value`` for user, group, session, perm."""
    if target in ("all", "authenticated"):
        return target, ""
    kind, sep, value = target.partition(":")
    if not sep or kind not in TARGET_KINDS or not value:
        raise BadTarget(
            f"bad target {target!r}: use all, authenticated, user:<username>, group:<name>, "
            "session:<key> or perm:<app_label.codename>"
        )
    if kind == "perm" and "." not in value:
        raise BadTarget(f"bad permission {value!r}: use app_label.codename")
    return kind, value


def publish(target: str, event: str, data: Any = None) -> None:
    """Send EVENT NOTIFY ``{"event", "data"}`` to the live sessions ``target`` names."""
    from bridge.devices.models import Change

    parse_target(target)
    if not isinstance(event, str) or not event:
        raise ValueError("event must be a non-empty string")
    try:
        # Refuse here what the wire cannot carry, not in every bridge that reads it.
        protocol.dumps({"event": event, "data": data})
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise ValueError(
            f"event and data must be strict JSON text (no NaN, no lone surrogate): {e}"
        ) from None
    Change.objects.create(kind=Change.NOTIFY, data={"target": target, "event": event, "data": data})


def recipients(target: str, identities: Iterable[Identity]) -> set[Identity]:
    """Which of the live identities a target names (ORM: run on a pool)."""
    kind, value = parse_target(target)
    people = [i for i in identities if i.role is not Role.DEVICE]
    if kind == "all":
        return set(people)
    users = [i for i in people if i.user_id is not None]
    if kind == "authenticated":
        return set(users)
    if kind == "user":
        return {i for i in users if i.username == value}
    if kind == "session":
        return {i for i in users if i.session_key == value}
    from django.contrib.auth import get_user_model

    manager = get_user_model()._default_manager
    ids = {i.user_id for i in users if i.user_id is not None}
    if kind == "group":
        members = set(manager.filter(pk__in=ids, groups__name=value).values_list("pk", flat=True))
        return {i for i in users if i.user_id in members}
    allowed = {u.pk for u in manager.filter(pk__in=ids, is_active=True) if u.has_perm(value)}
    return {i for i in users if i.user_id in allowed}


def admin_change_notice(entry: Any) -> tuple[str, str, dict[str, Any]] | None:
    """A Django admin LogEntry as (target, event, data), for BRIDGE_NOTIFY_ADMIN_CHANGES."""
    content_type = entry.content_type
    if content_type is None:
        return None
    action = {1: "added", 2: "changed", 3: "deleted"}.get(entry.action_flag, "changed")
    target = f"perm:{content_type.app_label}.view_{content_type.model}"
    return (
        target,
        "admin_change",
        {
            "action": action,
            "model": f"{content_type.app_label}.{content_type.model}",
            "object_id": entry.object_id,
            "object": entry.object_repr,
            "by": entry.user.get_username() if entry.user_id else None,
        },
    )
