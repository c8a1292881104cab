"""Failed logins throttled per address and per username (issue 6)."""

from __future__ import annotations

from typing import Any

from django.test import Client, override_settings
from twisted.internet import defer
from twisted.trial import unittest

import bridge.throttle
from bridge.throttle import FailureThrottle, RateLimit
from tests.support import make_user, reset_database
from tests.test_e2e import E2ETestCase

PASSWORD = "a-long-enough-password-1"


class FailureThrottleTests(unittest.SynchronousTestCase):
    def test_blocks_after_the_limit_until_the_window_passes(self) -> None:
        now = [0.0]
        t = FailureThrottle(limit=3, window=60, clock=lambda: now[0])
        for _ in range(3):
            self.assertEqual(t.retry_after("a"), 0)
            t.failed("a", "u")
        self.assertEqual(t.retry_after("a"), 60)
        self.assertEqual(t.retry_after("other", "u"), 60)
        now[0] = 59.0
        self.assertEqual(t.retry_after("a"), 1)
        now[0] = 60.0
        self.assertEqual(t.retry_after("a", "u"), 0)

    def test_success_clears_the_username(self) -> None:
        t = FailureThrottle(limit=2, window=60)
        t.failed("u")
        t.succeeded("u")
        t.failed("u")
        self.assertEqual(t.retry_after("u"), 0)


class LoginThrottleTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        reset_database()
        make_user("ann", PASSWORD)
        self.patch(bridge.throttle, "_logins", FailureThrottle(limit=3, window=300))

    def test_token_api_returns_429_after_failures_even_with_the_right_password(self) -> None:
        client = Client()
        for _ in range(3):
            r = client.post(
                "/api/token/",
                {"username": "ann", "password": "wrong"},
                content_type="application/json",
            )
            self.assertEqual(r.status_code, 401)
        r = client.post(
            "/api/token/",
            {"username": "ann", "password": PASSWORD},
            content_type="application/json",
        )
        self.assertEqual(r.status_code, 429)
        self.assertIn("Retry-After", r.headers)

    @override_settings(LOGIN_URL="/accounts/login/")
    def test_login_form_returns_429_after_failures(self) -> None:
        client = Client()
        for _ in range(3):
            r = client.post("/accounts/login/", {"username": "ann", "password": "wrong"})
            self.assertEqual(r.status_code, 200)  # the form again, with an error
        r = client.post("/accounts/login/", {"username": "ann", "password": PASSWORD})
        self.assertEqual(r.status_code, 429)


class IdentifyThrottleTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_failed_identifies_from_one_address_are_throttled(self) -> Any:
        """A bridge started with a limit of 3 failures per address."""
        from tests.server import BridgeProcess, kill_on_exit

        server = BridgeProcess(env={"BRIDGE_LOGIN_FAILURE_LIMIT": "3"})
        kill_on_exit(server)
        self.addCleanup(server.stop)
        yield server.start()
        self.server = server
        codes = []
        for _ in range(4):
            c = yield self.client()
            yield c.next()
            c.send({"op": 3, "d": {"token": "forged"}})
            error = yield c.event("ERROR")
            codes.append(error["d"]["code"])
            yield c.closed()
        self.assertEqual(codes, [4004, 4004, 4004, 4008])


class RateLimitTests(unittest.SynchronousTestCase):
    def test_a_burst_passes_then_the_rate_holds(self) -> None:
        now = [0.0]
        limit = RateLimit(rate=2.0, burst=3, clock=lambda: now[0])
        self.assertEqual([limit.take("a") for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(limit.take("a"), 0.5)
        self.assertEqual(limit.take("b"), 0.0, "each address has its own bucket")
        now[0] = 0.5
        self.assertEqual(limit.take("a"), 0.0)
        self.assertGreater(limit.take("a"), 0.0)

    def test_zero_rate_or_no_address_is_never_limited(self) -> None:
        off = RateLimit(rate=0.0, burst=1)
        self.assertEqual([off.take("a") for _ in range(10)], [0.0] * 10)
        self.assertEqual(RateLimit(1.0, 1).take(None), 0.0)


class ConnectRateTests(E2ETestCase):
    @defer.inlineCallbacks
    def test_new_connections_past_the_rate_get_429_at_the_handshake(self) -> Any:
        """--connect-rate/--connect-burst: WebSocket and SSE share one budget per address."""
        import treq
        from twisted.internet import reactor, ssl, task
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        from tests.server import BridgeProcess, kill_on_exit
        from tests.wsclient import connect

        server = BridgeProcess(args=["--connect-rate", "1", "--connect-burst", "2"])
        kill_on_exit(server)
        self.addCleanup(server.stop)
        yield server.start()
        self.server = server
        for _ in range(2):
            c = yield self.client()
            hello = yield c.next()
            self.assertEqual(hello["op"], 0)
        with self.assertRaises(ConnectionError) as refused:
            yield connect(server.ws_url.replace("ws://", "wss://"), ca_pem=server.ca_pem)
        self.assertIn("429", str(refused.exception))
        agent = Agent(
            reactor,
            BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(server.ca_pem)),
        )
        url = server.url.replace("127.0.0.1", "localhost") + "events/?devices=abc"
        response = yield treq.get(url, agent=agent)
        self.assertEqual(response.code, 429)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        yield response.content()
        yield task.deferLater(reactor, 1.2, lambda: None)
        c = yield self.client()
        hello = yield c.next()
        self.assertEqual(hello["op"], 0, "allowed again once the bucket refilled")
