"""/metrics: Prometheus text for staff or the configured bearer token."""

from __future__ import annotations

import re
from typing import Any

import treq
from twisted.internet import defer, reactor, ssl
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from bridge.metrics import Exposition, Histogram
from tests.test_e2e import METRICS_TOKEN, E2ETestCase


class FormatTests(unittest.SynchronousTestCase):
    def test_histogram_is_cumulative(self) -> None:
        h = Histogram((0.01, 0.1, 1))
        for value in (0.005, 0.05, 0.05, 5):
            h.observe(value)
        self.assertEqual(
            h.lines("x_seconds"),
            [
                'x_seconds_bucket{le="0.01"} 1',
                'x_seconds_bucket{le="0.1"} 3',
                'x_seconds_bucket{le="1"} 3',
                'x_seconds_bucket{le="+Inf"} 4',
                "x_seconds_sum 5.105000",
                "x_seconds_count 4",
            ],
        )

    def test_labels_are_escaped(self) -> None:
        x = Exposition()
        x.labelled("m_total", "counter", "help", "k", {'a"b\\c': 2})
        self.assertEqual(
            x.text().decode().splitlines(),
            ["# HELP m_total help", "# TYPE m_total counter", 'm_total{k="a\\"b\\\\c"} 2'],
        )


class ScrapeTests(E2ETestCase):
    def agent(self) -> Agent:
        trust = ssl.Certificate.loadPEM(self.server.ca_pem)
        return Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))

    @defer.inlineCallbacks
    def test_bearer_token_scrape_and_refusals(self) -> Any:
        # Some traffic first: a command round trip.
        toggle = self.world.ids["toggle"]
        c, _ = yield self.ready("op")
        c.send({"op": 4, "d": {"device": toggle, "payload": {"on": True}, "id": "m"}})
        yield c.until(lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent")
        url = self.server.url.replace("127.0.0.1", "localhost") + "metrics"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = yield treq.get(url, headers=headers, agent=self.agent())
            self.assertEqual(r.code, 403)
            yield r.content()
        r = yield treq.get(
            url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, agent=self.agent()
        )
        self.assertEqual(r.code, 200)
        self.assertIn(b"text/plain", r.headers.getRawHeaders(b"content-type")[0])
        text = (yield r.content()).decode()
        samples = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
        )
        self.assertGreaterEqual(float(samples['bridge_connections{role="operator"}']), 1)
        self.assertGreaterEqual(
            float(samples['bridge_command_results_total{result="confirmed"}']), 1
        )
        self.assertGreaterEqual(float(samples["bridge_command_confirm_seconds_count"]), 1)
        self.assertEqual(samples["bridge_upstream_up"], "1")
        self.assertIn('bridge_threadpool_queue_depth{pool="db"}', samples)
        for line in text.splitlines():
            if line and not line.startswith("#"):
                self.assertRegex(line, r"^[a-z_]+(\{[^}]*\})? -?[0-9.e+]+$")
        self.assertEqual(len(re.findall(r"# TYPE bridge_connections ", text)), 1)


class StaffTests(unittest.SynchronousTestCase):
    def test_only_active_staff_sessions_may_scrape(self) -> None:
        from django.test import Client

        from bridge.metrics import staff_session
        from tests.support import make_user, reset_database

        reset_database()
        make_user("boss", "a-long-enough-password-1", is_staff=True)
        make_user("worker", "a-long-enough-password-1")
        for name, expected in (("boss", True), ("worker", False)):
            client = Client()
            client.login(username=name, password="a-long-enough-password-1")
            self.assertIs(staff_session(client.cookies["sessionid"].value), expected)
        self.assertFalse(staff_session("no-such-session"))
