"""The seam between the hub and whatever drives the devices.

The simulator, the Node-RED link and (later) MQTT each implement
:class:`IUpstream`; the hub implements :class:`IUpstreamListener`.  Neither side
knows more of the other than these few calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface


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
