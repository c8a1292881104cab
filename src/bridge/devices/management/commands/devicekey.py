from typing import Any

from django.core.management.base import CommandParser

from bridge.devices.management.commands._common import BridgeCommand, get_device


class Command(BridgeCommand):
    help = (
        "Give a device a new client key and print it (shown once, stored hashed); "
        "--revoke removes it. A device with a key is driven by its own client."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("device_id")
        parser.add_argument("--revoke", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        device = get_device(options["device_id"])
        if options["revoke"]:
            device.key_hash = ""
            device.save()  # the signal closes the live client (4011)
            self.stdout.write(f"revoked the key of {device.id}")
            return
        key = device.new_key()
        device.save()
        self.stdout.write(key)
