from typing import Any

from django.core.management.base import CommandParser

from bridge.devices.management.commands._common import (
    BridgeCommand,
    add_principal_arguments,
    get_device,
    get_group,
    get_user,
)
from bridge.devices.models import Grant


class Command(BridgeCommand):
    help = "Grant a user or group read or change permission on a device."

    def add_arguments(self, parser: CommandParser) -> None:
        add_principal_arguments(parser)
        parser.add_argument("device_id")
        parser.add_argument("permission", choices=[Grant.READ, Grant.CHANGE])

    def handle(self, *args: Any, **options: Any) -> None:
        device = get_device(options["device_id"])
        if options["user"]:
            who = {"user": get_user(options["user"])}
        else:
            who = {"group": get_group(options["group"])}
        grant, _ = Grant.objects.get_or_create(device=device, **who)
        grant.permission = options["permission"]
        grant.save()
        self.stdout.write(f"granted {grant}")
