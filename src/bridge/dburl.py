"""``DATABASE_URL`` to a Django DATABASES entry (PostgreSQL and SQLite)."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit


def parse_database_url(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path) or ":memory:"}
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"unsupported DATABASE_URL scheme {parts.scheme!r}")
    options: dict[str, object] = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    # A database host that is down (no RST) must fail an ORM call in seconds,
    # not after the kernel's SYN retries (minutes), or every pool thread waits.
    options.setdefault("connect_timeout", 5)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        # Connections are bounded by the thread pools and checked before use,
        # so a database restart costs one failed call per thread at most.
        "CONN_MAX_AGE": 300,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": options,
    }
