"""Camera tokens: bridge.video (LiveKit JWTs) and POST /api/devices/<id>/video-token/."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any
from unittest import mock

from django.http import HttpResponse
from django.test import Client, override_settings
from django.urls import include, path
from twisted.trial import unittest

from bridge import video, video_views

from .support import make_user, reset_database

# The view under the path the site will route to it, ahead of the real site.
urlpatterns = [
    path("api/devices/<str:device_id>/video-token/", video_views.video_token),
    path("", include("django_site.urls")),
]

API_KEY = "APIbridgeTest1"
API_SECRET = "s3cret-livekit-api-secret-for-tests-only"
LIVEKIT_URL = "wss://livekit.example.test"
LIVEKIT = {
    "ROOT_URLCONF": __name__,
    "BRIDGE_LIVEKIT_API_KEY": API_KEY,
    "BRIDGE_LIVEKIT_API_SECRET": API_SECRET,
    "BRIDGE_LIVEKIT_URL": LIVEKIT_URL,
    "BRIDGE_LIVEKIT_TOKEN_TTL": 300,
    "ALLOWED_HOSTS": ["testserver"],
    "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast, tests only
}


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(token: str, secret: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check an HS256 JWT independently of bridge.video; return (header, claims)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AssertionError("not a compact JWT")
    header_b64, claims_b64, signature_b64 = parts
    for part in parts:
        assert "=" not in part, "JWT parts are base64url without padding"
    expected = hmac.new(
        secret.encode(), f"{header_b64}.{claims_b64}".encode(), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(expected, b64url_decode(signature_b64)):
        raise AssertionError("bad signature")
    return json.loads(b64url_decode(header_b64)), json.loads(b64url_decode(claims_b64))


class AccessTokenTests(unittest.TestCase):
    def test_claims_follow_livekit_format(self) -> None:
        grant = video.VideoGrant(room="device-abc", can_publish=False, can_publish_data=False)
        token = video.access_token(
            api_key=API_KEY,
            api_secret=API_SECRET,
            identity="user-7-x",
            name="Alice",
            grant=grant,
            ttl=120,
            now=1_700_000_000.7,
        )
        header, claims = verify_jwt(token, API_SECRET)
        self.assertEqual(header, {"alg": "HS256", "typ": "JWT"})
        self.assertEqual(
            claims,
            {
                "iss": API_KEY,
                "sub": "user-7-x",
                "name": "Alice",
                "nbf": 1_700_000_000,
                "exp": 1_700_000_120,
                "video": {
                    "room": "device-abc",
                    "roomJoin": True,
                    "canPublish": False,
                    "canSubscribe": True,
                    "canPublishData": False,
                },
            },
        )
        with self.assertRaises(AssertionError):
            verify_jwt(token, API_SECRET + "x")

    def test_publisher_grant_and_identities(self) -> None:
        grant = video.VideoGrant(
            room=video.room_for("dev1"), can_publish=True, can_publish_data=True
        )
        self.assertEqual(grant.to_json()["room"], "device-dev1")
        self.assertTrue(grant.to_json()["canPublish"])
        self.assertEqual(video.device_identity("dev1"), "device-dev1")
        first, second = video.user_identity(7), video.user_identity(7)
        self.assertTrue(first.startswith("user-7-"))
        self.assertNotEqual(first, second)  # two tabs must not kick each other out

    def test_refuses_bad_arguments(self) -> None:
        grant = video.VideoGrant("r", False, False)
        with self.assertRaises(ValueError):
            video.access_token(api_key="", api_secret="s", identity="i", name="n", grant=grant)
        with self.assertRaises(ValueError):
            video.access_token(
                api_key="k", api_secret="s", identity="i", name="n", grant=grant, ttl=0
            )


class VideoTokenViewTests(unittest.TestCase):
    def setUp(self) -> None:
        from bridge.devices.models import Device, Grant

        livekit = override_settings(**LIVEKIT)
        livekit.enable()
        self.addCleanup(livekit.disable)
        # Django logs every 4xx/5xx answer as a warning; these are all expected.
        request_log = logging.getLogger("django.request")
        self.addCleanup(request_log.setLevel, request_log.level)
        request_log.setLevel(logging.ERROR)
        reset_database()
        self.addCleanup(reset_database)
        self.device = Device.objects.create(name="Press camera", kind="camera")
        self.other = Device.objects.create(name="Other", kind="camera")
        self.reader = make_user("reader", "pw-reader-123")
        self.nobody = make_user("nobody", "pw-nobody-123")
        Grant.objects.create(device=self.device, user=self.reader, permission=Grant.READ)
        self.url = f"/api/devices/{self.device.id}/video-token/"

    def client_for(self, username: str | None, *, csrf: bool = False) -> Client:
        client = Client(enforce_csrf_checks=csrf)
        if username is not None:
            self.assertTrue(client.login(username=username, password=f"pw-{username}-123"))
        return client

    def post(self, client: Client, url: str | None = None, **extra: Any) -> HttpResponse:
        response: HttpResponse = client.post(url or self.url, **extra)
        return response

    def test_reader_gets_subscribe_only_token(self) -> None:
        before = int(time.time())
        response = self.post(self.client_for("reader"))
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response["Cache-Control"].split(",")[0].strip(), "max-age=0")
        body = response.json()
        self.assertEqual(body["url"], LIVEKIT_URL)
        self.assertEqual(body["room"], f"device-{self.device.id}")
        self.assertEqual(body["expires_in"], 300)
        self.assertFalse(body["can_publish"])
        header, claims = verify_jwt(body["token"], API_SECRET)
        self.assertEqual(header["alg"], "HS256")
        self.assertEqual(claims["iss"], API_KEY)
        self.assertEqual(claims["sub"], body["identity"])
        self.assertTrue(claims["sub"].startswith(f"user-{self.reader.pk}-"))
        self.assertNotIn("reader", claims["sub"])  # no PII in the identity
        self.assertEqual(claims["name"], "reader")
        self.assertLessEqual(before, claims["nbf"])
        self.assertLessEqual(claims["nbf"], int(time.time()))
        self.assertEqual(claims["exp"] - claims["nbf"], 300)
        self.assertEqual(
            claims["video"],
            {
                "room": f"device-{self.device.id}",
                "roomJoin": True,
                "canPublish": False,
                "canSubscribe": True,
                "canPublishData": False,
            },
        )

    def test_group_grant_public_and_superuser(self) -> None:
        from django.contrib.auth.models import Group

        from bridge.devices.models import Grant

        group = Group.objects.create(name="viewers")
        self.nobody.groups.add(group)
        Grant.objects.create(device=self.other, group=group, permission=Grant.CHANGE)
        response = self.post(
            self.client_for("nobody"), f"/api/devices/{self.other.id}/video-token/"
        )
        self.assertEqual(response.status_code, 200)
        # Even `change` only subscribes: publishing is for the device's own client.
        self.assertFalse(verify_jwt(response.json()["token"], API_SECRET)[1]["video"]["canPublish"])

        self.other.public = True
        self.other.save()
        response = self.post(
            self.client_for("reader"), f"/api/devices/{self.other.id}/video-token/"
        )
        self.assertEqual(response.status_code, 200)

        make_user("root", "pw-root-123", is_superuser=True, is_staff=True)
        response = self.post(self.client_for("root"))
        self.assertEqual(response.status_code, 200)
        self.assertFalse(response.json()["can_publish"])

    def test_no_permission_unknown_and_disabled_look_the_same(self) -> None:
        no_permission = self.post(self.client_for("nobody"))
        unknown = self.post(self.client_for("reader"), "/api/devices/doesNotExist123/video-token/")
        self.device.enabled = False
        self.device.save()
        disabled = self.post(self.client_for("reader"))
        for response in (no_permission, unknown, disabled):
            self.assertEqual(response.status_code, 403)
            self.assertEqual(response.json(), {"error": video_views._FORBIDDEN})
            self.assertNotIn(b'token"', response.content)

    def test_unauthenticated(self) -> None:
        response = self.post(self.client_for(None))
        self.assertEqual(response.status_code, 401)
        self.assertIn("Bearer", response["WWW-Authenticate"])
        for header in ("Bearer not-a-device-key", "Bearer ", "Basic dXNlcjpwYXNz"):
            response = self.post(self.client_for(None), HTTP_AUTHORIZATION=header)
            self.assertEqual(response.status_code, 401, header)
        # A wrong bearer key does not fall back to the session it came with.
        response = self.post(self.client_for("reader"), HTTP_AUTHORIZATION="Bearer wrong")
        self.assertEqual(response.status_code, 401)

    def test_get_not_allowed(self) -> None:
        response = self.client_for("reader").get(self.url)
        self.assertEqual(response.status_code, 405)

    def test_inactive_user(self) -> None:
        client = self.client_for("reader")
        self.reader.is_active = False
        self.reader.save()
        self.assertIn(self.post(client).status_code, (401, 403))

    def test_csrf_enforced_for_session(self) -> None:
        client = self.client_for("reader", csrf=True)
        self.assertEqual(self.post(client).status_code, 403)
        self.assertEqual(self.post(client).json(), {"error": "CSRF check failed"})
        client.get("/accounts/login/")  # any page that sets the CSRF cookie
        csrf = client.cookies["csrftoken"].value
        response = self.post(client, HTTP_X_CSRFTOKEN=csrf)
        self.assertEqual(response.status_code, 200, response.content)

    @override_settings(BRIDGE_LIVEKIT_API_SECRET="")
    def test_not_configured(self) -> None:
        response = self.post(self.client_for("reader"))
        self.assertEqual(response.status_code, 503)
        self.assertIn("BRIDGE_LIVEKIT_API_SECRET", response.json()["error"])
        self.assertNotIn(API_KEY, response.json()["error"])
        # Authentication still comes first.
        self.assertEqual(self.post(self.client_for(None)).status_code, 401)

    def test_unconfigured_defaults(self) -> None:
        with override_settings(BRIDGE_LIVEKIT_API_KEY=None):
            self.assertEqual(self.post(self.client_for("reader")).status_code, 503)
        with override_settings(BRIDGE_LIVEKIT_TOKEN_TTL=0):
            response = self.post(self.client_for("reader"))
            self.assertEqual(response.status_code, 503)
            self.assertIn("BRIDGE_LIVEKIT_TOKEN_TTL", response.json()["error"])

    def test_device_key_may_publish_own_camera_only(self) -> None:
        own = self.device.id

        def lookup(key: str) -> str | None:
            return own if key == "device-key-1" else None

        self.assertIsNone(video_views.device_for_key("device-key-1"))  # none exist yet
        with mock.patch.object(video_views, "device_for_key", lookup):
            auth = {"HTTP_AUTHORIZATION": "Bearer device-key-1"}
            # No session, no CSRF token: a bearer key is not ambient authority.
            response = self.post(self.client_for(None, csrf=True), **auth)
            self.assertEqual(response.status_code, 200, response.content)
            body = response.json()
            self.assertTrue(body["can_publish"])
            claims = verify_jwt(body["token"], API_SECRET)[1]
            self.assertEqual(claims["sub"], f"device-{own}")
            self.assertEqual(claims["name"], "Press camera")
            self.assertEqual(
                claims["video"],
                {
                    "room": f"device-{own}",
                    "roomJoin": True,
                    "canPublish": True,
                    "canSubscribe": True,
                    "canPublishData": True,
                },
            )
            other = self.post(
                self.client_for(None), f"/api/devices/{self.other.id}/video-token/", **auth
            )
            self.assertEqual(other.status_code, 403)
            self.device.enabled = False
            self.device.save()
            self.assertEqual(self.post(self.client_for(None), **auth).status_code, 403)
