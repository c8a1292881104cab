"""``POST /api/devices/<id>/video-token/``: a LiveKit token for a device's camera.

Two kinds of caller:

* a logged-in user (session cookie, CSRF-checked) who may read the device
  gets a subscribe-only token;
* the device's own client (``Authorization: Bearer <device key>``) gets a
  token that may publish.

Everyone else is refused.  A device that does not exist, is disabled, or is
not readable by the caller gets the same 403, so the answer never tells
whether an id exists.  Settings: ``BRIDGE_LIVEKIT_API_KEY``,
``BRIDGE_LIVEKIT_API_SECRET``, ``BRIDGE_LIVEKIT_URL`` (handed to the client
with the token) and ``BRIDGE_LIVEKIT_TOKEN_TTL`` (seconds, default 600).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from bridge import video
from bridge.permissions import grants_for
from bridge.session import Identity, Role
from bridge.views import csrf_passes

_REQUIRED = ("BRIDGE_LIVEKIT_API_KEY", "BRIDGE_LIVEKIT_API_SECRET", "BRIDGE_LIVEKIT_URL")
_FORBIDDEN = "no such device, or no permission to view it"


@dataclass(frozen=True, slots=True)
class LiveKitSettings:
    api_key: str
    api_secret: str
    url: str
    ttl: int


def livekit_settings() -> LiveKitSettings | str:
    """The LiveKit settings, or the text saying what is missing (names only, no values)."""
    values = {name: getattr(settings, name, None) for name in _REQUIRED}
    missing = [name for name, value in values.items() if not isinstance(value, str) or not value]
    if missing:
        return "video is not configured: set " + ", ".join(missing)
    ttl = getattr(settings, "BRIDGE_LIVEKIT_TOKEN_TTL", video.DEFAULT_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        return "video is misconfigured: BRIDGE_LIVEKIT_TOKEN_TTL must be a positive integer"
    return LiveKitSettings(
        values["BRIDGE_LIVEKIT_API_KEY"],  # type: ignore[arg-type]
        values["BRIDGE_LIVEKIT_API_SECRET"],  # type: ignore[arg-type]
        values["BRIDGE_LIVEKIT_URL"],  # type: ignore[arg-type]
        ttl,
    )


def device_for_key(key: str) -> str | None:
    """The id of the enabled device whose client holds ``key``, or None."""
    from bridge.identity import AuthenticationFailed, identity_from_device_key

    try:
        return identity_from_device_key(key).device_id
    except AuthenticationFailed:
        return None


def _bearer(request: HttpRequest) -> str | None:
    """The token of an ``Authorization: Bearer`` header; "" for a malformed one."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def _error(status: int, message: str) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="bridge"'
    return response


def _token_response(
    config: LiveKitSettings, device_id: str, identity: str, name: str, publisher: bool
) -> JsonResponse:
    grant = video.VideoGrant(
        room=video.room_for(device_id), can_publish=publisher, can_publish_data=publisher
    )
    token = video.access_token(
        api_key=config.api_key,
        api_secret=config.api_secret,
        identity=identity,
        name=name,
        grant=grant,
        ttl=config.ttl,
    )
    return JsonResponse(
        {
            "token": token,
            "url": config.url,
            "room": grant.room,
            "identity": identity,
            "can_publish": publisher,
            "expires_in": config.ttl,
        }
    )


@csrf_exempt  # checked below, only when the browser session is the credential
@require_POST
@never_cache
def video_token(request: HttpRequest, device_id: str) -> HttpResponse:
    """A LiveKit token for the camera of ``device_id`` (see the module text)."""
    bearer = _bearer(request)
    user: Any = request.user
    if bearer is None and not user.is_authenticated:
        return _error(401, "log in, or send the device's key as a bearer token")
    if bearer is not None:
        # A bearer credential is never sent by a browser on its own: no CSRF check,
        # and no falling back to the session when the key is wrong.
        key_device = device_for_key(bearer) if bearer else None
        if key_device is None:
            return _error(401, "invalid device key")
        config = livekit_settings()
        if isinstance(config, str):
            return _error(503, config)
        own = grants_for(Identity(Role.DEVICE, device_id=key_device))  # empty if disabled
        if key_device != device_id or device_id not in own:
            return _error(403, _FORBIDDEN)
        return _token_response(
            config, device_id, video.device_identity(device_id), own[device_id].name, True
        )

    if not csrf_passes(request):
        return _error(403, "CSRF check failed")
    if not user.is_active:
        return _error(403, _FORBIDDEN)
    config = livekit_settings()
    if isinstance(config, str):
        return _error(503, config)
    identity = Identity(
        Role.OPERATOR,
        user_id=user.pk,
        username=user.get_username(),
        is_superuser=user.is_superuser,
    )
    if device_id not in grants_for(identity):
        return _error(403, _FORBIDDEN)
    return _token_response(
        config, device_id, video.user_identity(user.pk), user.get_username(), False
    )
