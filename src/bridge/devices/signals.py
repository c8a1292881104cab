"""Record every change that live connections must hear of as a Change row.

Each bridge process reads these rows (or the Redis bus carries them), so a
grant revoked in the admin, in ``bridge-admin`` or in a worker reaches every
live connection within a second.  Changes made with ``QuerySet.update()``
send no signals and are not seen; use the models or the admin.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model, user_logged_out, user_login_failed
from django.contrib.auth.models import Group
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from bridge.devices.models import Change, Device, Grant

User = get_user_model()


def record(kind: str, **fields: Any) -> None:
    Change.objects.create(kind=kind, **fields)


@receiver([post_save, post_delete], sender=Grant, dispatch_uid="bridge-grant")
def grant_changed(instance: Grant, **kwargs: Any) -> None:
    if instance.user_id is not None:
        record(Change.USER, user_id=instance.user_id)
    elif instance.group_id is not None:
        record(Change.GROUP, group_id=instance.group_id)


@receiver([post_save, post_delete], sender=Device, dispatch_uid="bridge-device")
def device_changed(instance: Device, **kwargs: Any) -> None:
    record(Change.DEVICE, device_id=instance.pk)


@receiver([post_save, post_delete], sender=User, dispatch_uid="bridge-user")
def user_changed(instance: Any, **kwargs: Any) -> None:
    # Covers is_active, is_superuser and password changes (the auth hash moves).
    record(Change.USER, user_id=instance.pk)


@receiver(post_delete, sender=Group, dispatch_uid="bridge-group")
def group_deleted(instance: Group, **kwargs: Any) -> None:
    record(Change.ALL)


@receiver(m2m_changed, sender=User.groups.through, dispatch_uid="bridge-membership")
def membership_changed(
    instance: Any, action: str, reverse: bool, pk_set: set[int] | None, **kwargs: Any
) -> None:
    if not action.startswith("post_"):
        return
    if not reverse:
        record(Change.USER, user_id=instance.pk)
    elif pk_set is None:  # group.user_set.clear(): members unknown now
        record(Change.ALL)
    else:
        for user_id in pk_set:
            record(Change.USER, user_id=user_id)


@receiver(user_logged_out, dispatch_uid="bridge-logout")
def logged_out(request: Any, user: Any, **kwargs: Any) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        record(Change.LOGOUT, session_key=session_key, user_id=getattr(user, "pk", None))


def _admin_log_entry(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    from django.conf import settings

    if not created or not getattr(settings, "BRIDGE_NOTIFY_ADMIN_CHANGES", False):
        return
    from bridge.notify import admin_change_notice, publish

    notice = admin_change_notice(instance)
    if notice is not None:
        publish(*notice)


def connect_admin_notices() -> None:
    """Opt-in (BRIDGE_NOTIFY_ADMIN_CHANGES): admin changes go to who may view them."""
    from django.contrib.admin.models import LogEntry

    post_save.connect(_admin_log_entry, sender=LogEntry, dispatch_uid="bridge-admin-notices")


@receiver(user_login_failed, dispatch_uid="bridge-login-failed")
def login_failed(credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    """Every failed password check counts: the login form and POST /api/token/."""
    from bridge.throttle import address_key, logins, user_key

    address = request.META.get("REMOTE_ADDR") if request is not None else None
    logins().failed(address_key(address), user_key(credentials.get("username")))
