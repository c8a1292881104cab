"""IDENTIFY tokens: revoked with the password or the browser session, never logged.

Lifetime and replay after expiry are in test_token_expiry.py, which needs a
bridge started with a one-second lifetime.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from twisted.internet import defer

from tests.security.world import (
    PASSWORD,
    SecurityTestCase,
    Spec,
    World,
    https,
    login,
    logout,
    raw_handshake,
    session_token,
    sleep,
)

SPEC = Spec(
    users={
        "pwchange": {},
        "browser": {},
        "csrf": {},
        "careful": {},
        "mutant": {},
        "other": {},
        "inactive": {"active": False},
    },
    devices={"lamp": {}},
    grants=[
        ("user", "pwchange", "lamp", "read"),
        ("user", "browser", "lamp", "read"),
        ("user", "careful", "lamp", "read"),
        ("user", "mutant", "lamp", "read"),
    ],
)

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World(SPEC)
    return _world


def password_token(w: World, username: str, password: str = PASSWORD) -> Any:
    return https(
        w,
        "POST",
        "/api/token/",
        headers={"Content-Type": "application/json"},
        body=json.dumps({"username": username, "password": password}).encode(),
    )


class TokenTestCase(SecurityTestCase):
    make_world = staticmethod(world)

    @defer.inlineCallbacks
    def refused(self, token: str) -> Any:
        """IDENTIFY with ``token`` ends in ERROR 4004 and a 4004 close."""
        c, frame = yield self.identify(token)
        self.assertEqual(frame.get("t"), "ERROR", frame)
        self.assertEqual(frame["d"]["code"], 4004)
        code, _ = yield c.closed()
        self.assertEqual(code, 4004)
        return frame["d"]["message"]


class RevocationTests(TokenTestCase):
    @defer.inlineCallbacks
    def test_token_after_a_password_change_is_4004(self) -> Any:
        token = self.world.token("pwchange")
        live, ready = yield self.identify(token)
        self.assertEqual(ready.get("t"), "READY")  # the token was good
        out, err, code = yield self.world.shell(
            "from django.contrib.auth.models import User;"
            "u = User.objects.get(username='pwchange'); u.set_password('a-new-one-77'); u.save()"
        )
        self.assertEqual(code, 0, err)
        yield self.closed_with(live, 4011, timeout=3)
        message = yield self.refused(token)
        self.assertIn("password", message)
        # A token minted after the change works: the refusal is about the old one.
        c, frame = yield self.identify(self.world.token("pwchange"))
        self.assertEqual(frame.get("t"), "READY")

    @defer.inlineCallbacks
    def test_token_minted_from_a_browser_session_dies_with_logout(self) -> Any:
        jar = login(self.world, "browser")
        minted = session_token(self.world, jar)
        self.assertEqual(minted.status, 200, minted.body)
        token = json.loads(minted.body)["token"]
        by_token, ready = yield self.identify(token)
        self.assertEqual(ready.get("t"), "READY")
        cookie = {"Cookie": f"sessionid={jar['sessionid']}"}
        by_cookie = yield self.client(headers=cookie, origin=self.world.origin)
        yield by_cookie.next()  # HELLO
        ready = yield by_cookie.next()
        self.assertEqual(ready.get("t"), "READY")

        old_session = jar["sessionid"]
        out = logout(self.world, jar)
        self.assertIn(out.status, (200, 302), out.body[:300])
        yield self.closed_with(by_token, 4011, timeout=3)
        yield self.closed_with(by_cookie, 4011, timeout=3)
        yield self.refused(token)

        # The old cookie no longer identifies anyone: HELLO, then nothing.
        stale = yield self.client(
            headers={"Cookie": f"sessionid={old_session}"}, origin=self.world.origin
        )
        yield stale.next()
        try:
            frame = yield stale.next(timeout=1.0)
        except defer.CancelledError:
            frame = None
        self.assertIsNone(frame)

    @defer.inlineCallbacks
    def test_forged_tokens_are_4004(self) -> Any:
        token = self.world.token("mutant")
        payload, stamp, signature = token.split(":")
        raw = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        other_id = raw["u"] + 1  # "other" was created right after "mutant"
        swapped = base64.urlsafe_b64encode(json.dumps({**raw, "u": other_id}).encode())
        forgeries = [
            f"{swapped.decode().rstrip('=')}:{stamp}:{signature}",  # another user's id
            f"{payload}:{stamp}:{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}",
            f"{payload}:{stamp}:",
            f"{payload}:{stamp}",
            f"{payload}:zzzzzz:{signature}",  # a later time stamp, same signature
            token.upper(),
            token + "x",
            "",
        ]
        for forged in forgeries:
            yield self.refused(forged)
        # Positive control: the untouched token works.
        c, frame = yield self.identify(token)
        self.assertEqual(frame.get("t"), "READY")


class TokenEndpointTests(TokenTestCase):
    def test_session_token_needs_the_csrf_check(self) -> None:
        jar = login(self.world, "csrf")
        bare = https(self.world, "POST", "/api/token/", jar=dict(jar))
        self.assertEqual(bare.status, 403, bare.body)
        self.assertNotIn(b'"token"', bare.body)
        cross = https(
            self.world,
            "POST",
            "/api/token/",
            headers={"X-CSRFToken": jar["csrftoken"], "Origin": "https://evil.example"},
            jar=dict(jar),
        )
        self.assertEqual(cross.status, 403, cross.body)
        self.assertNotIn(b'"token"', cross.body)
        good = session_token(self.world, dict(jar))
        self.assertEqual(good.status, 200, good.body)

    def test_wrong_password_unknown_or_inactive_user_gets_no_token(self) -> None:
        for username, password in (
            ("csrf", "wrong"),
            ("nobody-here", PASSWORD),
            ("csrf", ""),
            ("inactive", PASSWORD),
        ):
            resp = password_token(self.world, username, password)
            self.assertEqual(resp.status, 401, resp.body)
            self.assertNotIn(b'"token"', resp.body)

    def test_credentials_in_a_url_never_mint_a_token(self) -> None:
        query = f"/api/token/?username=csrf&password={PASSWORD}"
        resp = https(self.world, "GET", query)
        self.assertEqual(resp.status, 405)
        self.assertNotIn(b'"token"', resp.body)
        resp = https(self.world, "POST", query)
        self.assertEqual(resp.status, 401)
        self.assertNotIn(b'"token"', resp.body)

    def test_token_responses_are_not_cached(self) -> None:
        resp = password_token(self.world, "csrf")
        self.assertEqual(resp.status, 200)
        self.assertIn("no-store", resp.header("cache-control") or "")


class NotLoggedTests(TokenTestCase):
    @defer.inlineCallbacks
    def test_tokens_passwords_and_cookies_never_reach_the_log_or_audit(self) -> Any:
        w = self.world
        secrets_seen: list[str] = [PASSWORD]
        # A token from the HTTP API, used for IDENTIFY.
        minted = password_token(w, "careful")
        self.assertEqual(minted.status, 200)
        api_token = json.loads(minted.body)["token"]
        secrets_seen.append(api_token)
        c, ready = yield self.identify(api_token)
        self.assertEqual(ready.get("t"), "READY")
        # A token from bridge-admin, used for RESUME of that session.
        resume_token = w.token("careful")
        secrets_seen.append(resume_token)
        c.proto.dropConnection(abort=True)
        yield sleep(0.3)
        r = yield self.client()
        yield r.next()
        r.send(
            {
                "op": 9,
                "d": {"session_id": ready["d"]["session_id"], "seq": 1, "token": resume_token},
            }
        )
        yield r.event("RESUMED")
        # A forged token: refused, and the refusal must not quote it.
        forged = api_token[:-4] + "AAAA"
        secrets_seen.append(forged)
        yield self.refused(forged)
        # A careless client puts a token in URLs.
        careless = w.token("careful")
        secrets_seen.append(careless)
        raw_handshake(w, f"/ws/?token={careless}", {"Origin": w.origin})
        https(w, "GET", f"/healthz?token={careless}")
        https(w, "GET", f"/accounts/login/?token={careless}")
        https(w, "GET", f"/no-such-page/?token={careless}")
        # ...and so every request from such a page carries it in its Referer.
        referred = w.token("careful")
        secrets_seen.append(referred)
        https(w, "GET", "/healthz", headers={"Referer": f"{w.origin}/wall/?token={referred}"})
        # A browser session: its cookie is a credential too.
        jar = login(w, "careful")
        secrets_seen.append(jar["sessionid"])
        session_minted = session_token(w, jar)
        secrets_seen.append(json.loads(session_minted.body)["token"])

        yield sleep(1.0)  # log lines and the audit store flush
        log = w.log_text()
        self.assertIn("identified", log)  # the log is the right one, and it is written
        # Long enough fragments would still be a leak (e.g. a truncated token).
        leaks = [line for line in log.splitlines() if any(s[:24] in line for s in secrets_seen)]
        self.assertEqual(leaks, [], "credentials in the twistd log")
        out, err, code = yield w.shell(
            "import json; from bridge.devices.models import AuditEntry as A;"
            "print(json.dumps(list(A.objects.values()), default=str))"
        )
        self.assertEqual(code, 0, err)
        for secret in secrets_seen:
            self.assertNotIn(secret[:24], out)

    def test_secret_key_is_private(self) -> None:
        path = self.world.data_dir / "secret_key"
        self.assertEqual(path.stat().st_mode & 0o077, 0, oct(path.stat().st_mode))
        self.assertEqual(self.world.data_dir.stat().st_mode & 0o077, 0)

    def test_no_token_is_ever_put_in_a_url(self) -> None:
        # Pages link to the API; none carries a credential in a URL.
        jar = login(self.world, "careful")
        for path in ("/", "/accounts/login/"):
            page = https(self.world, "GET", path, jar=dict(jar))
            self.assertIsNone(re.search(rb"[?&;](access_)?token=", page.body), path)
            location = page.header("location") or ""
            self.assertNotIn("token", location.lower())
