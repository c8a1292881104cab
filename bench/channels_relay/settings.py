"""Django settings of the Channels relay: no database, no templates, one channel layer."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("RELAY_SECRET_KEY", "bench-only-not-secret")
DEBUG = False
# The load generator, like any non-browser client, sends no Origin header; the
# origin validator in asgi.py (as the Channels docs recommend) lets that through
# only when every host is allowed.
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["daphne", "channels", "channels_relay"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
ASGI_APPLICATION = "channels_relay.asgi.application"
LOGGING_CONFIG = None

REDIS_URL = os.environ.get("RELAY_REDIS_URL", "redis://127.0.0.1:6379/13")
REDIS_PREFIX = os.environ.get("RELAY_REDIS_PREFIX", "bridge-bench-relay")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8's asyncio pool refuses (ConnectionError "Too many connections")
            # past 100 connections instead of waiting: a connect storm of 100 viewers
            # each adding itself to 5 groups gets there. A larger pool, as a deployment
            # hitting that error would configure it.
            "hosts": [{"address": REDIS_URL, "max_connections": 1000}],
            "prefix": REDIS_PREFIX,
        },
    }
}

# What READY lists (like the stand-in's default ids dev-0000 ...).
RELAY_DEVICES = [f"dev-{i:04d}" for i in range(int(os.environ.get("RELAY_DEVICES", "100")))]
RELAY_HEARTBEAT_MS = int(os.environ.get("RELAY_HEARTBEAT_MS", "30000"))
# The channel the upstream worker reads commands from.
RELAY_UPSTREAM_CHANNEL = "relay.upstream"

if os.environ.get("RELAY_LOG_GC"):
    # Diagnostic only (off by default): log garbage-collector pauses over 50 ms.
    import gc
    import sys
    import time

    _gc_started = [0.0]

    def _gc_pause(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _gc_started[0] = time.perf_counter()
        elif (ms := (time.perf_counter() - _gc_started[0]) * 1000) > 50:
            print(f"relay gc: generation {info['generation']} took {ms:.0f} ms", file=sys.stderr)

    gc.callbacks.append(_gc_pause)
