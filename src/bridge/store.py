"""What the hub keeps in the database: history, audit, device configuration.

Writes are gathered on the reactor thread and flushed in batches on the ORM
pool, one batch at a time and in order, so the fan-out path never waits on
the database and a command's audit entry is always created before it is
finished.  A failed batch (database down, disk full) is logged and retried;
past ``max_backlog`` entries the oldest statuses are dropped, never audit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from bridge.hub import CommandRecord, DeviceConfig, HistoryEntry, IRecorder
from bridge.threads import PoolService

log = Logger()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Anything else worth an audit entry: denied requests, failed logins."""

    action: str
    user_id: int | None
    username: str | None
    device_id: str | None
    detail: str
    payload: Any = None
    result: str = "denied"
    remote_addr: str | None = None


@implementer(IRecorder)
class Store(Service):
    name = "store"

    def __init__(
        self,
        db: PoolService,
        clock: IReactorTime,
        flush_interval: float = 0.25,
        max_backlog: int = 100_000,
    ) -> None:
        self.db = db
        self.clock = clock
        self.flush_interval = flush_interval
        self.max_backlog = max_backlog
        self._statuses: list[tuple[str, HistoryEntry]] = []
        self._audit: list[CommandRecord | AuditRecord] = []
        self._flushing: Deferred[None] | None = None
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self.failures = 0

    # IRecorder
    def status(self, device_id: str, entry: HistoryEntry) -> None:
        self._statuses.append((device_id, entry))
        if len(self._statuses) > self.max_backlog:
            del self._statuses[: len(self._statuses) - self.max_backlog]

    def command(self, record: CommandRecord) -> None:
        self._audit.append(record)

    def audit(self, record: AuditRecord) -> None:
        self._audit.append(record)

    @property
    def backlog(self) -> int:
        return len(self._statuses) + len(self._audit)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.flush_interval, now=False)

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        # Whatever is buffered at shutdown is written before the process exits.
        if self._flushing is not None:
            yield self._flushing
        yield self.flush()

    def flush(self) -> Deferred[None] | None:
        if self._flushing is not None or not (self._statuses or self._audit):
            return self._flushing
        statuses, audit = self._statuses, self._audit
        self._statuses, self._audit = [], []
        d = self.db.orm(write_batch, statuses, audit)

        def failed(failure: Any) -> None:
            self.failures += 1
            log.failure(
                "could not write {n} history and {m} audit entries; will retry",
                failure,
                n=len(statuses),
                m=len(audit),
            )
            # Put them back in front, in order.
            self._statuses[:0] = statuses
            self._audit[:0] = audit

        def done(_: Any) -> None:
            self._flushing = None

        d.addCallbacks(lambda _: None, failed)
        d.addBoth(done)
        self._flushing = d
        return d


def write_batch(
    statuses: list[tuple[str, HistoryEntry]], audit: list[CommandRecord | AuditRecord]
) -> None:
    from bridge.devices.models import AuditEntry, Device, StatusRecord

    with transaction.atomic():
        if statuses:
            sizes = dict(
                Device.objects.filter(pk__in={d for d, _ in statuses}).values_list(
                    "id", "history_size"
                )
            )
            StatusRecord.objects.bulk_create(
                StatusRecord(
                    device_id=device_id,
                    ts=e.ts,
                    payload=e.payload,
                    by=e.by,
                    command_id=e.command_id,
                )
                for device_id, e in statuses
                if device_id in sizes
            )
            for device_id, size in sizes.items():
                trim_history(device_id, size)
        for record in audit:
            if isinstance(record, AuditRecord):
                AuditEntry.objects.create(
                    user_id=record.user_id,
                    username=record.username or "",
                    device_id=record.device_id or "",
                    action=record.action,
                    payload=record.payload,
                    result=record.result,
                    detail=record.detail,
                    remote_addr=record.remote_addr or "",
                )
            elif record.result == "sent":
                AuditEntry.objects.create(
                    user_id=record.user_id,
                    username=record.username or "",
                    device_id=record.device_id,
                    action="command",
                    payload=record.payload,
                    command_id=record.command_id,
                    result="sent",
                    remote_addr=record.remote_addr or "",
                )
            else:
                AuditEntry.objects.filter(command_id=record.command_id, action="command").update(
                    result=record.result, detail=record.detail
                )


def trim_history(device_id: str, size: int) -> None:
    from bridge.devices.models import StatusRecord

    rows = StatusRecord.objects.filter(device_id=device_id)
    cutoff = rows.order_by("-id").values_list("id", flat=True)[size : size + 1]
    cut = list(cutoff)
    if cut:
        rows.filter(id__lte=cut[0]).delete()


def load_devices(ids: Iterable[str] | None = None) -> list[tuple[DeviceConfig, list[HistoryEntry]]]:
    """Enabled devices with their persisted history, oldest first."""
    from bridge.devices.models import Device, StatusRecord

    devices = Device.objects.filter(enabled=True)
    if ids is not None:
        devices = devices.filter(pk__in=list(ids))
    result = []
    for d in devices:
        rows = list(StatusRecord.objects.filter(device_id=d.id).order_by("-id")[: d.history_size])
        history = [HistoryEntry(r.payload, r.ts, r.by, r.command_id) for r in reversed(rows)]
        result.append((config_of(d), history))
    return result


def config_of(d: Any) -> DeviceConfig:
    return DeviceConfig(
        id=d.id,
        name=d.name,
        kind=d.kind,
        history_size=d.history_size,
        command_timeout=d.command_timeout,
        public=d.public,
    )
