"""Lookups shared by the bridge's management commands: one-line errors."""

from __future__ import annotations

from typing import Any, NoReturn

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError, CommandParser

from bridge.devices.models import Device


class OneLineErrorParser(CommandParser):
    """A bad argument is one line on stderr and exit status 2 (spec §9).

    argparse prints its whole usage block first, which a script that shows
    the last line of stderr turns into noise.
    """

    def error(self, message: str) -> NoReturn:
        if self.called_from_command_line:
            self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")
        super().error(message)
        raise AssertionError("unreachable")  # CommandParser.error always raises


class BridgeCommand(BaseCommand):
    """Base of the bridge's own commands: one-line errors for bad arguments too."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # Django builds the parser itself; only its error() differs.
        parser.__class__ = OneLineErrorParser
        return parser


def get_user(username: str) -> Any:
    try:
        return get_user_model()._default_manager.get_by_natural_key(username)
    except get_user_model().DoesNotExist:
        raise CommandError(f"unknown user {username!r}") from None


def get_group(name: str) -> Group:
    try:
        return Group.objects.get(name=name)
    except Group.DoesNotExist:
        raise CommandError(f"unknown group {name!r}") from None


def get_device(device_id: str) -> Device:
    try:
        return Device.objects.get(pk=device_id)
    except Device.DoesNotExist:
        raise CommandError(f"unknown device {device_id!r}") from None


def add_principal_arguments(parser: Any) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="USERNAME")
    who.add_argument("--group", metavar="GROUP")
