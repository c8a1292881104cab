from typing import Any

from django.core.management.base import CommandError, CommandParser

from bridge.devices.management.commands._common import BridgeCommand, get_user
from bridge.identity import make_token


class Command(BridgeCommand):
    help = "Print a fresh IDENTIFY token for a user (valid BRIDGE_TOKEN_MAX_AGE seconds)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user(options["username"])
        if not user.is_active:
            raise CommandError(f"user {options['username']!r} is inactive")
        self.stdout.write(make_token(user))
