"""What the hub keeps in the database: history, audit, device configuration.

Writes are gathered on the reactor thread and flushed in batches on the ORM
pool, one batch at a time and in order, so the fan-out path never waits on
the database and a command's audit entry is always created before it is
finished.  A failed batch (database down, disk full) is logged and retried;
past ``max_backlog`` entries the oldest statuses are dropped, never audit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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
from bridge.threads import PoolService, database_unavailable

log = Logger()

# device id, ts, payload JSON, by, command id, ordinal: a history row ready for the driver.
StatusRow = tuple[str, int, str, str | None, str | None, int]


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
        trim_every: int = 200,
    ) -> None:
        self.db = db
        self.clock = clock
        self.flush_interval = flush_interval
        self.max_backlog = max_backlog
        self._statuses: list[StatusRow] = []
        self._audit: list[CommandRecord | AuditRecord] = []
        self._flushing: Deferred[None] | None = None
        # Rows taken by the batch on the pool: not written until it succeeds.
        self._in_flight = 0
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self.failures = 0
        self.coalesced = 0
        # Rows the database refused (bad data), left out so that the rest is written.
        self.refused = 0
        # Old rows are deleted per device once this many new ones accumulated,
        # not on every flush: the table holds at most history_size + trim_every.
        self.trim_every = trim_every
        self._untrimmed: Counter[str] = Counter()
        # How many statuses a device keeps; rows beyond that in one batch
        # would be trimmed right after being written, so they are not written.
        self.history_size: Callable[[str], int | None] = lambda device_id: None

    # IRecorder
    def status(self, device_id: str, entry: HistoryEntry, payload_json: bytes) -> None:
        self._statuses.append(
            (device_id, entry.ts, payload_json.decode(), entry.by, entry.command_id, entry.n)
        )
        if len(self._statuses) > self.max_backlog:
            del self._statuses[: len(self._statuses) - self.max_backlog]

    def command(self, record: CommandRecord) -> None:
        self._audit.append(record)

    def audit(self, record: AuditRecord) -> None:
        self._audit.append(record)

    @property
    def backlog(self) -> int:
        """Rows not yet written, the batch being written included.

        Without it a flush stuck on a database that is just coming back read
        as an empty backlog, and /healthz said "all written" before it was.
        """
        return len(self._statuses) + len(self._audit) + self._in_flight

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
        yield self.flush(final=True)

    def _coalesce(self, rows: list[StatusRow]) -> list[StatusRow]:
        """Only each device's newest ``history_size`` rows of a batch, in order."""
        counts = Counter(row[0] for row in rows)
        if all(n <= (self.history_size(d) or n) for d, n in counts.items()):
            return rows
        left = {d: self.history_size(d) or n for d, n in counts.items()}
        kept = []
        for row in reversed(rows):
            if left[row[0]] > 0:
                left[row[0]] -= 1
                kept.append(row)
        self.coalesced += len(rows) - len(kept)
        kept.reverse()
        return kept

    def flush(self, final: bool = False) -> Deferred[None] | None:
        if self._flushing is not None or not (self._statuses or self._audit):
            return self._flushing
        statuses, audit = self._coalesce(self._statuses), self._audit
        self._statuses, self._audit = [], []
        self._untrimmed.update(row[0] for row in statuses)
        trim = {d for d, n in self._untrimmed.items() if n >= self.trim_every or final}
        for device_id in trim:
            del self._untrimmed[device_id]
        self._in_flight = len(statuses) + len(audit)
        d: Deferred[Any] = self.db.orm(write_batch, statuses, audit, trim)

        def failed(failure: Any) -> None:
            self.failures += 1
            if not database_unavailable(failure):  # that, the pool logs once
                log.failure(
                    "could not write {n} history and {m} audit entries; will retry",
                    failure,
                    n=len(statuses),
                    m=len(audit),
                )
            # Put them back in front, in order.
            self._statuses[:0] = statuses
            self._audit[:0] = audit

        def written(refused: int) -> None:
            self.refused += refused

        def done(_: Any) -> None:
            self._flushing = None
            self._in_flight = 0

        flushing: Deferred[None] = d.addCallbacks(written, failed)
        flushing.addBoth(done)
        self._flushing = flushing
        return flushing


def write_batch(
    statuses: list[StatusRow],
    audit: list[CommandRecord | AuditRecord],
    trim: Iterable[str] = (),
) -> int:
    """Write a batch in one transaction; returns how many rows could not be stored.

    A database that is down or full raises, and the caller retries the whole
    batch later. A row the database refuses (bad data: a value PostgreSQL
    cannot hold, a constraint) must not stop every later write: the batch is
    then written row by row, and only what is refused is left out.
    """
    from django.db import DataError, IntegrityError

    try:
        with transaction.atomic():
            _write(statuses, audit, set(trim))
        return 0
    except (DataError, IntegrityError, ValueError):
        log.warn(
            "a batch of {n} rows was refused; writing it row by row", n=len(statuses) + len(audit)
        )
    return _write_each(statuses, audit, set(trim))


