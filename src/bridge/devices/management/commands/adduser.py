import sys
from typing import Any

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError, CommandParser
from django.db import transaction

from bridge.devices.management.commands._common import BridgeCommand


class Command(BridgeCommand):
    help = "Create a user, optionally in groups (created when missing)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the password from the first line of standard input.",
        )
        parser.add_argument("--group", action="append", default=[], metavar="GROUP")
        parser.add_argument("--staff", action="store_true")
        parser.add_argument("--superuser", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        username = options["username"]
        if User._default_manager.filter(username=username).exists():
            raise CommandError(f"user {username!r} already exists")
        password = None
        if options["password_stdin"]:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("no password on standard input")
        with transaction.atomic():
            user = User(username=username, is_staff=options["staff"] or options["superuser"])
            user.is_superuser = options["superuser"]
            if password is not None:
                try:
                    password_validation.validate_password(password, user)
                except ValidationError as e:
                    raise CommandError("password rejected: " + " ".join(e.messages)) from None
                user.set_password(password)
            else:
                user.set_unusable_password()
            user.save()
            for name in options["group"]:
                group, _ = Group.objects.get_or_create(name=name)
                user.groups.add(group)
        self.stdout.write(f"created user {username}")
