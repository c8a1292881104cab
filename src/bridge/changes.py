"""Grants, users and devices changed somewhere: bring live sessions up to date.

:class:`ChangeFeed` reads the Change rows that signal handlers write in any
process; :class:`Reconciler` reloads what they touch on the ORM pool and then,
on the reactor thread, tells each affected session (DEVICE_CHANGED,
DEVICE_REMOVED, or a close with 4011).  Together they keep spec §5's
one-second rule without asking the database on every message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from bridge import identity as identities
from bridge import permissions
from bridge.grants import GrantsCache
from bridge.hub import DeviceConfig, HistoryEntry, Hub
from bridge.notify import BadTarget, recipients
from bridge.session import DeviceView, Identity, Role, Session, State
from bridge.threads import PoolService, database_unavailable

log = Logger()


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    kind: str
    user_id: int | None = None
    group_id: int | None = None
    device_id: str = ""
    session_key: str = ""
    data: Any = None


FETCH_LIMIT = 1000


_CHANGE_COLUMNS = ("id", "kind", "user_id", "group_id", "device_id", "session_key", "data")


def fetch_changes(after: int, limit: int = FETCH_LIMIT) -> tuple[int, list[ChangeEvent]]:
    """The changes after ``after``, oldest first, and the id of the last.

    Run four times a second by every process, nearly always finding nothing:
    one plain SELECT, as the ORM took ten times longer to build it than the
    database to answer, with the GIL the reactor thread waits for.
    """
    from django.db import connection

    from bridge.devices.models import Change

    quote = connection.ops.quote_name
    sql = (
        f"SELECT {', '.join(map(quote, _CHANGE_COLUMNS))} FROM {quote(Change._meta.db_table)} "
        f"WHERE {quote('id')} > %s ORDER BY {quote('id')} LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [after, limit])
        rows = cursor.fetchall()
    if not rows:
        return after, []
    data = Change._meta.get_field("data")
    return rows[-1][0], [
        ChangeEvent(kind, user_id, group_id, device_id, session_key, _json(data, value))
        for _, kind, user_id, group_id, device_id, session_key, value in rows
    ]


def _json(field: Any, value: Any) -> Any:
    """A JSONField's value as the ORM would give it, whatever the driver returned."""
    from django.db import connection

    return field.from_db_value(value, None, connection) if isinstance(value, str) else value


def latest_change_id() -> int:
    from bridge.devices.models import Change

    row = Change.objects.order_by("-id").values_list("id", flat=True).first()
    return row or 0


def prune_changes(max_age_seconds: float) -> int:
    from datetime import timedelta

    from django.utils import timezone

    from bridge.devices.models import Change

    cutoff = timezone.now() - timedelta(seconds=max_age_seconds)
    deleted, _ = Change.objects.filter(created__lt=cutoff).delete()
    return deleted


class ChangeFeed(Service):
    """Polls the Change table; cheap (one indexed query) and process-agnostic."""

    name = "change-feed"

    def __init__(
        self,
        db: PoolService,
        clock: IReactorTime,
        deliver: Callable[[list[ChangeEvent]], Any],
        interval: float = 0.25,
        keep_seconds: float = 600.0,
        fresh: Callable[[float], Any] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.deliver = deliver
        # Told, after each good read, when that read began: every change
        # committed before then has been delivered (the grants cache's trust).
        self.fresh = fresh
        self.keep_seconds = keep_seconds
        self.last_id: int | None = None
        self._busy = False
        self._polls = 0
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    @inlineCallbacks
    def poll(self) -> Any:
        if self._busy:
            return
        self._busy = True
        try:
            began = self.clock.seconds()
            if self.last_id is None:
                self.last_id = yield self.db.orm(latest_change_id)
                if self.fresh is not None:
                    self.fresh(began)
                return
            last, events = yield self.db.orm(fetch_changes, self.last_id)
            self.last_id = last
            if events:
                yield self.deliver(events)
            if self.fresh is not None and len(events) < FETCH_LIMIT:
                self.fresh(began)  # a full page means more are waiting: not caught up
            self._polls += 1
            if self._polls % 2400 == 0:
                yield self.db.orm(prune_changes, self.keep_seconds)
        except Exception as e:
            if not database_unavailable(e):  # that, the pool logs once
                log.failure("reading changes failed; retrying")
        finally:
            self._busy = False


@dataclass
class _Plan:
    """What a batch of changes asks for, gathered on the reactor thread."""

    devices: set[str] = field(default_factory=set)
    everyone: bool = False
    users: set[int] = field(default_factory=set)
    groups: set[int] = field(default_factory=set)
    logouts: set[str] = field(default_factory=set)
    notices: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, events: Iterable[ChangeEvent]) -> _Plan:
        plan = cls()
        for e in events:
            if e.kind == "device":
                plan.devices.add(e.device_id)
                plan.everyone = True
            elif e.kind == "all":
                plan.everyone = True
            elif e.kind == "user" and e.user_id is not None:
                plan.users.add(e.user_id)
            elif e.kind == "group" and e.group_id is not None:
                plan.groups.add(e.group_id)
            elif e.kind == "logout":
                plan.logouts.add(e.session_key)
            elif e.kind == "notify" and isinstance(e.data, dict):
                plan.notices.append(e.data)
        return plan


