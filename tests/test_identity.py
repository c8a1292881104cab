"""Tokens and session cookies (spec §1, §3)."""

from __future__ import annotations

import time

from django.contrib.sessions.backends.db import SessionStore
from django.core import signing
from django.test import Client, override_settings
from twisted.trial import unittest

from bridge import identity
from bridge.identity import AuthenticationFailed
from bridge.session import Role
from tests.support import make_user, reset_database

PASSWORD = "a-long-enough-password-1"


class TokenTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        self.user = make_user("ann", PASSWORD)

    def test_round_trip(self) -> None:
        found = identity.identity_from_token(identity.make_token(self.user))
        self.assertEqual(
            (found.role, found.user_id, found.username), (Role.OPERATOR, self.user.pk, "ann")
        )
        self.assertEqual(found.auth_hash, self.user.get_session_auth_hash())

    def test_forged_and_garbage_tokens(self) -> None:
        token = identity.make_token(self.user)
        for bad in (
            "",
            "x",
            token[:-2] + "aa",
            token.replace(":", ";"),
            signing.dumps({"u": self.user.pk}, salt="other"),
        ):
            with self.assertRaises(AuthenticationFailed):
                identity.identity_from_token(bad)

    def test_expired(self) -> None:
        token = identity.make_token(self.user)
        with override_settings(BRIDGE_TOKEN_MAX_AGE=0):
            time.sleep(1.1)
            with self.assertRaisesRegex(AuthenticationFailed, "expired"):
                identity.identity_from_token(token)

    def test_password_change_voids_tokens(self) -> None:
        token = identity.make_token(self.user)
        self.user.set_password("another-long-password-2")
        self.user.save()
        with self.assertRaisesRegex(AuthenticationFailed, "password"):
            identity.identity_from_token(token)

    def test_inactive_or_deleted_user(self) -> None:
        token = identity.make_token(self.user)
        self.user.is_active = False
        self.user.save()
        with self.assertRaises(AuthenticationFailed):
            identity.identity_from_token(token)
        self.user.delete()
        with self.assertRaises(AuthenticationFailed):
            identity.identity_from_token(token)

    def test_token_of_a_session_dies_with_it(self) -> None:
        store = SessionStore()
        store.create()
        token = identity.make_token(self.user, store.session_key)
        self.assertEqual(identity.identity_from_token(token).session_key, store.session_key)
        store.delete()
        with self.assertRaisesRegex(AuthenticationFailed, "session"):
            identity.identity_from_token(token)

    def test_still_valid(self) -> None:
        found = identity.identity_from_token(identity.make_token(self.user))
        self.assertIsNone(identity.still_valid(found))
        self.user.set_password("another-long-password-2")
        self.user.save()
        self.assertEqual(identity.still_valid(found), "password changed")


class CookieTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        self.user = make_user("ann", PASSWORD)

    def test_logged_in_session_identifies(self) -> None:
        client = Client()
        self.assertTrue(client.login(username="ann", password=PASSWORD))
        key = client.cookies["sessionid"].value
        header = f"csrftoken=abc; sessionid={key}; other=1"
        self.assertEqual(identity.session_key_from_cookie_header(header), key)
        found = identity.identity_from_session(key)
        assert found is not None
        self.assertEqual((found.username, found.session_key), ("ann", key))
        client.logout()
        self.assertIsNone(identity.identity_from_session(key))

    def test_bad_cookie_headers(self) -> None:
        for header in (None, "", "sessionid=", "garbage;;==", "other=1"):
            self.assertIsNone(identity.session_key_from_cookie_header(header))
        self.assertIsNone(identity.identity_from_session("not-a-session"))


class TokenViewTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        make_user("ann", PASSWORD)

    def test_json_and_form_credentials(self) -> None:
        client = Client()
        r = client.post(
            "/api/token/",
            {"username": "ann", "password": PASSWORD},
            content_type="application/json",
        )
        self.assertEqual(r.status_code, 200)
        self.assertEqual(r.json()["expires_in"], 60)
        self.assertEqual(identity.identity_from_token(r.json()["token"]).username, "ann")
        r = client.post("/api/token/", {"username": "ann", "password": PASSWORD})
        self.assertEqual(r.status_code, 200)
        self.assertIn("no-store", r.headers["Cache-Control"])

    def test_wrong_password_and_get(self) -> None:
        client = Client()
        r = client.post(
            "/api/token/", {"username": "ann", "password": "x"}, content_type="application/json"
        )
        self.assertEqual(r.status_code, 401)
        self.assertEqual(client.get("/api/token/").status_code, 405)
        self.assertEqual(
            client.post("/api/token/", b"[1]", content_type="application/json").status_code, 401
        )

    def test_credentials_that_are_not_text_are_400(self) -> None:
        client = Client()
        for body in (
            b'{"username": "\\ud800", "password": "x"}',  # a lone surrogate: no UTF-8
            b'{"username": "ann", "password": "\\udfff"}',
            b'{"username": "ann\\u0000", "password": "x"}',  # PostgreSQL refuses NUL
        ):
            r = client.post("/api/token/", body, content_type="application/json")
            self.assertEqual(r.status_code, 400, body)
            self.assertIn("text", r.json()["error"])
        r = client.post("/api/token/", {"username": "ann\x00", "password": PASSWORD})
        self.assertEqual(r.status_code, 400)

    def test_session_needs_csrf(self) -> None:
        client = Client(enforce_csrf_checks=True)
        client.login(username="ann", password=PASSWORD)
        self.assertEqual(client.post("/api/token/").status_code, 403)
        client.get("/accounts/login/")  # sets the CSRF cookie
        csrf = client.cookies["csrftoken"].value
        r = client.post("/api/token/", HTTP_X_CSRFTOKEN=csrf)
        self.assertEqual(r.status_code, 200)
        found = identity.identity_from_token(r.json()["token"])
        self.assertEqual(found.session_key, client.session.session_key)
