"""Which devices an identity may read or change (spec §5).

The highest of: superuser (change on everything), the user's own grants, the
grants of the user's groups, and a device's ``public`` flag (read).  Disabled
devices are readable by nobody.  Runs on the ORM thread pool; the result is
cached per connection in its :class:`~bridge.session.Session`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db.models import Q

from bridge.devices.models import Device, Grant
from bridge.session import DeviceView, Identity, Permission, Role

_LEVEL = {Grant.READ: Permission.READ, Grant.CHANGE: Permission.CHANGE}


def anonymous_enabled() -> bool:
    return bool(getattr(settings, "BRIDGE_ANONYMOUS", False))


# Every session holds a view per readable device; identical views are shared
# rather than copied per session (with their strings, fresh from each query),
# which is most of a connection's memory when users read many devices.
_views: dict[tuple[str, str, str, int, Permission], DeviceView] = {}


def _view(device: Device, permission: Permission) -> DeviceView:
    key = (device.id, device.name, device.kind, device.history_size, permission)
    view = _views.get(key)
    if view is None:
        if len(_views) > 100_000:  # renamed and resized devices leave old keys
            _views.clear()
        view = _views[key] = DeviceView(*key)
    return view


def grants_for(identity: Identity) -> dict[str, DeviceView]:
    devices = Device.objects.filter(enabled=True)
    if identity.role is Role.DEVICE:
        # A device client reports its own device's state: change, on it alone.
        return {d.id: _view(d, Permission.CHANGE) for d in devices.filter(pk=identity.device_id)}
    if identity.role is Role.ANONYMOUS:
        return {d.id: _view(d, Permission.READ) for d in devices.filter(public=True)}
    if identity.is_superuser:
        return {d.id: _view(d, Permission.CHANGE) for d in devices}
    return grants_for_users([identity.user_id])[identity.user_id] if identity.user_id else {}


def grants_for_users(user_ids: Iterable[int | None]) -> dict[int, dict[str, DeviceView]]:
    """Grants of several (non-superuser) users in three queries, for bulk refreshes."""
    from django.contrib.auth import get_user_model

    ids = [u for u in set(user_ids) if u is not None]
    User = get_user_model()
    memberships: dict[int, set[int]] = {u: set() for u in ids}
    for user_id, group_id in User.groups.through.objects.filter(user_id__in=ids).values_list(
        "user_id", "group_id"
    ):
        memberships[user_id].add(group_id)
    all_groups = set().union(*memberships.values()) if memberships else set()
    grant_rows = list(
        Grant.objects.filter(device__enabled=True)
        .filter(Q(user_id__in=ids) | Q(group_id__in=all_groups))
        .values_list("device_id", "user_id", "group_id", "permission")
    )
    public = list(Device.objects.filter(enabled=True, public=True))
    wanted = {row[0] for row in grant_rows}
    devices = {d.id: d for d in Device.objects.filter(pk__in=wanted)}
    devices.update({d.id: d for d in public})
    result: dict[int, dict[str, DeviceView]] = {}
    for user_id in ids:
        levels: dict[str, Permission] = {d.id: Permission.READ for d in public}
        groups = memberships[user_id]
        for device_id, g_user, g_group, permission in grant_rows:
            if g_user == user_id or (g_group is not None and g_group in groups):
                level = _LEVEL[permission]
                if level > levels.get(device_id, 0):
                    levels[device_id] = level
        result[user_id] = {
            d: _view(devices[d], level) for d, level in sorted(levels.items()) if d in devices
        }
    return result


def users_in_group(group_id: int) -> set[int]:
    from django.contrib.auth import get_user_model

    through: Any = get_user_model().groups.through
    return set(through.objects.filter(group_id=group_id).values_list("user_id", flat=True))
