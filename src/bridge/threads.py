"""Dedicated thread pools: Django views, ORM calls and password hashing.

None of them is the reactor's default pool, which name resolution shares, so
a burst of logins cannot stall DNS and a slow query cannot stall a login.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import close_old_connections
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")


class PoolService(Service):
    """A named ThreadPool that starts and stops with the service tree."""

    def __init__(self, reactor: IReactorThreads, name: str, minthreads: int, maxthreads: int):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads, maxthreads, name=f"bridge-{name}")
        self.setName(f"pool-{name}")

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
        return self.run(_with_connections, fn, *args, **kwargs)  # type: ignore[arg-type]


def _with_connections(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Like a request: drop broken or expired connections before and after, so a
    # database restart costs one failed call, not a dead thread.
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()
