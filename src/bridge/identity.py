"""Who is on the other end: Django session cookies and short-lived tokens.

These functions use the ORM and password hashers, so they run on the bridge's
thread pools (see :mod:`bridge.threads`), never on the reactor thread.
"""

from __future__ import annotations

import secrets
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing

from bridge.session import Identity, Role

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser

TOKEN_SALT = "bridge.token.v1"


def token_lifetime() -> int:
    return int(getattr(settings, "BRIDGE_TOKEN_MAX_AGE", 60))


class AuthenticationFailed(Exception):
    """The credential is not valid; the message is safe to show the client."""


def make_token(user: AbstractBaseUser, session_key: str | None = None) -> str:
    """A signed, expiring token for IDENTIFY and RESUME.

    It names the user and carries a digest of the session auth hash, so a
    password change voids every token issued before it; a token minted from a
    browser session is tied to that session, so logging out voids it too.
    """
    payload: dict[str, Any] = {
        "u": user.pk,
        "h": user.get_session_auth_hash()[:16],
        "n": secrets.token_urlsafe(6),
    }
    if session_key:
        payload["s"] = session_key
    return signing.dumps(payload, salt=TOKEN_SALT, compress=False)


def _identity(user: Any, session_key: str | None) -> Identity:
    return Identity(
        role=Role.OPERATOR,
        user_id=user.pk,
        username=user.get_username(),
        is_superuser=bool(user.is_superuser),
        auth_hash=user.get_session_auth_hash(),
        session_key=session_key,
    )


def identity_from_token(token: str) -> Identity:
    try:
        payload = signing.loads(token, salt=TOKEN_SALT, max_age=token_lifetime())
    except signing.SignatureExpired:
        raise AuthenticationFailed("token expired") from None
    except signing.BadSignature:
        raise AuthenticationFailed("invalid token") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("u"), int):
        raise AuthenticationFailed("invalid token")
    user = get_user_model()._default_manager.filter(pk=payload["u"]).first()
    if user is None or not user.is_active:
        raise AuthenticationFailed("user unknown or inactive")
    if not secrets.compare_digest(str(payload.get("h", "")), user.get_session_auth_hash()[:16]):
        raise AuthenticationFailed("token revoked by a password change")
    session_key = payload.get("s")
    if session_key is not None and not _session_alive(str(session_key)):
        raise AuthenticationFailed("token's session has ended")
    return _identity(user, session_key)


def identity_from_device_key(key: str) -> Identity:
    """A device client's key: the device it drives, if enabled."""
    from bridge.devices.models import Device, hash_device_key

    digest = hash_device_key(key)
    device = Device.objects.filter(key_hash=digest, enabled=True).first()
    if device is None or not secrets.compare_digest(device.key_hash, digest):
        raise AuthenticationFailed("unknown device key")
    return Identity(Role.DEVICE, device_id=device.id, auth_hash=digest)


def _session_alive(session_key: str) -> bool:
    from importlib import import_module

    store = import_module(settings.SESSION_ENGINE).SessionStore
    return bool(store().exists(session_key))


class _SessionRequest:
    """Just enough of an HttpRequest for django.contrib.auth.get_user()."""

    def __init__(self, session: Any) -> None:
        self.session = session


def session_key_from_cookie_header(header: str | None) -> str | None:
    if not header:
        return None
    try:
        cookie = SimpleCookie(header)
    except CookieError:
        return None
    morsel = cookie.get(settings.SESSION_COOKIE_NAME)
    return morsel.value if morsel is not None and morsel.value else None


def user_from_session(session_key: str) -> Any:
    """The logged-in user of a session key, checked as Django checks it."""
    from importlib import import_module

    from django.contrib.auth import get_user
    from django.contrib.auth.models import AnonymousUser

    store = import_module(settings.SESSION_ENGINE).SessionStore
    user = get_user(_SessionRequest(store(session_key)))  # type: ignore[arg-type]
    return None if isinstance(user, AnonymousUser) else user


def identity_from_session(session_key: str) -> Identity | None:
    user = user_from_session(session_key)
    if user is None or not user.is_active:
        return None
    return _identity(user, session_key)


def still_valid(identity: Identity) -> str | None:
    """Why a live identity is no longer valid, or None if it still is."""
    if identity.role is Role.DEVICE:
        from bridge.devices.models import Device

        device = Device.objects.filter(pk=identity.device_id).first()
        if device is None or not device.enabled:
            return "device removed or disabled"
        if device.key_hash != identity.auth_hash:
            return "device key revoked"
        return None
    if identity.role is not Role.OPERATOR or identity.user_id is None:
        return None
    user = get_user_model()._default_manager.filter(pk=identity.user_id).first()
    if user is None:
        return "user deleted"
    if not user.is_active:
        return "user deactivated"
    if identity.auth_hash is not None and user.get_session_auth_hash() != identity.auth_hash:
        return "password changed"
    if identity.session_key is not None and not _session_alive(identity.session_key):
        return "logged out"
    return None


def authenticate_password(username: str, password: str, request: Any = None) -> Any:
    """Django's authenticate(): runs the password hasher (slow on purpose)."""
    from django.contrib.auth import authenticate

    return authenticate(request, username=username, password=password)
