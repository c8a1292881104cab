"""``bridge-admin``: Django's management commands against the bridge's settings.

bridge-admin [--data-dir DIR] [--settings MODULE] COMMAND [ARGS...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bridge-admin",
        description="Run a Django management command against the bridge's settings.",
        epilog="Bridge commands: adduser, adddevice, grant, revoke, token. "
        "'bridge-admin help' lists every command.",
    )
    parser.add_argument("--data-dir", type=Path, help="state directory (default: as twistd)")
    parser.add_argument("--settings", help="Django settings module of your own project")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        sys.exit(2)

    from bridge.config import configure

    try:
        configure(args.data_dir, args.settings)
    except ImportError as e:
        # A bad --settings is a bad argument: one line (spec section 9).
        module = os.environ.get("DJANGO_SETTINGS_MODULE")
        sys.exit(f"bridge-admin: cannot load the settings {module!r}: {e}")
    from django.core.management import execute_from_command_line

    execute_from_command_line(["bridge-admin", *args.command])


if __name__ == "__main__":
    main()
