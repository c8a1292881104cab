"""Expired tokens, replayed later, on a bridge whose tokens live one second.

``BRIDGE_TOKEN_MAX_AGE=1`` goes to the server process only: tokens are
checked there.  Django stamps tokens in whole seconds, so "fresh" means one
with at least 0.3 s left (:func:`token_seconds_left`), and "old" one that is
past its lifetime by more than a second.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from tests.security.world import (
    PASSWORD,
    SecurityTestCase,
    Spec,
    World,
    https,
    sleep,
    token_seconds_left,
)

MAX_AGE = 1.0
# Enough for IDENTIFY on loopback (tens of milliseconds) with a wide margin.
FRESH = 0.3
SPEC = Spec(users={"shortlived": {}}, devices={"lamp": {}}, grants=[])

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World(SPEC, env={"BRIDGE_TOKEN_MAX_AGE": "1"})
    return _world


class ExpiryTests(SecurityTestCase):
    make_world = staticmethod(world)

    def api_token(self) -> dict[str, Any]:
        resp = https(
            self.world,
            "POST",
            "/api/token/",
            headers={"Content-Type": "application/json"},
            body=json.dumps({"username": "shortlived", "password": PASSWORD}).encode(),
        )
        self.assertEqual(resp.status, 200, resp.body)
        body: dict[str, Any] = json.loads(resp.body)
        return body

    @defer.inlineCallbacks
    def fresh_token(self) -> Any:
        for _ in range(20):
            token = self.api_token()["token"]
            if token_seconds_left(token, MAX_AGE) >= FRESH:
                return token
            yield sleep(0.23)  # shifts the phase against the second boundary
        self.fail(f"could not get a token with {FRESH} s left")

    @defer.inlineCallbacks
    def wait_until_old(self, token: str) -> Any:
        yield sleep(max(0.0, token_seconds_left(token, MAX_AGE)) + 1.2)

    @defer.inlineCallbacks
    def assertExpired(self, c: Any, frame: dict[str, Any]) -> Any:
        self.assertEqual(frame.get("t"), "ERROR", frame)
        self.assertEqual(frame["d"]["code"], 4004)
        self.assertIn("expired", frame["d"]["message"])
        code, _ = yield c.closed()
        self.assertEqual(code, 4004)

    def test_the_lifetime_is_announced(self) -> None:
        self.assertEqual(self.api_token()["expires_in"], 1)

    @defer.inlineCallbacks
    def test_old_token_from_bridge_admin_is_4004(self) -> Any:
        token = self.world.token("shortlived")
        yield self.wait_until_old(token)
        c, frame = yield self.identify(token)
        yield self.assertExpired(c, frame)

    @defer.inlineCallbacks
    def test_replayed_token_after_expiry_is_4004_on_identify_and_resume(self) -> Any:
        token = yield self.fresh_token()
        c, ready = yield self.identify(token)
        self.assertEqual(ready.get("t"), "READY")  # it was a good token
        session_id, seq = ready["d"]["session_id"], ready["s"]
        c.proto.dropConnection(abort=True)
        yield self.wait_until_old(token)

        # Someone who captured the token and the session id replays both...
        r = yield self.client()
        yield r.next()
        r.send({"op": 9, "d": {"session_id": session_id, "seq": seq, "token": token}})
        frame = yield r.next()
        yield self.assertExpired(r, frame)
        # ...or just the token.
        c, frame = yield self.identify(token)
        yield self.assertExpired(c, frame)

    @defer.inlineCallbacks
    def test_a_live_connection_outlives_its_token(self) -> Any:
        # The token is checked at IDENTIFY only: the connection is not cut when it
        # expires (revocation, not expiry, ends live sessions: 4011).
        token = yield self.fresh_token()
        c, ready = yield self.identify(token)
        self.assertEqual(ready.get("t"), "READY")
        yield self.wait_until_old(token)
        c.send({"op": 1, "d": ready["s"]})
        ack = yield c.next()
        self.assertEqual(ack, {"op": 2})
