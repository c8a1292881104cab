"""The Node-RED link against a real Node-RED 4 running the example flow and a
settings.js built from the example one (examples/nodered/).

Needs node-red (``.ci/install-nodered``, or ``BRIDGE_NODERED_BIN``): skipped
without it, but failed when ``CI=true``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from twisted.trial import unittest

from bridge.nodered import NodeRedLink
from bridge.upstream import IUpstreamListener, UpstreamCommand

from .nodered_support import (
    FakeListener,
    LogCapture,
    NodeRed,
    find_node_red,
    wait_until,
    write_tls_material,
)

SECRET = "real-node-red-link-secret-42"


def quick_retry(attempt: int) -> float:
    return 0.2


def command(device: str, payload: Any, user: str = "alice") -> UpstreamCommand:
    return UpstreamCommand(device, payload, user, str(uuid.uuid4()), int(time.time() * 1000))


class RealNodeRedTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.node_red = find_node_red(self)

    def start_link(self, url: str, **kwargs: Any) -> tuple[NodeRedLink, FakeListener]:
        kwargs.setdefault("retry_policy", quick_retry)
        kwargs.setdefault("handshake_timeout", 3.0)
        link = NodeRedLink(url, **kwargs)
        listener = FakeListener()
        link.attach(cast(IUpstreamListener, listener))
        link.startService()
        self.addCleanup(link.stopService)
        return link, listener

    async def roundtrip(
        self, link: NodeRedLink, listener: FakeListener, cmd: UpstreamCommand, expect: Any
    ) -> None:
        self.assertTrue(link.send_command(cmd))
        await wait_until(
            lambda: (cmd.device_id, expect, cmd.command_id) in listener.statuses,
            timeout=5,
            what=f"Node-RED's answer to {cmd.device_id} {cmd.payload}",
        )

    async def test_commands_and_statuses_through_the_example_flow(self) -> None:
        nr = NodeRed(self, self.node_red, secret=SECRET)
        await nr.start()
        link, listener = self.start_link(nr.url, secret=SECRET)
        await wait_until(lambda: listener.states == [True], timeout=15, what="link up")

        # The flow greets a new client with the current state of its devices.
        await wait_until(
            lambda: listener.statuses_for("demo-toggle") and listener.statuses_for("demo-dimmer"),
            what="current states on connect",
        )
        self.assertEqual(
            listener.statuses_for("demo-toggle")[0], ("demo-toggle", {"on": False}, None)
        )

        await self.roundtrip(link, listener, command("demo-toggle", {"on": True}), {"on": True})
        await self.roundtrip(link, listener, command("demo-toggle", {"on": False}), {"on": False})
        await self.roundtrip(link, listener, command("demo-dimmer", {"level": 40}), {"level": 40})
        # The device says what it really did: clamped to 100.
        await self.roundtrip(link, listener, command("demo-dimmer", {"level": 250}), {"level": 100})

        # The sensor reports every second to every client, without command_id.
        def readings() -> list[Any]:
            return [p for (_, p, c) in listener.statuses_for("demo-sensor") if c is None]

        await wait_until(lambda: len(readings()) >= 3, timeout=5, what="three sensor readings")
        for payload in readings():
            self.assertIsInstance(payload["temperature"], float | int)
        self.assertEqual(link.counters["malformed"], 0)
        self.assertEqual(link.counters["commands_out"], 4)

    async def test_link_secret(self) -> None:
        nr = NodeRed(self, self.node_red, secret=SECRET)
        await nr.start()
        logs = LogCapture(self)
        good, good_listener = self.start_link(nr.url, secret=SECRET)
        wrong, wrong_listener = self.start_link(nr.url, secret="not-the-" + SECRET)
        missing, missing_listener = self.start_link(nr.url)
        await wait_until(lambda: good_listener.states == [True], timeout=15, what="good link up")
        await wait_until(
            lambda: (
                wrong.counters["handshake_failures"] >= 2
                and missing.counters["handshake_failures"] >= 2
            ),
            timeout=10,
            what="refused handshakes, retried",
        )
        self.assertEqual(wrong_listener.states, [])
        self.assertEqual(missing_listener.states, [])
        self.assertFalse(wrong.available or missing.available)
        self.assertFalse(wrong.send_command(command("demo-toggle", {"on": True})))
        # settings.js answers 403 to a wrong secret and 401 to none.
        self.assertTrue(
            logs.matching("Node-RED refused the link handshake: HTTP 403", "link secret is wrong"),
            logs.text(),
        )
        self.assertTrue(
            logs.matching("Node-RED refused the link handshake: HTTP 401", "sends no link secret"),
            logs.text(),
        )
        self.assertIn("HTTP 403", wrong.health()["last_error"])
        self.assertNotIn(SECRET, logs.text())
        await self.roundtrip(
            good, good_listener, command("demo-toggle", {"on": True}), {"on": True}
        )

    async def test_frozen_killed_and_restarted(self) -> None:
        nr = NodeRed(self, self.node_red, secret=SECRET)
        await nr.start()
        link, listener = self.start_link(
            nr.url, secret=SECRET, ping_interval=1.0, ping_timeout=1.0, handshake_timeout=2.0
        )
        await wait_until(lambda: listener.states == [True], timeout=15, what="link up")

        # Frozen Node-RED: the TCP connection stays up, only the pings notice.
        nr.signal("STOP")
        took = await wait_until(lambda: listener.states == [True, False], timeout=6, what="down")
        self.assertLess(took, 3.0)
        self.assertFalse(link.send_command(command("demo-toggle", {"on": True})))
        nr.signal("CONT")
        await wait_until(lambda: listener.states == [True, False, True], timeout=15, what="back")

        # Killed Node-RED: down at once, commands refused at once, no second "down".
        await nr.kill()
        took = await wait_until(lambda: listener.states[-1] is False, timeout=5, what="down")
        self.assertLess(took, 3.0)
        self.assertFalse(link.send_command(command("demo-toggle", {"on": True})))
        self.assertEqual(listener.states, [True, False, True, False])

        # Node-RED back on the same port: the link comes back by itself.
        await nr.start()
        await wait_until(lambda: listener.states[-1] is True, timeout=20, what="link back")
        self.assertEqual(listener.states, [True, False, True, False, True])
        await self.roundtrip(link, listener, command("demo-dimmer", {"level": 7}), {"level": 7})

    async def test_wss(self) -> None:
        # The server certificate names only "localhost": dialling 127.0.0.1
        # reaches the same Node-RED under a name the certificate does not cover.
        pki = write_tls_material(self.mktemp(), dns_names=["localhost"])
        nr = NodeRed(self, self.node_red, secret=SECRET, tls=pki, mutual_tls=True)
        await nr.start()
        logs = LogCapture(self)
        client = {"client_cert": pki["client_crt"], "client_key": pki["client_key"]}
        good, good_listener = self.start_link(
            nr.url_for("localhost"), secret=SECRET, ca_file=pki["ca_crt"], **client
        )
        bad_ca, bad_ca_listener = self.start_link(
            nr.url_for("localhost"), secret=SECRET, ca_file=pki["other_ca_crt"], **client
        )
        bad_host, bad_host_listener = self.start_link(
            nr.url_for("127.0.0.1"), secret=SECRET, ca_file=pki["ca_crt"], **client
        )
        no_cert, no_cert_listener = self.start_link(
            nr.url_for("localhost"), secret=SECRET, ca_file=pki["ca_crt"]
        )
        await wait_until(lambda: good_listener.states == [True], timeout=15, what="wss link up")
        await self.roundtrip(
            good, good_listener, command("demo-toggle", {"on": True}), {"on": True}
        )

        refused = (bad_ca, bad_host, no_cert)
        await wait_until(
            lambda: all(link.counters["handshake_failures"] >= 2 for link in refused),
            timeout=10,
            what="TLS refusals, retried",
        )
        for listener in (bad_ca_listener, bad_host_listener, no_cert_listener):
            self.assertEqual(listener.states, [])
        self.assertTrue(
            logs.matching("TLS certificate verification failed for localhost"), logs.text()
        )
        self.assertTrue(
            logs.matching("TLS host name verification failed for 127.0.0.1"), logs.text()
        )
        # Node-RED requires a client certificate (mutual TLS) and rejects the link without one.
        self.assertIn("TLS handshake with localhost failed", no_cert.health()["last_error"])
