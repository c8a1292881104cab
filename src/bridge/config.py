"""Where state lives and which Django settings are in force.

The twistd plugin and ``bridge-admin`` both go through :func:`configure`, so
they always agree on the data directory, the secret key and the database.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

STANDALONE_SETTINGS = "django_site.settings"


def default_data_dir() -> Path:
    if os.environ.get("BRIDGE_DATA_DIR"):
        return Path(os.environ["BRIDGE_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bridge"


def prepare_data_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Create a file only its owner can read (secrets, keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def secret_key(data_dir: Path) -> str:
    """The site's SECRET_KEY, generated once into the data directory (0600)."""
    path = data_dir / "secret_key"
    if not path.exists():
        prepare_data_dir(data_dir)
        try:
            write_private(path, secrets.token_urlsafe(50).encode())
        except FileExistsError:  # another process won the race
            pass
    return path.read_text().strip()


def load_secret(path: str | None, env_var: str = "BRIDGE_NODERED_SECRET") -> str | None:
    """A secret: the content of ``path`` (stripped), else ``$env_var``, else None.

    Never taken from the command line, where every local user could read it.
    An empty file or variable counts as no secret.
    """
    if path is not None:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    else:
        secret = os.environ.get(env_var, "").strip()
    return secret or None


def configure(
    data_dir: Path | None = None, settings_module: str | None = None, tls: bool = False
) -> Path:
    """Point Django at the settings and data directory, then set it up."""
    import django

    data = prepare_data_dir(data_dir or default_data_dir())
    os.environ["BRIDGE_DATA_DIR"] = str(data)
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
        # Like manage.py, a project is importable from its own directory; last,
        # so that nothing there shadows an installed package.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
    else:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", STANDALONE_SETTINGS)
    if tls:
        os.environ["BRIDGE_TLS"] = "1"
    django.setup()
    if tls:
        from django.conf import settings

        # A user's own settings may not know the site is behind TLS.
        settings.SESSION_COOKIE_SECURE = True
        settings.CSRF_COOKIE_SECURE = True
        if not getattr(settings, "SECURE_HSTS_SECONDS", 0):
            settings.SECURE_HSTS_SECONDS = 31536000
    return data


def is_standalone() -> bool:
    return os.environ.get("DJANGO_SETTINGS_MODULE") == STANDALONE_SETTINGS
