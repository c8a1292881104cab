from typing import Any

from django.core.management.base import CommandError, CommandParser

from bridge.devices.management.commands._common import (
    BridgeCommand,
    add_principal_arguments,
    get_device,
    get_group,
    get_user,
)
from bridge.devices.models import Grant


class Command(BridgeCommand):
    help = "Withdraw a user's or group's grant on a device; live connections follow within 1 s."

    def add_arguments(self, parser: CommandParser) -> None:
        add_principal_arguments(parser)
        parser.add_argument("device_id")

    def handle(self, *args: Any, **options: Any) -> None:
        device = get_device(options["device_id"])
        if options["user"]:
            grants = Grant.objects.filter(device=device, user=get_user(options["user"]))
        else:
            grants = Grant.objects.filter(device=device, group=get_group(options["group"]))
        found = list(grants)
        if not found:
            raise CommandError("no such grant")
        for grant in found:
            grant.delete()  # one by one, so the signals tell live connections
        self.stdout.write(f"revoked {len(found)} grant(s)")
