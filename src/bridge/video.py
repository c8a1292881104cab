"""LiveKit access tokens for device cameras; pure, no Django.

A camera is a LiveKit room per device (:func:`room_for`).  The device client
publishes into it, permitted viewers subscribe; who may do which is decided
by the view (:mod:`bridge.video_views`), this module only writes the token.

A LiveKit access token is a JWT signed HS256 with the API secret, carrying
``iss`` (the API key), ``sub`` (the participant identity), ``nbf``, ``exp``,
``name`` and the ``video`` grant (LiveKit's "Tokens & grants" reference).  It
is written with the standard library: an HS256 JWT is a few lines, and a JWT
library would be a dependency for exactly those lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["VideoGrant", "access_token", "room_for", "user_identity", "device_identity"]

#: LiveKit rejects tokens only at connect time; a short life costs nothing.
DEFAULT_TTL: Final = 600


def room_for(device_id: str) -> str:
    """The LiveKit room of a device's camera."""
    return f"device-{device_id}"


def user_identity(user_id: int) -> str:
    """A viewer's participant identity: unique per token.

    LiveKit lets one identity into a room once and drops the older
    participant, so two tabs of one user need two identities.  No username
    here: LiveKit logs identities, and the display name goes in ``name``.
    """
    return f"user-{user_id}-{secrets.token_hex(4)}"


def device_identity(device_id: str) -> str:
    """A device's identity: stable, so a reconnecting camera replaces its old self."""
    return f"device-{device_id}"


@dataclass(frozen=True, slots=True)
class VideoGrant:
    """The ``video`` claim: join one room, always subscribe, maybe publish."""

    room: str
    can_publish: bool
    can_publish_data: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "roomJoin": True,
            "canPublish": self.can_publish,
            "canSubscribe": True,
            "canPublishData": self.can_publish_data,
        }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def access_token(
    *,
    api_key: str,
    api_secret: str,
    identity: str,
    name: str,
    grant: VideoGrant,
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
) -> str:
    """A signed LiveKit access token (compact JWT, HS256)."""
    if not api_key or not api_secret:
        raise ValueError("a LiveKit API key and secret are needed")
    if ttl <= 0:
        raise ValueError("the token lifetime must be positive")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": api_key,
        "sub": identity,
        "name": name,
        "nbf": issued,
        "exp": issued + int(ttl),
        "video": grant.to_json(),
    }
    signing_input = _b64url(_json({"alg": "HS256", "typ": "JWT"})) + "." + _b64url(_json(claims))
    signature = hmac.new(
        api_secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256
    ).digest()
    return signing_input + "." + _b64url(signature)
