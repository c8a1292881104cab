"""``django-admin relay_upstream --nodered URL``: the relay's link to Node-RED.

One asyncio process holds the WebSocket to Node-RED (here the benchmark's
stand-in) and redials it every second. Each status it receives is handed to
the device's group with ``channel_layer.group_send`` (how the Channels docs
send to consumers from outside them); commands from consumers arrive on the
channel ``RELAY_UPSTREAM_CHANNEL`` and are written to the link; a status that
carries a pending ``command_id`` confirms that command to its consumer.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import websockets
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from django.core.management.base import BaseCommand

from channels_relay.consumers import group_name

settings: Any = django_settings


class Command(BaseCommand):
    help = "Relay statuses from Node-RED to the device groups, and commands back."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--nodered", required=True, help="ws:// URL of the upstream")

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(run(options["nodered"]))


def log(msg: str) -> None:
    print(f"relay_upstream: {msg}", flush=True)


async def run(url: str) -> None:
    layer: Any = get_channel_layer()
    # command_id -> (consumer's channel, client id, device)
    pending: dict[str, tuple[str, str, str]] = {}
    while True:
        try:
            async with websockets.connect(url, max_size=None, compression=None) as link:
                log("upstream link up")
                commands = asyncio.create_task(forward_commands(layer, link, pending))
                try:
                    async for raw in link:
                        await relay_status(layer, raw, pending)
                finally:
                    commands.cancel()
        except (OSError, websockets.WebSocketException) as exc:
            log(f"upstream link down ({exc!r})")
        await asyncio.sleep(1.0)


async def relay_status(
    layer: Any, raw: str | bytes, pending: dict[str, tuple[str, str, str]]
) -> None:
    try:
        msg = json.loads(raw)
    except ValueError:
        return
    if not isinstance(msg, dict) or not isinstance(msg.get("group_id"), str):
        return
    device = msg["group_id"]
    command_id = msg.get("command_id")
    by = None
    waiting = pending.pop(command_id, None) if isinstance(command_id, str) else None
    if waiting is not None:
        reply_channel, client_id, _ = waiting
        by = "bench"
        await layer.send(
            reply_channel,
            {
                "type": "command.result",
                "d": {
                    "id": client_id,
                    "command_id": command_id,
                    "device": device,
                    "result": "confirmed",
                    "detail": "",
                },
            },
        )
    await layer.group_send(
        group_name(device),
        {
            "type": "device.status",
            "d": {
                "device": device,
                "payload": msg.get("payload"),
                "ts": time.time_ns() // 1_000_000,
                "by": by,
                "command_id": command_id if by else None,
            },
        },
    )


async def forward_commands(layer: Any, link: Any, pending: dict[str, tuple[str, str, str]]) -> None:
    while True:
        message = await layer.receive(settings.RELAY_UPSTREAM_CHANNEL)
        command_id = str(message["command_id"])
        pending[command_id] = (message["reply_channel"], message["id"], message["device"])
        await link.send(
            json.dumps(
                {
                    "group_id": message["device"],
                    "payload": message.get("payload"),
                    "user": "bench",
                    "command_id": command_id,
                    "ts": time.time_ns() // 1_000_000,
                },
                separators=(",", ":"),
            )
        )