@dataclass
class _Outcome:
    devices: dict[str, tuple[DeviceConfig, list[HistoryEntry]]]
    verdicts: dict[Identity, str | dict[str, DeviceView]]
    notices: list[tuple[dict[str, Any], set[Identity]]] = field(default_factory=list)
    # Devices of the plan that still exist but are disabled (the rest are deleted).
    disabled: set[str] = field(default_factory=set)


def _resolve(plan: _Plan, identities_: list[Identity]) -> _Outcome:
    from bridge.store import load_devices

    loaded = {c.id: (c, h) for c, h in load_devices(plan.devices)} if plan.devices else {}
    disabled: set[str] = set()
    if plan.devices - loaded.keys():
        from bridge.devices.models import Device

        disabled = set(
            Device.objects.filter(pk__in=plan.devices - loaded.keys(), enabled=False).values_list(
                "pk", flat=True
            )
        )
    group_users: set[int] = set()
    for group_id in plan.groups:
        group_users |= permissions.users_in_group(group_id)
    affected = [
        i
        for i in identities_
        if plan.everyone or i.user_id in plan.users or i.user_id in group_users
    ]
    verdicts: dict[Identity, str | dict[str, DeviceView]] = {}
    # The superuser flag is part of the identity: a change either way (a
    # superuser demoted keeps "change on everything" otherwise) revokes it.
    supers = _superusers_now(i.user_id for i in affected if i.role is Role.OPERATOR)
    plain = []
    for i in affected:
        reason = identities.still_valid(i)
        if reason is None and i.role is Role.OPERATOR and (i.user_id in supers) != i.is_superuser:
            reason = "superuser status changed"
        if reason is not None:
            verdicts[i] = reason
        elif i.role is Role.OPERATOR and not i.is_superuser:
            plain.append(i)
        else:
            verdicts[i] = permissions.grants_for(i)
    if plain:
        bulk = permissions.grants_for_users(i.user_id for i in plain)
        for i in plain:
            verdicts[i] = bulk.get(i.user_id or 0, {})
    notices = []
    for notice in plan.notices:
        try:
            notices.append((notice, recipients(str(notice.get("target")), identities_)))
        except BadTarget:
            log.warn("dropped a notice with a bad target {target!r}", target=notice.get("target"))
    return _Outcome(loaded, verdicts, notices, disabled)


def _superusers_now(user_ids: Iterable[int | None]) -> set[int]:
    from django.contrib.auth import get_user_model

    ids = {u for u in user_ids if u is not None}
    manager = get_user_model()._default_manager
    return set(manager.filter(pk__in=ids, is_superuser=True).values_list("pk", flat=True))


class Reconciler:
    """Applies batches of changes, one batch at a time, in order."""

    def __init__(
        self, hub: Hub, db: PoolService, clock: IReactorTime, grants: GrantsCache | None = None
    ) -> None:
        self.hub = hub
        self.db = db
        self.clock = clock
        self.grants = grants

    @inlineCallbacks
    def apply(self, events: list[ChangeEvent]) -> Any:
        plan = _Plan.of(events)
        if self.grants is not None and (plan.everyone or plan.groups or plan.users):
            # Before the sessions are looked at: whoever got cached grants until
            # now is among the sessions brought up to date below.
            self.grants.changed(plan.users, everyone=plan.everyone or bool(plan.groups))
        self._logouts(plan.logouts)
        sessions = [s for s in self.hub.sessions.values() if s.state is State.READY]
        ids = list({s.identity for s in sessions if s.identity is not None})
        outcome: _Outcome = yield self.db.orm(_resolve, plan, ids)
        for device_id in plan.devices:
            if device_id in outcome.devices:
                config, history = outcome.devices[device_id]
                self.hub.set_device(config, history)
        for device_id in outcome.disabled:
            self.hub.device_disabled(device_id)  # DEVICE_STATE, before DEVICE_REMOVED
        for session in list(self.hub.sessions.values()):
            verdict = outcome.verdicts.get(session.identity) if session.identity else None
            if verdict is None:
                continue
            if isinstance(verdict, str):
                self._revoke(session, verdict)
            else:
                dropped = session.update_grants(verdict)
                self.hub.drop_subscriptions(session, dropped)
        for device_id in plan.devices:
            if device_id not in outcome.devices:
                self.hub.remove_device(device_id)
        for notice, who in outcome.notices:
            targets = [s for s in self.hub.sessions.values() if s.identity in who]
            self.hub.notify(targets, str(notice.get("event")), notice.get("data"))

    def _logouts(self, keys: set[str]) -> None:
        if not keys:
            return
        for session in list(self.hub.sessions.values()):
            if session.identity is not None and session.identity.session_key in keys:
                self._revoke(session, "logged out")

    def _revoke(self, session: Session, reason: str) -> None:
        link = session.link
        actions = session.revoke(reason)
        if link is not None:
            link.execute(actions)
        self.hub.forget(session)
        log.info(
            "closed session {sid} of {user}: {reason}",
            sid=session.session_id,
            user=session.identity.username if session.identity else None,
            reason=reason,
        )
