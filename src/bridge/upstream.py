"""The seam between the hub and whatever drives the devices.

The simulator, the Node-RED link and (later) MQTT each implement
:class:`IUpstream`; the hub implements :class:`IUpstreamListener`.  Neither side
knows more of the other than these few calls.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from twisted.logger import Logger, LogLevel
from zope.interface import Attribute, Interface

_log = Logger()


@dataclass(frozen=True, slots=True)
class UpstreamCommand:
    """One command on its way to the device, as §7 of the spec frames it."""

    device_id: str
    payload: Any
    user: str | None
    command_id: str
    ts: int

    def to_json(self) -> dict[str, Any]:
        return {
            "group_id": self.device_id,
            "payload": self.payload,
            "user": self.user,
            "command_id": self.command_id,
            "ts": self.ts,
        }


class IUpstreamListener(Interface):
    """What an upstream reports to (the hub)."""

    def upstream_status(device_id: str, payload: Any, command_id: str | None) -> None:
        """A device reported its state; unknown devices are dropped and counted."""

    def upstream_state(online: bool) -> None:
        """The upstream as a whole came up or went down."""


class IUpstream(Interface):
    """What drives the devices: the simulator, Node-RED, MQTT."""

    available = Attribute("True while commands can be delivered.")
    description = Attribute("Short text for logs and /healthz, without secrets.")

    def attach(listener: IUpstreamListener) -> None:
        """Called once, before the upstream starts, with the hub."""

    def send_command(command: UpstreamCommand) -> bool:
        """Hand a command on; False if it cannot be delivered now."""

    def health() -> dict[str, Any]:
        """State for /healthz: at least ``{"state": "up" | "down"}``."""


class MalformedMessage(ValueError):
    """An inbound message that is not a status; the text never quotes the message."""


def _reject_constant(name: str) -> Any:
    raise MalformedMessage(f"non-standard JSON constant {name}")


# One decoder for every message: json.loads with an argument builds a new one
# (and its scanner) per call, which costs more than decoding a small status.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def decode_object(data: bytes | bytearray | str) -> dict[str, Any]:
    """Strict UTF-8, strict JSON (no NaN or Infinity), and an object: or MalformedMessage."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage("not UTF-8") from None
    try:
        obj = _DECODER.decode(data)
    except MalformedMessage:
        raise
    except (ValueError, RecursionError):
        raise MalformedMessage("not JSON") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"a JSON {type(obj).__name__}, not an object")
    return obj


def command_id_of(obj: dict[str, Any]) -> str | None:
    """``command_id`` may be missing or null; anything else but a string is refused
    rather than guessed at, because it decides which command a status confirms."""
    command_id = obj.get("command_id")
    if command_id is not None and not isinstance(command_id, str):
        raise MalformedMessage("command_id is not a string")
    return command_id


class _Listener(Protocol):
    """IUpstreamListener as mypy sees it (zope interfaces lack ``self``)."""

    def upstream_status(self, device_id: str, payload: Any, command_id: str | None) -> None: ...

    def upstream_state(self, online: bool) -> None: ...


MALFORMED_LOG_INTERVAL: Final = 10.0


class LinkState:
    """What every network upstream keeps: its listener, up/down, errors, counters.

    The listener hears of each real change of state exactly once; bad input
    is counted every time but logged at most once per interval, so a flood
    of garbage cannot flood the log.
    """

    source = "the upstream"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.counters: Counter[str] = Counter()
        self._listener: _Listener | None = None
        self._up = False
        self._since = time.time()
        self._last_error: str | None = None
        self._malformed_logged_at: float | None = None
        self._malformed_unlogged = 0

    def attach(self, listener: IUpstreamListener) -> None:
        self._listener = cast(_Listener, listener)

    def _transition(self, up: bool) -> None:
        """Tell the listener once per real change of the link state."""
        if self._up == up:
            return
        self._up = up
        self._since = time.time()
        if self._listener is not None:
            self._listener.upstream_state(up)

    def _health(self, url: str, **extra: Any) -> dict[str, Any]:
        return {
            "state": "up" if self._up else "down",
            "url": url,
            **extra,
            "since": self._since,
            "last_error": self._last_error,
            "counters": dict(self.counters),
        }

    def _malformed(self, why: str) -> None:
        """Count every bad message; log at most one line per interval, even in a flood."""
        self.counters["malformed"] += 1
        self._malformed_unlogged += 1
        now = self._reactor.seconds()
        last = self._malformed_logged_at
        if last is not None and now - last < MALFORMED_LOG_INTERVAL:
            return
        _log.emit(
            LogLevel.warn,
            "Dropped {count} malformed message(s) from {source} (latest: {why}); "
            "more are counted and logged at most every {interval:.0f} s",
            count=self._malformed_unlogged,
            source=self.source,
            why=why,
            interval=MALFORMED_LOG_INTERVAL,
        )
        self._malformed_unlogged = 0
        self._malformed_logged_at = now
