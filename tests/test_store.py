"""History and audit persistence: batched, ordered, retried (real ORM, SQLite)."""

from __future__ import annotations

import json
import re
from typing import Any

from django.utils import timezone
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from bridge import protocol
from bridge.devices.models import AuditEntry, Device, StatusRecord
from bridge.hub import CommandRecord, HistoryEntry
from bridge.store import AuditRecord, Store, load_devices, write_batch
from bridge.threads import PoolService
from tests.support import reset_database


def record(result: str, command_id: str = "cmd-1") -> CommandRecord:
    return CommandRecord(
        command_id=command_id,
        client_id="c",
        device_id="dev",
        user_id=None,
        username="ann",
        payload={"on": True},
        result=result,
        remote_addr="10.0.0.1",
    )


def row(device: str, ts: int, payload: Any, by: str | None = None) -> Any:
    return (device, ts, protocol.dumps(payload).decode(), by, None, ts + 1)


class WriteBatchTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        Device.objects.create(id="dev", name="D", kind="toggle", history_size=3)

    def test_statuses_then_reload_oldest_first(self) -> None:
        write_batch([row("dev", i, {"v": i}, "ann") for i in range(5)], [], trim={"dev"})
        self.assertEqual(StatusRecord.objects.count(), 3)
        [(config, history)] = load_devices()
        self.assertEqual(config.history_size, 3)
        self.assertEqual([e.payload for e in history], [{"v": 2}, {"v": 3}, {"v": 4}])
        self.assertEqual(history[0], HistoryEntry({"v": 2}, 2, "ann", None, 3))

    def test_trimming_many_devices_at_once_keeps_each_ones_newest(self) -> None:
        sizes = {"dev": 3, "few": 10, "none": 0, "big": 7}
        for device_id, size in sizes.items():
            Device.objects.update_or_create(
                id=device_id, defaults={"name": device_id, "kind": "sensor", "history_size": size}
            )
        Device.objects.create(id="untouched", name="u", kind="sensor", history_size=1)
        rows = [row(d, ts, ts) for ts in range(12) for d in [*sizes, "untouched"]]
        write_batch(rows, [], trim=set(sizes) | {"gone"})
        kept = {
            d: list(
                StatusRecord.objects.filter(device_id=d).order_by("id").values_list("ts", flat=True)
            )
            for d in [*sizes, "untouched"]
        }
        self.assertEqual(
            kept,
            {
                "dev": [9, 10, 11],
                "few": list(range(2, 12)),
                "none": [],
                "big": list(range(5, 12)),
                "untouched": list(range(12)),  # not due: left for a later batch
            },
        )

    def test_untrimmed_rows_never_show_beyond_history_size(self) -> None:
        write_batch([row("dev", i, i) for i in range(5)], [])
        self.assertEqual(StatusRecord.objects.count(), 5)
        [(_, history)] = load_devices()
        self.assertEqual([e.payload for e in history], [2, 3, 4])

    def test_ordinals_survive_a_reload(self) -> None:
        write_batch([row("dev", i, i) for i in range(3)], [])
        [(_, history)] = load_devices()
        self.assertEqual([e.n for e in history], [1, 2, 3])

    def test_rows_older_than_ordinals_are_numbered_by_id(self) -> None:
        from django.apps import apps

        migration = __import__(
            "bridge.devices.migrations.0003_statusrecord_n", fromlist=["number_existing"]
        )
        for i in range(3):
            StatusRecord.objects.create(device_id="dev", ts=i, payload=i, n=0)
        migration.number_existing(apps, None)
        ids = list(StatusRecord.objects.order_by("id").values_list("id", "n"))
        self.assertEqual([n for _, n in ids], [i for i, _ in ids])

    def test_a_row_the_database_refuses_is_left_out_and_the_rest_written(self) -> None:
        """One bad row must not stop every later write (it used to wedge the store)."""
        bad = ("dev", 9, "not json", None, None, 10)  # SQLite's JSON check refuses it
        audit = [
            AuditRecord("subscribe", None, None, "dev", "denied", payload=float("inf")),
            record("sent"),
        ]
        refused = write_batch([row("dev", 1, 1), bad, row("dev", 2, 2)], audit)
        self.assertEqual(refused, 1)
        self.assertEqual(sorted(StatusRecord.objects.values_list("ts", flat=True)), [1, 2])
        denied = AuditEntry.objects.get(action="subscribe")
        self.assertIsNone(denied.payload)
        self.assertIn("payload not stored", denied.detail)
        self.assertEqual(AuditEntry.objects.get(command_id="cmd-1").result, "sent")

    def test_postgresql_gets_u0000_as_ufffd(self) -> None:
        import bridge.store

        self.patch(bridge.store, "_no_nul", lambda: True)
        stored = bridge.store._storable_row(
            ("dev", 1, '{"a\\u0000":"x\\u0000y"}', "b\x00", None, 1)
        )
        self.assertEqual(json.loads(stored[2]), {"a\ufffd": "x\ufffdy"})
        self.assertEqual(stored[3], "b\ufffd")
        kept = ("dev", 1, '"a\\\\u0000"', None, None, 1)  # an escaped backslash, not a NUL
        self.assertEqual(bridge.store._storable_row(kept), kept)

    def test_history_sizes_of_existing_devices_only(self) -> None:
        from bridge.store import history_sizes

        self.assertEqual(history_sizes({"dev", "gone"}), {"dev": 3})
        self.assertEqual(history_sizes(set()), {})

    def test_rows_for_deleted_devices_are_skipped(self) -> None:
        write_batch([row("gone", 1, 1), row("dev", 2, 2)], [])
        self.assertEqual(list(StatusRecord.objects.values_list("device_id", flat=True)), ["dev"])

    def test_command_entry_created_then_finished(self) -> None:
        write_batch([], [record("sent"), record("confirmed")])
        entry = AuditEntry.objects.get(command_id="cmd-1")
        self.assertEqual(
            (entry.action, entry.result, entry.username, entry.remote_addr),
            ("command", "confirmed", "ann", "10.0.0.1"),
        )
        self.assertEqual(entry.payload, {"on": True})
        self.assertLess(abs((timezone.now() - entry.time).total_seconds()), 60)

    def test_command_finished_in_a_later_batch_is_updated(self) -> None:
        write_batch([], [record("sent")])
        self.assertEqual(AuditEntry.objects.get(command_id="cmd-1").result, "sent")
        write_batch([], [record("timeout")])
        entry = AuditEntry.objects.get(command_id="cmd-1")
        self.assertEqual((entry.result, entry.payload), ("timeout", {"on": True}))

    def test_a_busy_batch_is_a_few_statements_whatever_its_size(self) -> None:
        """Audit rows go in one INSERT and one UPDATE, not one call each.

        A statement per row held the GIL for milliseconds per flush while the
        reactor waited (docs/performance.md, commands).
        """
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        write_batch([], [record("sent", f"old-{i}") for i in range(30)])
        audit: list[Any] = [record("sent", f"new-{i}") for i in range(40)]
        audit += [record("confirmed", f"new-{i}") for i in range(0, 40, 2)]
        audit += [record("confirmed", f"old-{i}") for i in range(20)]
        audit += [record("timeout", f"old-{i}") for i in range(20, 30)]
        audit.append(AuditRecord("subscribe", None, "eve", "secret", "no read permission"))
        with CaptureQueriesContext(connection) as queries:
            write_batch([], audit)
        # An executemany shows as "N times: INSERT ...": one statement for the driver.
        sql = [re.sub(r"^\d+ times: ", "", q["sql"]) for q in queries]
        writes = [w.split()[0] for w in sql if w.startswith(("INSERT", "UPDATE", "DELETE"))]
        self.assertEqual(writes, ["INSERT", "UPDATE"])
        results = dict(
            AuditEntry.objects.filter(action="command").values_list("command_id", "result")
        )
        self.assertEqual(len(results), 70)
        for i in range(40):
            self.assertEqual(results[f"new-{i}"], "confirmed" if i % 2 == 0 else "sent")
        for i in range(30):
            self.assertEqual(results[f"old-{i}"], "confirmed" if i < 20 else "timeout")
        self.assertEqual(AuditEntry.objects.filter(time__isnull=True).count(), 0)

    def test_the_last_outcome_of_a_batch_wins(self) -> None:
        write_batch([], [record("sent", "a"), record("sent", "b")])
        write_batch([], [record("timeout", "a"), record("confirmed", "a")])
        write_batch([], [record("sent", "c"), record("timeout", "c"), record("confirmed", "c")])
        results = dict(AuditEntry.objects.values_list("command_id", "result"))
        self.assertEqual(results, {"a": "confirmed", "b": "sent", "c": "confirmed"})

    def test_denied_attempts(self) -> None:
        write_batch([], [AuditRecord("subscribe", None, "eve", "secret", "no read permission")])
        entry = AuditEntry.objects.get()
        self.assertEqual(
            (entry.action, entry.result, entry.device_id), ("subscribe", "denied", "secret")
        )

    def test_disabled_devices_are_not_loaded(self) -> None:
        Device.objects.create(id="off", name="Off", kind="toggle", enabled=False)
        self.assertEqual([c.id for c, _ in load_devices()], ["dev"])


class StoreServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        reset_database()
        Device.objects.create(id="dev", name="D", kind="toggle", history_size=2)
        self.pool = PoolService(reactor, "test-db", 1, 1)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.store = Store(self.pool, reactor, flush_interval=0.05, trim_every=2)

    @defer.inlineCallbacks
    def test_flush_writes_in_order_and_trims(self) -> Any:
        for i in range(5):
            entry = HistoryEntry(i, i, None)
            self.store.status("dev", entry, protocol.dumps(i))
        self.store.command(record("sent"))
        self.store.command(record("timeout"))
        self.assertEqual(self.store.backlog, 7)
        yield self.store.flush()
        self.assertEqual(self.store.backlog, 0)
        self.assertEqual(sorted(StatusRecord.objects.values_list("ts", flat=True)), [3, 4])
        self.assertEqual(AuditEntry.objects.get().result, "timeout")

    @defer.inlineCallbacks
    def test_failed_batch_is_kept_and_retried(self) -> Any:
        import bridge.store

        calls = []
        real = bridge.store.write_batch

        def failing(*args: Any) -> None:
            calls.append(args)
            if len(calls) == 1:
                raise OSError("disk full")
            real(*args)

        self.patch(bridge.store, "write_batch", failing)
        self.store.status("dev", HistoryEntry(1, 1, None), b"1")
        yield self.store.flush()
        self.assertEqual(self.store.failures, 1)
        self.assertEqual(self.store.backlog, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        yield self.store.flush()
        self.assertEqual(self.store.backlog, 0)
        self.assertEqual(list(StatusRecord.objects.values_list("payload", flat=True)), [1])

    @defer.inlineCallbacks
    def test_the_batch_being_written_counts_in_the_backlog(self) -> Any:
        """/healthz must not say "all written" while a batch is still on its way."""
        import threading

        import bridge.store

        go, started = threading.Event(), threading.Event()
        self.addCleanup(go.set)  # a failed assertion must not leave the pool thread waiting
        real = bridge.store.write_batch

        def slow(*args: Any) -> int:
            started.set()
            go.wait(10)
            return real(*args)

        self.patch(bridge.store, "write_batch", slow)
        self.store.status("dev", HistoryEntry(1, 1, None), b"1")
        self.store.command(record("sent"))
        flushing = self.store.flush()
        yield deferToThread(started.wait, 10)
        self.store.status("dev", HistoryEntry(2, 2, None), b"2")
        self.assertEqual(self.store.backlog, 3)
        go.set()
        yield flushing
        self.assertEqual(self.store.backlog, 1)
        yield self.store.flush()
        self.assertEqual(self.store.backlog, 0)

    @defer.inlineCallbacks
    def test_stop_flushes_what_is_buffered(self) -> Any:
        self.store.startService()
        self.store.status("dev", HistoryEntry("last", 9, None), b'"last"')
        yield self.store.stopService()
        self.assertEqual(list(StatusRecord.objects.values_list("payload", flat=True)), ["last"])


class CoalesceTests(unittest.SynchronousTestCase):
    def test_a_batch_keeps_only_each_devices_newest_history_size_rows(self) -> None:
        store = Store(None, reactor)  # type: ignore[arg-type]
        store.history_size = {"a": 2, "b": 5}.get
        rows = [row("a", i, i) for i in range(4)] + [row("b", 9, 9)] + [row("a", 4, 4)]
        kept = store._coalesce(rows)
        self.assertEqual([(r[0], r[1]) for r in kept], [("a", 3), ("b", 9), ("a", 4)])
        self.assertEqual(store.coalesced, 3)
        store.history_size = lambda device_id: None
        self.assertEqual(store._coalesce(rows), rows)
