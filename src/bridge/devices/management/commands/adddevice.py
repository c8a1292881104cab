import math
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError, CommandParser

from bridge.devices.management.commands._common import BridgeCommand
from bridge.devices.models import MAX_HISTORY, Device


class Command(BridgeCommand):
    help = "Create a device and print its id (random unless --id imports one)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--kind", required=True, help="toggle, dimmer, sensor, ...")
        parser.add_argument(
            "--id", dest="device_id", help="Import a chosen id (a flow's group_id)."
        )
        parser.add_argument("--history", type=int, default=50, metavar="N")
        parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
        parser.add_argument("--public", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        if not 0 <= options["history"] <= MAX_HISTORY:
            raise CommandError(f"--history must be between 0 and {MAX_HISTORY}")
        if not math.isfinite(options["timeout"]):
            raise CommandError("--timeout must be a number of seconds")
        if not options["kind"].strip():
            raise CommandError("--kind must not be empty")
        device = Device(
            name=options["name"],
            kind=options["kind"],
            history_size=options["history"],
            command_timeout=options["timeout"],
            public=options["public"],
        )
        if options["device_id"] is not None:
            device.id = options["device_id"]
            if Device.objects.filter(pk=device.id).exists():
                raise CommandError(f"device {device.id!r} already exists")
        try:
            device.full_clean(validate_unique=False)
        except ValidationError as e:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in e.message_dict.items())
            ) from None
        device.save(force_insert=True)
        self.stdout.write(device.id)