def _write(
    statuses: list[StatusRow], audit: list[CommandRecord | AuditRecord], trim: set[str]
) -> None:
    if statuses or trim:
        sizes = history_sizes({row[0] for row in statuses} | trim)
        insert_statuses([row for row in statuses if row[0] in sizes])
        trim_histories({d: sizes[d] for d in trim & sizes.keys()})
    write_audits(audit)


def history_sizes(ids: set[str]) -> dict[str, int]:
    """How many statuses each of these devices keeps; deleted devices are absent.

    One plain SELECT: the ORM spent more time building it than the database
    running it, on every flush, with the GIL held.
    """
    from django.db import connection

    from bridge.devices.models import Device

    if not ids:
        return {}
    quote = connection.ops.quote_name
    sql = (
        f"SELECT {quote('id')}, {quote('history_size')} FROM {quote(Device._meta.db_table)} "
        f"WHERE {quote('id')} IN ({', '.join(['%s'] * len(ids))})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, sorted(ids))
        return dict(cursor.fetchall())


def _write_each(
    statuses: list[StatusRow], audit: list[CommandRecord | AuditRecord], trim: set[str]
) -> int:
    from django.db import DataError, IntegrityError

    refused = 0
    for row in statuses:
        try:
            with transaction.atomic():
                _write([row], [], set())
        except (DataError, IntegrityError, ValueError) as e:
            refused += 1
            log.error(
                "dropped a status of device {device} the database refused: {e}", device=row[0], e=e
            )
    for record in audit:
        try:
            with transaction.atomic():
                write_audits([record])
            continue
        except (DataError, IntegrityError, ValueError) as e:
            error = e
        try:
            # The entry itself is kept, without the payload that was refused.
            with transaction.atomic():
                write_audits([_without_payload(record, error)])
        except (DataError, IntegrityError, ValueError) as e:
            refused += 1
            log.error(
                "dropped an audit entry the database refused: {record!r}: {e}", record=record, e=e
            )
    with transaction.atomic():
        _write([], [], trim)
    return refused


def _without_payload(record: CommandRecord | AuditRecord, error: Exception) -> Any:
    import dataclasses

    note = f"payload not stored: {type(error).__name__}"
    detail = f"{record.detail}; {note}" if record.detail else note
    return dataclasses.replace(record, payload=None, detail=detail)


def write_audits(records: list[CommandRecord | AuditRecord]) -> None:
    """A batch's audit entries in one INSERT and one UPDATE, each an executemany.

    Written one ORM call each (and even through ``bulk_create``, which builds
    and prepares a model instance per row), a flush of a busy quarter second
    held the GIL for milliseconds while the reactor thread waited for it:
    that was the tail of every command's round trip. A command sent and
    finished within one batch is inserted finished; one sent in an earlier
    batch is updated, the last outcome in the batch winning, as row by row.
    """
    from django.db import connection
    from django.utils import timezone

    from bridge.devices.models import AuditEntry

    nul = _no_nul()
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    rows: list[list[Any]] = []
    fresh: dict[str, list[Any]] = {}
    finished: dict[str, tuple[str, str]] = {}
    for record in records:
        if isinstance(record, AuditRecord) or record.result == "sent":
            row = _audit_row(now, record, nul)
            rows.append(row)
            if isinstance(record, CommandRecord):
                fresh[record.command_id] = row
        elif (sent := fresh.get(record.command_id)) is not None:
            sent[_RESULT], sent[_DETAIL] = record.result, _text(record.detail, nul)
        else:
            finished[record.command_id] = (record.result, _text(record.detail, nul))
    if rows:
        _insert_many(AuditEntry, _AUDIT_COLUMNS, rows)
    if finished:
        quote = connection.ops.quote_name
        result, detail, command_id, action = map(
            quote, ("result", "detail", "command_id", "action")
        )
        sql = (
            f"UPDATE {quote(AuditEntry._meta.db_table)} SET {result} = %s, {detail} = %s "
            f"WHERE {command_id} = %s AND {action} = 'command'"
        )
        with connection.cursor() as cursor:
            cursor.executemany(sql, [(r, d, i) for i, (r, d) in finished.items()])


_AUDIT_COLUMNS = (
    "time",
    "user_id",
    "username",
    "device_id",
    "action",
    "payload",
    "command_id",
    "result",
    "detail",
    "remote_addr",
)
_RESULT, _DETAIL = _AUDIT_COLUMNS.index("result"), _AUDIT_COLUMNS.index("detail")


def _audit_row(now: Any, record: CommandRecord | AuditRecord, nul: bool) -> list[Any]:
    """The INSERT's values, as AuditEntry's fields would prepare them."""
    payload = None if record.payload is None else json.dumps(_json_value(record.payload, nul))
    if isinstance(record, AuditRecord):
        action, command_id, result, detail = record.action, "", record.result, record.detail
    else:
        action, command_id, result, detail = "command", record.command_id, "sent", ""
    return [
        now,
        record.user_id,
        _text(record.username or "", nul),
        _text(record.device_id or "", nul)[:64],
        action,
        payload,
        command_id,
        result,
        _text(detail, nul),
        record.remote_addr or "",
    ]


def _no_nul() -> bool:
    """PostgreSQL's text and jsonb cannot hold U+0000; every other database can."""
    from django.db import connection

    return connection.vendor == "postgresql"


def _text(value: str, nul: bool) -> str:
    """``value`` as a database that cannot hold U+0000 (``nul``) can store it."""
    return value.replace("\x00", "\ufffd") if nul and "\x00" in value else value


def _json_value(value: Any, nul: bool) -> Any:
    """What PostgreSQL can store of a JSON value: U+0000 becomes U+FFFD."""
    if not nul:
        return value
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_json_value(v, nul) for v in value]
    if isinstance(value, dict):
        return {_json_value(k, nul): _json_value(v, nul) for k, v in value.items()}
    return value


