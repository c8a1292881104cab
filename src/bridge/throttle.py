"""Throttles: failed logins per address and username; new connections per address.

After ``limit`` failures within ``window`` seconds a key is refused until the
window has passed since its first counted failure.  One process-wide
instance serves the token API and the login form (WSGI threads) and IDENTIFY
(the reactor thread), hence the lock.  Counting is per process; behind a
load balancer each replica counts its own share.

:class:`RateLimit` is a token bucket per key, for WebSocket and SSE handshakes
per client address: a burst as large as a whole shift's screens reconnecting
after a restart passes, a flood from one address does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class FailureThrottle:
    def __init__(
        self, limit: int = 10, window: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[float, int]] = {}

    def retry_after(self, *keys: str | None) -> float:
        """Seconds until any of ``keys`` may try again; 0 when none is blocked."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key in filter(None, keys):
                first, count = self._failures.get(key, (now, 0))
                if now - first >= self.window:
                    self._failures.pop(key, None)
                elif count >= self.limit:
                    wait = max(wait, self.window - (now - first))
        return wait

    def failed(self, *keys: str | None) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) > 100_000:  # bounded, even under a spray of addresses
                self._failures.clear()
            for key in filter(None, keys):
                first, count = self._failures.get(key, (now, 0))
                if now - first >= self.window:
                    first, count = now, 0
                self._failures[key] = (first, count + 1)

    def succeeded(self, *keys: str | None) -> None:
        with self._lock:
            for key in filter(None, keys):
                self._failures.pop(key, None)


class RateLimit:
    """A token bucket per key (reactor thread only): ``rate`` per second, ``burst`` at once."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str | None) -> float:
        """Spend one token: 0 when allowed, else the seconds until one is due."""
        if key is None or self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) > 100_000:
            # Bounded under a spray of addresses: full buckets carry no state.
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst - 1}
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0


_logins: FailureThrottle | None = None


def logins() -> FailureThrottle:
    """The process's throttle, sized from settings on first use."""
    global _logins
    if _logins is None:
        from django.conf import settings

        _logins = FailureThrottle(
            limit=int(getattr(settings, "BRIDGE_LOGIN_FAILURE_LIMIT", 10)),
            window=float(getattr(settings, "BRIDGE_LOGIN_FAILURE_WINDOW", 300)),
        )
    return _logins


def address_key(address: str | None) -> str | None:
    return f"addr:{address}" if address else None


def user_key(username: Any) -> str | None:
    return f"user:{str(username).lower()}" if username else None


class LoginThrottleMiddleware:
    """Refuses login-form POSTs (HTTP 429) from a blocked address or for a blocked user."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        from django.conf import settings
        from django.http import HttpResponse
        from django.shortcuts import resolve_url

        if request.method == "POST" and request.path == resolve_url(settings.LOGIN_URL):
            wait = logins().retry_after(
                address_key(request.META.get("REMOTE_ADDR")),
                user_key(request.POST.get("username")),
            )
            if wait:
                response = HttpResponse(
                    "Too many failed logins; try again later.\n",
                    status=429,
                    content_type="text/plain",
                )
                response["Retry-After"] = str(int(wait) + 1)
                return response
        return self.get_response(request)
