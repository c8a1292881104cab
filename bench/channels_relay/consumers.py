"""One AsyncJsonWebsocketConsumer per viewer, as the Channels tutorial builds a chat room.

Protocol v1 subset (the same as ``bench/ceiling_autobahn.py``): HELLO; IDENTIFY
or RESUME with any token answered by EVENT READY; SUBSCRIBE answered by one
EVENT SUBSCRIBED per device (empty history) after ``group_add``; UNSUBSCRIBE;
HEARTBEAT answered by HEARTBEAT_ACK; COMMAND sent on to the upstream worker
over the channel layer, with COMMAND_RESULT ``sent`` at once and ``confirmed``
when the worker sees the device's answer. Every STATUS arrives from the
device's group and is encoded for this connection with its own ``s``.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings as django_settings

# The relay's own settings (RELAY_*), untyped for the checker like any project setting.
settings: Any = django_settings


def group_name(device: str) -> str:
    """Channels group of a device (names: ASCII letters, digits, ``-_.``, < 100 chars)."""
    return f"device.{device}"


def _device_list(d: Any) -> list[str]:
    if isinstance(d, dict) and isinstance(d.get("devices"), list):
        return [str(x) for x in d["devices"]]
    return []


class ViewerConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.seq = 0
        self.ready = False
        self.devices: set[str] = set()
        self.session_id = secrets.token_urlsafe(16)
        await self.accept()
        await self.send_json(
            {
                "op": 0,
                "d": {
                    "heartbeat_interval": settings.RELAY_HEARTBEAT_MS,
                    "session_id": self.session_id,
                    "protocol": 1,
                },
            }
        )

    async def event(self, name: str, d: Any) -> None:
        self.seq += 1
        await self.send_json({"op": 6, "d": d, "s": self.seq, "t": name})

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        try:
            content = json.loads(text_data or "")
        except ValueError:
            await self.close(code=4002)
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or not isinstance(content.get("op"), int):
            await self.close(code=4002)
            return
        op, d = content["op"], content.get("d")
        if op == 1:
            await self.send_json({"op": 2, "d": None})
        elif op in (3, 9):
            if self.ready:
                await self.close(code=4005)
                return
            self.ready = True
            await self.event(
                "READY",
                {
                    "user": {"id": 1, "username": "bench"},
                    "role": "operator",
                    "devices": [
                        {
                            "id": dev,
                            "name": dev,
                            "kind": "sensor",
                            "permission": "change",
                            "online": True,
                            "history_size": 0,
                        }
                        for dev in settings.RELAY_DEVICES
                    ],
                    "session_id": self.session_id,
                },
            )
        elif not self.ready:
            await self.close(code=4006)
        elif op == 7:
            for dev in _device_list(d):
                if dev not in self.devices:
                    self.devices.add(dev)
                    await self.channel_layer.group_add(group_name(dev), self.channel_name)
                await self.event("SUBSCRIBED", {"device": dev, "permission": "read", "history": []})
        elif op == 8:
            for dev in _device_list(d):
                if dev in self.devices:
                    self.devices.discard(dev)
                    await self.channel_layer.group_discard(group_name(dev), self.channel_name)
                await self.event("UNSUBSCRIBED", {"device": dev})
        elif op == 4:
            await self.command(d)
        elif op == 2:
            pass
        else:
            await self.close(code=4001)

    async def command(self, d: Any) -> None:
        if not isinstance(d, dict):
            await self.close(code=4002)
            return
        device, client_id = str(d.get("device")), str(d.get("id"))
        command_id = str(uuid.uuid4())
        await self.event(
            "COMMAND_RESULT",
            {
                "id": client_id,
                "command_id": command_id,
                "device": device,
                "result": "sent",
                "detail": "",
            },
        )
        await self.channel_layer.send(
            settings.RELAY_UPSTREAM_CHANNEL,
            {
                "type": "relay.command",
                "reply_channel": self.channel_name,
                "id": client_id,
                "command_id": command_id,
                "device": device,
                "payload": d.get("payload"),
            },
        )

    async def disconnect(self, code: int) -> None:
        for dev in getattr(self, "devices", ()):
            await self.channel_layer.group_discard(group_name(dev), self.channel_name)

    # ----------------------------------------------------- channel layer handlers

    async def device_status(self, event: dict[str, Any]) -> None:
        """``group_send(..., {"type": "device.status", "d": ...})`` from the worker."""
        self.seq += 1
        await self.send_json({"op": 5, "d": event["d"], "s": self.seq})

    async def command_result(self, event: dict[str, Any]) -> None:
        await self.event("COMMAND_RESULT", event["d"])
