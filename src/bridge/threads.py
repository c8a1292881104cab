"""Dedicated thread pools: Django views, ORM calls and password hashing.

None of them is the reactor's default pool, which name resolution shares, so
a burst of logins cannot stall DNS and a slow query cannot stall a login.

Each pool thread holds at most one database connection (Django's are per
thread), so the pools bound the connections a process opens.  The ORM pool
also tells whether the database answers: one log line when it stops, one
when it is back, instead of a traceback from every caller in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import InterfaceError, OperationalError, close_old_connections
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")

log = Logger()


def database_unavailable(error: BaseException | Failure) -> bool:
    """Whether an ORM call failed for want of a database (down, restarting, unreachable).

    Callers that retry anyway (the store, the change feed) or fail closed
    (IDENTIFY) need not log these: the pool says it once (:class:`PoolService`).
    """
    if isinstance(error, Failure):
        return error.check(OperationalError, InterfaceError) is not None
    return isinstance(error, OperationalError | InterfaceError)


class PoolService(Service):
    """A named ThreadPool that starts and stops with the service tree."""

    def __init__(self, reactor: IReactorThreads, name: str, minthreads: int, maxthreads: int):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads, maxthreads, name=f"bridge-{name}")
        self.setName(f"pool-{name}")
        # What the last ORM call found; for /healthz and the log.
        self.database_up = True
        self._database_since = time.time()
        self._database_error: str | None = None

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()

    @property
    def queued(self) -> int:
        return self.pool.q.qsize()

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run plain code on the pool; the result arrives through a Deferred."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)

    def orm(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run ORM code on the pool with Django's connection hygiene around it."""
        d: Deferred[T] = self.run(_with_connections, fn, *args, **kwargs)  # type: ignore[arg-type]
        d.addCallbacks(self._reached, self._not_reached)
        return d

    def _reached(self, result: T) -> T:
        if not self.database_up:
            log.info(
                "database reachable again after {s:.1f} s",
                s=time.time() - self._database_since,
            )
            self.database_up, self._database_since = True, time.time()
        return result

    def _not_reached(self, failure: Failure) -> Failure:
        if database_unavailable(failure):
            error = str(failure.value).strip().splitlines()[0] if str(failure.value) else "?"
            self._database_error = error
            if self.database_up:
                self.database_up, self._database_since = False, time.time()
                log.error(
                    "database unavailable ({error}): IDENTIFY fails closed (4000), history "
                    "and audit wait to be written, until it answers again",
                    error=error,
                )
        return failure

    def database_health(self) -> dict[str, Any]:
        return {
            "state": "up" if self.database_up else "down",
            "since": self._database_since,
            "last_error": self._database_error,
        }


def _with_connections(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Like a request: drop broken or expired connections before and after, so a
    # database restart costs one failed call, not a dead thread.
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()
