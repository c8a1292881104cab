"""DATABASE_URL to Django's DATABASES entry."""

from __future__ import annotations

from twisted.trial import unittest

from bridge.dburl import parse_database_url


class DatabaseUrlTests(unittest.SynchronousTestCase):
    def test_postgres_with_health_checks_and_a_connect_timeout(self) -> None:
        db = parse_database_url("postgres://bridge:s%40cret@db.internal:6432/plant?sslmode=require")
        self.assertEqual(
            (db["ENGINE"], db["NAME"], db["USER"], db["PASSWORD"], db["HOST"], db["PORT"]),
            ("django.db.backends.postgresql", "plant", "bridge", "s@cret", "db.internal", "6432"),
        )
        self.assertTrue(db["CONN_HEALTH_CHECKS"])
        self.assertEqual(db["OPTIONS"], {"sslmode": "require", "connect_timeout": 5})

    def test_the_url_may_set_its_own_connect_timeout(self) -> None:
        db = parse_database_url("postgresql://db/plant?connect_timeout=2")
        self.assertEqual(db["OPTIONS"], {"connect_timeout": "2"})

    def test_sqlite_and_unknown_schemes(self) -> None:
        self.assertEqual(parse_database_url("sqlite:///tmp/x.db")["NAME"], "/tmp/x.db")
        with self.assertRaises(ValueError):
            parse_database_url("mysql://db/plant")
