"""One grants load per identity, shared by all its sessions until a change drops it.

Loading an operator's grants costs milliseconds of ORM work holding the GIL,
and a user's 50 connections all get the same answer. :class:`GrantsCache`
loads once per identity (concurrent requests share one load) and keeps the
result while the change feed (``bridge.changes``) keeps up, so spec §5's
one-second rule still holds, on every replica alike, since each polls the
same ``Change`` table:

* the reconciler drops what a batch of changes touches (:meth:`changed`)
  before it looks at the live sessions, so every session that got grants
  from the cache before that moment is among those it brings up to date;
* a load that a change overtook is done again, so no session is READY with
  grants older than a change the reconciler has already applied;
* entries are served only while the feed's last good read began less than
  ``max_lag`` seconds ago: a stalled feed (database trouble) turns the cache
  off rather than let it go stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from bridge import permissions
from bridge.session import DeviceView, Identity, Role
from bridge.threads import PoolService

Key = tuple[Role, int | None, str | None, bool]
Grants = Mapping[str, DeviceView]


def key_of(identity: Identity) -> Key:
    """What ``permissions.grants_for`` depends on, and nothing else."""
    return (identity.role, identity.user_id, identity.device_id, identity.is_superuser)


class GrantsCache:
    """Grants per identity for the edges; invalidated by the change feed."""

    #: Loads redone at most this often when changes keep overtaking them.
    RETRIES = 3

    def __init__(
        self,
        db: PoolService,
        clock: IReactorTime,
        max_lag: float = 1.0,
        max_entries: int = 10_000,
    ) -> None:
        self.db = db
        self.clock = clock
        self.max_lag = max_lag
        self.max_entries = max_entries
        self._entries: dict[Key, Grants] = {}
        self._waiting: dict[Key, list[Deferred[Grants]]] = {}
        # Bumped by every invalidation: a load that began before it is stale.
        self._generation = 0
        # When the change feed's last good read began (None: never).
        self._fresh_from: float | None = None
        self.hits = 0
        self.loads = 0

    # -------------------------------------------------------------- lookups

    def get(self, identity: Identity) -> Deferred[Grants]:
        """The identity's grants: from the cache if it may be trusted, else loaded."""
        key = key_of(identity)
        grants = self._entries.get(key)
        if grants is not None and self._trusted():
            self.hits += 1
            return succeed(grants)
        d: Deferred[Grants] = Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(d)  # a load of the same grants is under way
            return d
        self._waiting[key] = [d]
        self._load(key, identity, self.RETRIES)
        return d

    def _trusted(self) -> bool:
        fresh = self._fresh_from
        return fresh is not None and self.clock.seconds() - fresh <= self.max_lag

    def _load(self, key: Key, identity: Identity, retries: int) -> None:
        generation = self._generation
        self.loads += 1
        d = self.db.orm(permissions.grants_for, identity)

        def loaded(grants: dict[str, DeviceView]) -> None:
            if generation != self._generation and retries > 0:
                self._load(key, identity, retries - 1)  # a change overtook it
                return
            shared: Grants = MappingProxyType(grants)
            if generation == self._generation:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[key] = shared
            for waiter in self._waiting.pop(key, []):
                waiter.callback(shared)

        def failed(failure: Any) -> None:
            for waiter in self._waiting.pop(key, []):
                waiter.errback(failure)

        d.addCallbacks(loaded, failed)

    # --------------------------------------------------------- invalidation

    def changed(self, users: Iterable[int], everyone: bool) -> None:
        """Changes were read: drop what they touch (``everyone``: all of it)."""
        self._generation += 1
        if everyone:
            self._entries.clear()
            return
        gone = set(users)
        if gone:
            for key in [k for k in self._entries if k[1] in gone]:
                del self._entries[key]

    def fresh(self, since: float) -> None:
        """Every change committed before ``since`` has been read and applied."""
        self._fresh_from = since