def insert_statuses(rows: list[StatusRow]) -> None:
    """One executemany of rows whose payload is already JSON.

    Model instances would be built, validated and encoded row by row in
    Python, holding the GIL the reactor thread needs; this hands the rows to
    the driver as they are.
    """
    from bridge.devices.models import StatusRecord

    if not rows:
        return
    if _no_nul():
        rows = [_storable_row(row) for row in rows]
    _insert_many(StatusRecord, ("device_id", "ts", "payload", "by", "command_id", "n"), rows)


def _insert_many(model: Any, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """One INSERT run by the driver for every row; ``payload`` is JSON text."""
    from django.db import connection

    quote = connection.ops.quote_name
    jsonb = connection.vendor == "postgresql"
    names = ", ".join(quote(c) for c in columns)
    values = ", ".join("CAST(%s AS jsonb)" if jsonb and c == "payload" else "%s" for c in columns)
    sql = f"INSERT INTO {quote(model._meta.db_table)} ({names}) VALUES ({values})"
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def trim_histories(sizes: dict[str, int]) -> None:
    """Delete every device's rows older than its newest ``size``, in one executemany.

    Through the ORM this was a query and a delete per device, Python work
    holding the GIL for tens of milliseconds when a hundred devices came due
    together, while the reactor waited for it; here each device is one
    indexed statement run by the driver.
    """
    from django.db import connection

    from bridge.devices.models import StatusRecord

    if not sizes:
        return
    table = connection.ops.quote_name(StatusRecord._meta.db_table)
    device, pk = (connection.ops.quote_name(c) for c in ("device_id", "id"))
    # The (size + 1)-th newest row and everything older go; fewer rows: NULL, nothing does.
    sql = (
        f"DELETE FROM {table} WHERE {device} = %s AND {pk} <= ("
        f"SELECT {pk} FROM {table} WHERE {device} = %s ORDER BY {pk} DESC LIMIT 1 OFFSET %s)"
    )
    with connection.cursor() as cursor:
        cursor.executemany(sql, [(d, d, size) for d, size in sorted(sizes.items())])


def load_devices(ids: Iterable[str] | None = None) -> list[tuple[DeviceConfig, list[HistoryEntry]]]:
    """Enabled devices with their persisted history, oldest first."""
    from bridge.devices.models import Device, StatusRecord

    devices = Device.objects.filter(enabled=True)
    if ids is not None:
        devices = devices.filter(pk__in=list(ids))
    result = []
    for d in devices:
        rows = list(StatusRecord.objects.filter(device_id=d.id).order_by("-id")[: d.history_size])
        history = [HistoryEntry(r.payload, r.ts, r.by, r.command_id, r.n) for r in reversed(rows)]
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
        client=bool(d.key_hash),
    )


def _storable_row(row: StatusRow) -> StatusRow:
    """A history row PostgreSQL can store: its JSON, and its text, without U+0000."""
    device_id, ts, payload, by, command_id, n = row
    if "\\u0000" in payload:
        payload = json.dumps(_json_value(json.loads(payload), True), separators=(",", ":"))
    return (device_id, ts, payload, _text(by, True) if by else by, command_id, n)
