import json
from typing import Any

from django.core.management.base import CommandError, CommandParser

from bridge.devices.management.commands._common import BridgeCommand
from bridge.notify import BadTarget, publish


class Command(BridgeCommand):
    help = (
        "Send EVENT NOTIFY to live sessions: "
        "--to all|authenticated|user:U|group:G|session:K|perm:APP.CODENAME"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True, metavar="TARGET")
        parser.add_argument("--event", required=True, metavar="NAME")
        parser.add_argument("--data", default="null", metavar="JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            data = json.loads(options["data"])
        except ValueError as e:
            raise CommandError(f"--data is not JSON: {e}") from None
        try:
            publish(options["to"], options["event"], data)
        except (BadTarget, ValueError) as e:
            raise CommandError(str(e)) from None
        self.stdout.write(f"published {options['event']} to {options['to']}")
