"""HTTP API views of the bridge, served by Django on the WSGI thread pool."""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import authenticate
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from bridge.identity import make_token, token_lifetime
from bridge.throttle import address_key, logins, user_key


class _Unusable(ValueError):
    """A username or password no database or hasher can take."""


def _text(value: str) -> bool:
    """UTF-8 encodable (no lone surrogate from a JSON escape) and without NUL,
    which PostgreSQL refuses in any string: either would be a 500, not a 401."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def _credentials(request: HttpRequest) -> tuple[str, str] | None:
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        username, password = body.get("username"), body.get("password")
    else:
        username, password = request.POST.get("username"), request.POST.get("password")
    if isinstance(username, str) and isinstance(password, str):
        if not (_text(username) and _text(password)):
            raise _Unusable("username and password must be text without NUL characters")
        return username, password
    return None


def csrf_passes(request: HttpRequest) -> bool:
    """Django's CSRF check, run by hand for session-authenticated callers.

    API views are ``csrf_exempt`` because callers with credentials or a bearer
    key need no CSRF token, and the middleware skips any callback marked so:
    it must be handed a stand-in, not the view, or the check silently passes.
    """
    return CsrfViewMiddleware(_not_exempt).process_view(request, _not_exempt, (), {}) is None


def _not_exempt(request: HttpRequest) -> HttpResponse:
    """A stand-in view without ``csrf_exempt``, for :func:`csrf_passes`."""
    return HttpResponse()


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@csrf_exempt  # checked below, only when the browser session is the credential
@require_POST
@never_cache
def token(request: HttpRequest) -> HttpResponse:
    """A short-lived signed token for IDENTIFY (spec §1)."""
    try:
        credentials = _credentials(request)
    except _Unusable as e:
        return _error(400, str(e))
    session_key = None
    if credentials is not None:
        keys = (address_key(request.META.get("REMOTE_ADDR")), user_key(credentials[0]))
        wait = logins().retry_after(*keys)
        if wait:
            response = _error(429, "too many failed logins; try again later")
            response["Retry-After"] = str(int(wait) + 1)
            return response
        user: Any = authenticate(request, username=credentials[0], password=credentials[1])
        if user is None:
            # Counted by the user_login_failed signal (bridge.devices.signals).
            return _error(401, "invalid username or password")
        logins().succeeded(keys[1])
    elif request.user.is_authenticated:
        if not csrf_passes(request):
            return _error(403, "CSRF check failed")
        user = request.user
        session_key = request.session.session_key
    else:
        return _error(401, "send username and password, or log in first")
    if not user.is_active:
        return _error(401, "invalid username or password")
    return JsonResponse({"token": make_token(user, session_key), "expires_in": token_lifetime()})
