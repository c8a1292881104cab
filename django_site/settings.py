"""Settings of the standalone site: everything lives in BRIDGE_DATA_DIR.

SQLite by default; ``DATABASE_URL`` (postgres://...) selects PostgreSQL.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bridge.config import default_data_dir, secret_key

DATA_DIR = Path(os.environ.get("BRIDGE_DATA_DIR") or default_data_dir())
SECRET_KEY = secret_key(DATA_DIR)
DEBUG = os.environ.get("BRIDGE_DEBUG") == "1"
TLS = os.environ.get("BRIDGE_TLS") == "1"

ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", socket.gethostname(), socket.getfqdn()]
ALLOWED_HOSTS += [h for h in os.environ.get("BRIDGE_ALLOWED_HOSTS", "").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "bridge.devices",
    "django_site",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "bridge.throttle.LoginThrottleMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "django_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, object]:
    url = os.environ.get("DATABASE_URL")
    if url:
        from bridge.dburl import parse_database_url

        return parse_database_url(url)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "db.sqlite3"),
        "OPTIONS": {
            # WAL lets the bridge read while bridge-admin writes; IMMEDIATE
            # avoids "database is locked" on upgrade from read to write.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
        # One connection per pool thread for the life of the process: opening
        # SQLite and running the PRAGMAs on every call would cost more than
        # most queries.
        "CONN_MAX_AGE": None,
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("BRIDGE_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = TLS
CSRF_COOKIE_SECURE = TLS
SECURE_HSTS_SECONDS = 31536000 if TLS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = TLS
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("BRIDGE_ALLOWED_ORIGINS", "").split(",") if o]

BRIDGE_ANONYMOUS = os.environ.get("BRIDGE_ANONYMOUS") == "1"
BRIDGE_TOKEN_MAX_AGE = int(os.environ.get("BRIDGE_TOKEN_MAX_AGE", "60"))
# Failed logins (form, token API) and failed IDENTIFYs per client address and
# per username: past the limit within the window, HTTP 429 / close 4008.
BRIDGE_LOGIN_FAILURE_LIMIT = int(os.environ.get("BRIDGE_LOGIN_FAILURE_LIMIT", "10"))
BRIDGE_LOGIN_FAILURE_WINDOW = float(os.environ.get("BRIDGE_LOGIN_FAILURE_WINDOW", "300"))
BRIDGE_ALLOWED_ORIGINS = CSRF_TRUSTED_ORIGINS

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
