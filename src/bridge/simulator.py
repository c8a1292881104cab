"""A stand-in for Node-RED, so the bridge runs on its own (``--demo``).

It answers each command as a Node-RED flow would: a status echoing the
command's ``command_id`` with the device's new state, after a short delay.
Sensors report on their own every ``sensor_interval`` seconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from bridge.hub import DeviceConfig
from bridge.upstream import IUpstream, IUpstreamListener, UpstreamCommand


def next_state(kind: str, state: Any, payload: Any) -> Any:
    """The state a device of ``kind`` reaches when sent ``payload``."""
    if kind == "toggle":
        if isinstance(payload, dict) and isinstance(payload.get("on"), bool):
            return {"on": payload["on"]}
        if isinstance(payload, bool):
            return {"on": payload}
        if payload == "toggle":
            return {"on": not (isinstance(state, dict) and state.get("on"))}
        return state if state is not None else {"on": False}
    if kind == "dimmer":
        level = payload.get("level") if isinstance(payload, dict) else payload
        if isinstance(level, int | float) and not isinstance(level, bool):
            return {"level": max(0, min(100, round(level)))}
        return state if state is not None else {"level": 0}
    return payload


@implementer(IUpstream)
class Simulator(Service):
    name = "simulator"
    description = "built-in simulator"

    def __init__(
        self,
        clock: IReactorTime,
        devices: Callable[[], Iterable[DeviceConfig]],
        delay: float = 0.02,
        sensor_interval: float = 1.0,
    ) -> None:
        self.clock = clock
        self.devices = devices
        self.delay = delay
        self.listener: IUpstreamListener | None = None
        self.available = False
        self.state: dict[str, Any] = {}
        self._rng = random.Random()
        self._sensors = LoopingCall(self._report_sensors)
        self._sensors.clock = clock
        self.sensor_interval = sensor_interval

    def attach(self, listener: IUpstreamListener) -> None:
        self.listener = listener

    def startService(self) -> None:
        super().startService()
        self.available = True
        if self.listener is not None:
            self.listener.upstream_state(True)
        self._sensors.start(self.sensor_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        self.available = False
        if self._sensors.running:
            self._sensors.stop()

    def send_command(self, command: UpstreamCommand) -> bool:
        if not self.available:
            return False
        self.clock.callLater(self.delay, self._answer, command)
        return True

    def _kind(self, device_id: str) -> str:
        for config in self.devices():
            if config.id == device_id:
                return config.kind
        return ""

    def _answer(self, command: UpstreamCommand) -> None:
        new = next_state(
            self._kind(command.device_id), self.state.get(command.device_id), command.payload
        )
        self.state[command.device_id] = new
        if self.listener is not None:
            self.listener.upstream_status(command.device_id, new, command.command_id)

    def _report_sensors(self) -> None:
        t = self.clock.seconds()
        for config in list(self.devices()):
            if config.kind != "sensor" or self.listener is None:
                continue
            value = 21.0 + 2.0 * math.sin(t / 60.0) + self._rng.uniform(-0.2, 0.2)
            self.listener.upstream_status(config.id, {"temperature": round(value, 2)}, None)

    def health(self) -> dict[str, Any]:
        return {"state": "up" if self.available else "down", "kind": "simulator"}
