"""The ORM pool: results through Deferreds, and whether the database answers."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from tests.support import setup_django


class PoolTests(unittest.TestCase):
    def setUp(self) -> None:
        setup_django()
        from bridge.threads import PoolService

        self.pool = PoolService(reactor, "test", 1, 2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_level") == level and e.get("log_namespace") == "bridge.threads"
        ]

    @defer.inlineCallbacks
    def test_an_outage_is_logged_once_and_its_end_once(self) -> Any:
        from django.db import OperationalError

        from bridge.threads import database_unavailable

        def down() -> None:
            raise OperationalError("connection failed: Connection refused\n\tIs it running?")

        for _ in range(3):
            with self.assertRaises(OperationalError) as caught:
                yield self.pool.orm(down)
            self.assertTrue(database_unavailable(caught.exception))
        health = self.pool.database_health()
        self.assertEqual(
            (health["state"], health["last_error"]),
            ("down", "connection failed: Connection refused"),
        )
        self.assertEqual(len(self.logged(LogLevel.error)), 1)
        result = yield self.pool.orm(lambda: 42)
        self.assertEqual(result, 42)
        self.assertEqual(self.pool.database_health()["state"], "up")
        self.assertEqual(len(self.logged(LogLevel.info)), 1)

    @defer.inlineCallbacks
    def test_other_errors_are_the_callers_and_leave_the_database_up(self) -> Any:
        from bridge.threads import database_unavailable

        def broken() -> None:
            raise KeyError("bug")

        with self.assertRaises(KeyError) as caught:
            yield self.pool.orm(broken)
        self.assertFalse(database_unavailable(caught.exception))
        self.assertEqual(self.pool.database_health()["state"], "up")
        self.assertEqual(self.logged(LogLevel.error), [])
