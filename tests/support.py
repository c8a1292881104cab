"""Shared test helpers: Django on a temp database, real-component gating."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

REPO = Path(__file__).resolve().parent.parent
_DATA_DIR: Path | None = None


def setup_django() -> Path:
    """Point Django at a fresh data directory, migrated once per test run."""
    global _DATA_DIR
    if _DATA_DIR is not None:
        return _DATA_DIR
    _DATA_DIR = Path(tempfile.mkdtemp(prefix="bridge-tests-"))
    atexit.register(shutil.rmtree, _DATA_DIR, True)
    os.environ.pop("DATABASE_URL", None)
    from bridge.config import configure

    configure(_DATA_DIR, "django_site.settings")
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    setup_test_environment()

    call_command("migrate", interactive=False, verbosity=0)
    return _DATA_DIR


def require(available: bool, reason: str) -> None:
    """Skip when a real component is missing; under CI=true that is a failure."""
    if available:
        return
    if os.environ.get("CI") == "true":
        raise AssertionError(f"required component missing under CI: {reason}")
    raise SkipTest(reason)


def reset_database() -> None:
    """Empty every table the tests write to (ORM runs on threads, so no rollback)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.contrib.sessions.models import Session

    from bridge.devices.models import AuditEntry, Change, Device, Grant, StatusRecord

    for model in (Grant, StatusRecord, AuditEntry, Change, Device, Session, Group):
        model.objects.all().delete()
    get_user_model()._default_manager.all().delete()


def make_user(username: str, password: str | None = None, **flags: Any) -> Any:
    from django.contrib.auth import get_user_model

    user = get_user_model()(username=username, **flags)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.save()
    return user


def redis_listening(host: str = "127.0.0.1", port: int = 6379) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float = 10.0, poll: float = 0.02) -> Any:
    """A Deferred that fires once ``predicate()`` is true, failing after ``timeout`` s."""
    import time

    from twisted.internet import defer, reactor, task

    @defer.inlineCallbacks
    def waiting() -> Any:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            yield task.deferLater(reactor, poll, lambda: None)

    return waiting()
