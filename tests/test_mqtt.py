"""The MQTT upstream (bridge.mqtt): pure helpers without sockets, then the link
against a real Mosquitto: the shared one at 127.0.0.1:1883 (or
$BRIDGE_TEST_MQTT=host:port), and private ``mosquitto`` processes for restarts,
credentials and TLS."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import uuid
from typing import Any, cast

import paho.mqtt.client as paho
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from bridge.mqtt import (
    MAX_MESSAGE_BYTES,
    MAX_RETRY_DELAY,
    MalformedMessage,
    MqttLink,
    MqttStatus,
    check_prefix,
    command_topic,
    decode_status,
    device_from_topic,
    encode_command,
    status_subscription,
)
from bridge.upstream import IUpstream, IUpstreamListener, UpstreamCommand

from .nodered_support import (
    FakeListener,
    LogCapture,
    free_port,
    sleep,
    wait_until,
    write_tls_material,
)
from .support import require

SHARED = os.environ.get("BRIDGE_TEST_MQTT", "127.0.0.1:1883")
SHARED_HOST, _, _shared_port = SHARED.rpartition(":")
SHARED_PORT = int(_shared_port)
PASSWORD = "hunter2-mqtt-Password"


def fast_retry(attempt: int) -> float:
    return 0.05


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def unique_prefix() -> str:
    """A topic prefix of this test alone: parallel runs share the broker."""
    return f"test-{uuid.uuid4().hex[:12]}/bridge"


# ------------------------------------------------------------ pure helpers


class TopicTests(unittest.TestCase):
    def test_prefix(self) -> None:
        for good in ("bridge", "site-1/bridge", "a/b/c"):
            self.assertEqual(check_prefix(good), good)
        for bad in ("", "a/+", "#", "a/#", "/bridge", "bridge/", "a//b", "$SYS", "a\x00"):
            with self.assertRaises(ValueError, msg=bad):
                check_prefix(bad)

    def test_command_topic(self) -> None:
        self.assertEqual(command_topic("bridge", "dev_1-X"), "bridge/dev_1-X/command")
        self.assertEqual(command_topic("s/b", "d"), "s/b/d/command")
        for bad in ("", "a/b", "+", "#", "a\x00"):
            self.assertIsNone(command_topic("bridge", bad), bad)

    def test_status_topics(self) -> None:
        self.assertEqual(status_subscription("s/b"), "s/b/+/status")
        self.assertEqual(device_from_topic("bridge", "bridge/dev1/status"), "dev1")
        self.assertEqual(device_from_topic("s/b", "s/b/dev1/status"), "dev1")
        for topic in (
            "bridge/dev1/command",
            "bridge/status",
            "bridge//status",
            "bridge/a/b/status",
            "other/dev1/status",
            "bridgeX/dev1/status",
            "bridge/dev1/status/x",
        ):
            self.assertIsNone(device_from_topic("bridge", topic), topic)


class MessageTests(unittest.TestCase):
    def test_decode(self) -> None:
        self.assertEqual(
            decode_status(b'{"payload": {"on": true}, "command_id": "c1", "group_id": "x"}'),
            MqttStatus({"on": True}, "c1"),
        )
        self.assertEqual(decode_status(b'{"payload": null}'), MqttStatus(None, None))
        self.assertEqual(
            decode_status(b'{"payload": [1], "command_id": null}'), MqttStatus([1], None)
        )

    def test_malformed(self) -> None:
        cases: dict[str, bytes] = {
            "empty": b"",
            "not JSON": b"hello",
            "not UTF-8": b'{"payload": "\xff"}',
            "list": b'[{"payload": 1}]',
            "number": b"42",
            "no payload": b'{"command_id": "c"}',
            "numeric command_id": b'{"payload": 1, "command_id": 5}',
            "NaN": b'{"payload": NaN}',
            "deep": b"[" * 100_000 + b"]" * 100_000,
            "too large": b'{"payload": "' + b"x" * MAX_MESSAGE_BYTES + b'"}',
        }
        for name, data in cases.items():
            with self.assertRaises(MalformedMessage, msg=name) as ctx:
                decode_status(data)
            self.assertNotIn("hello", str(ctx.exception))

    def test_encode_command(self) -> None:
        command = UpstreamCommand("dev1", {"on": True}, "alice", "cmd-1", 1_700_000_000_123)
        self.assertEqual(
            json.loads(encode_command(command)),
            {
                "payload": {"on": True},
                "user": "alice",
                "command_id": "cmd-1",
                "ts": 1_700_000_000_123,
            },
        )
        with self.assertRaises(ValueError):
            encode_command(UpstreamCommand("d", float("nan"), None, "c", 1))


class ConfigTests(unittest.TestCase):
    def test_interface_description_health(self) -> None:
        link = MqttLink("mqtt://operator@broker.example:1884", password=PASSWORD)
        verifyObject(IUpstream, link)
        self.assertEqual(link.url, "mqtt://broker.example:1884")
        self.assertFalse(link.available)
        health = link.health()
        self.assertEqual(health["state"], "down")
        self.assertEqual(health["topic_prefix"], "bridge")
        for text in (repr(link), link.description, json.dumps(health)):
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn("operator", text)

    def test_default_ports(self) -> None:
        self.assertEqual(MqttLink("mqtt://b").url, "mqtt://b:1883")
        self.assertEqual(MqttLink("mqtts://b").url, "mqtts://b:8883")
        self.assertEqual(MqttLink("mqtt://[::1]").url, "mqtt://[::1]:1883")

    def test_refuses_bad_config(self) -> None:
        with self.assertRaises(ValueError) as ctx:
            MqttLink(f"mqtt://user:{PASSWORD}@b")
        self.assertNotIn(PASSWORD, str(ctx.exception))
        for url in ("ws://b", "tcp://b:1883", "mqtt://", "mqtt://b/topic", "mqtt://b?x=1"):
            with self.assertRaises(ValueError, msg=url):
                MqttLink(url)
        with self.assertRaises(ValueError):
            MqttLink("mqtt://b", password="pw")  # no user name to go with it
        with self.assertRaises(ValueError):
            MqttLink("mqtt://b", ca_file="/etc/ssl/certs/ca-certificates.crt")
        with self.assertRaises(ValueError):
            MqttLink("mqtts://b", client_key="/nonexistent")
        with self.assertRaises(ValueError):
            MqttLink("mqtt://b", topic_prefix="a/#")
        with self.assertRaises(OSError):
            MqttLink("mqtts://b", ca_file="/nonexistent/ca.pem")

    def test_backoff_grows_and_stays_under_cap(self) -> None:
        link = MqttLink("mqtt://b")
        delays = [link._retry_delay(n) for n in range(1, 40)]
        self.assertLess(delays[0], 2.0)
        self.assertTrue(all(0 < d <= MAX_RETRY_DELAY for d in delays))
        self.assertGreaterEqual(max(delays[10:]), MAX_RETRY_DELAY - 1.0)


# ---------------------------------------------------------- real brokers


class Probe:
    """A plain paho client on its own thread: the devices' side of the broker."""

    def __init__(self, test: unittest.TestCase, host: str, port: int) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:12]}"
        )
        self.client.on_message = lambda client, userdata, message: self.messages.append(message)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        test.addCleanup(self.close)

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        if not self._subscribed.wait(5):
            raise AssertionError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def payloads(self, topic: str) -> list[Any]:
        return [json.loads(m.payload) for m in list(self.messages) if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Mosquitto:
    """A private mosquitto on a port of its own; killable and restartable."""

    def __init__(
        self,
        test: unittest.TestCase,
        extra: list[str] | None = None,
        tls: dict[str, str] | None = None,
        require_cert: bool = False,
    ) -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
        )
        require(binary is not None, "the mosquitto broker binary is not installed")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "mosquitto.log")
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            # As root, mosquitto drops to user `mosquitto`, who can't read the test's files.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        if tls:
            lines += [
                f"cafile {tls['ca_crt']}",
                f"certfile {tls['server_crt']}",
                f"keyfile {tls['server_key']}",
                "tls_version tlsv1.2",
            ]
            if require_cert:
                lines.append("require_certificate true")
        lines += extra or ["allow_anonymous true"]
        self.config = os.path.join(self.dir, "mosquitto.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        test.addCleanup(self.kill)

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", self.config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                with (
                    open(self.log, errors="replace")
                    if os.path.exists(self.log)
                    else (open(os.devnull)) as f
                ):
                    raise AssertionError(f"mosquitto exited:\n{f.read()}")
            return reachable("127.0.0.1", self.port)

        await wait_until(listening, 10, f"mosquitto on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class LinkTestCase(unittest.TestCase):
    timeout = 30

    def start_link(self, url: str, **kwargs: Any) -> tuple[MqttLink, FakeListener]:
        kwargs.setdefault("retry_policy", fast_retry)
        kwargs.setdefault("connect_timeout", 3.0)
        link = MqttLink(url, **kwargs)
        listener = FakeListener()
        link.attach(cast(IUpstreamListener, listener))
        link.startService()
        self.addCleanup(link.stopService)
        return link, listener


class SharedBrokerTests(LinkTestCase):
    """Against the long-running broker; every test on topics of its own."""

    def setUp(self) -> None:
        require(reachable(SHARED_HOST, SHARED_PORT), f"no MQTT broker at {SHARED}")
        self.prefix = unique_prefix()

    async def connected(self, **kwargs: Any) -> tuple[MqttLink, FakeListener]:
        link, listener = self.start_link(
            f"mqtt://{SHARED_HOST}:{SHARED_PORT}", topic_prefix=self.prefix, **kwargs
        )
        await wait_until(lambda: listener.states, 10, "link up")
        return link, listener

    async def test_up_once(self) -> None:
        link, listener = await self.connected()
        self.assertEqual(listener.states, [True])
        self.assertTrue(link.available)
        health = link.health()
        self.assertEqual(health["state"], "up")
        self.assertIsNone(health["last_error"])
        self.assertEqual(health["counters"]["links_up"], 1)

    async def test_command_reaches_device_topic(self) -> None:
        probe = Probe(self, SHARED_HOST, SHARED_PORT)
        probe.subscribe(f"{self.prefix}/+/command")
        link, _ = await self.connected()
        command = UpstreamCommand("press-1", {"on": True}, "alice", "cmd-1", 1_700_000_000_123)
        self.assertTrue(link.send_command(command))
        topic = f"{self.prefix}/press-1/command"
        await wait_until(lambda: probe.payloads(topic), what="command at the device")
        self.assertEqual(
            probe.payloads(topic),
            [
                {
                    "payload": {"on": True},
                    "user": "alice",
                    "command_id": "cmd-1",
                    "ts": 1_700_000_000_123,
                }
            ],
        )
        self.assertEqual(probe.messages[0].qos, 1)
        self.assertEqual(link.counters["commands_out"], 1)
        # A device id that is not one topic level is refused, not published somewhere else.
        self.assertFalse(link.send_command(UpstreamCommand("a/b", 1, None, "c2", 1)))
        self.assertEqual(link.counters["commands_bad_device_id"], 1)

    async def test_statuses_reach_listener(self) -> None:
        probe = Probe(self, SHARED_HOST, SHARED_PORT)
        link, listener = await self.connected()
        probe.publish(
            f"{self.prefix}/press-1/status",
            json.dumps({"payload": {"on": True}, "command_id": "cmd-1"}),
        )
        probe.publish(
            f"{self.prefix}/sensor-2/status",
            json.dumps({"payload": {"t": 21.5}, "group_id": "ignored"}),
        )
        await wait_until(lambda: len(listener.statuses) == 2, what="two statuses")
        self.assertEqual(
            listener.statuses,
            [("press-1", {"on": True}, "cmd-1"), ("sensor-2", {"t": 21.5}, None)],
        )
        self.assertEqual(link.counters["statuses_in"], 2)

    async def test_retained_status_is_state_not_confirmation(self) -> None:
        probe = Probe(self, SHARED_HOST, SHARED_PORT)
        topic = f"{self.prefix}/lamp/status"
        probe.publish(
            topic, json.dumps({"payload": {"on": False}, "command_id": "old"}), retain=True
        )
        self.addCleanup(probe.publish, topic, b"", True)  # clear the retained message
        link, listener = await self.connected()
        await wait_until(lambda: listener.statuses, what="the retained status")
        self.assertEqual(listener.statuses, [("lamp", {"on": False}, None)])
        self.assertEqual(link.counters["retained_in"], 1)

    async def test_malformed_dropped_counted_and_log_rate_limited(self) -> None:
        probe = Probe(self, SHARED_HOST, SHARED_PORT)
        link, listener = await self.connected()
        logs = LogCapture(self)
        topic = f"{self.prefix}/d1/status"
        bad = [
            b"not json",
            b"[1]",
            b'{"command_id": "c"}',
            b'{"payload": 1, "command_id": 5}',
            b'{"payload": NaN}',
            b"\xff\xfe",
        ]
        for data in bad:
            probe.publish(topic, data)
        probe.publish(topic, b'{"payload": "ok"}')
        await wait_until(lambda: listener.statuses, what="the good status")
        self.assertEqual(listener.statuses, [("d1", "ok", None)])
        self.assertEqual(link.counters["malformed"], len(bad))
        self.assertEqual(len(logs.matching("malformed")), 1)
        self.assertTrue(link.available, "malformed messages do not take the link down")

    async def test_birth_and_last_will(self) -> None:
        probe = Probe(self, SHARED_HOST, SHARED_PORT)
        state = f"{self.prefix}/_bridge/state"
        probe.subscribe(state)
        self.addCleanup(probe.publish, state, b"", True)
        link, listener = await self.connected()
        await wait_until(lambda: probe.payloads(state), what="birth message")
        self.assertTrue(probe.payloads(state)[0]["online"])
        # Drop the connection without DISCONNECT: the broker publishes the will.
        client = link._client
        assert client is not None
        link._abort(client, "test: connection cut")
        await wait_until(lambda: len(probe.payloads(state)) >= 2, what="last will")
        self.assertFalse(probe.payloads(state)[1]["online"])
        await wait_until(lambda: listener.states == [True, False, True], what="redial")
        await wait_until(lambda: len(probe.payloads(state)) >= 3, what="second birth")
        self.assertTrue(probe.payloads(state)[2]["online"])

    async def test_stop_is_clean_and_says_offline(self) -> None:
        probe = Probe(self, SHARED_HOST, SHARED_PORT)
        state = f"{self.prefix}/_bridge/state"
        probe.subscribe(state)
        self.addCleanup(probe.publish, state, b"", True)
        link, listener = await self.connected()
        await wait_until(lambda: probe.payloads(state), what="birth message")
        await link.stopService()
        self.assertEqual(listener.states, [True, False])
        self.assertFalse(link.available)
        self.assertFalse(link.send_command(UpstreamCommand("d", 1, None, "c", 1)))
        await wait_until(lambda: len(probe.payloads(state)) >= 2, what="offline message")
        self.assertFalse(probe.payloads(state)[-1]["online"])
        self.assertIsNone(link.health()["last_error"])

    async def test_stop_while_dialling(self) -> None:
        link, listener = self.start_link(
            f"mqtt://{SHARED_HOST}:{SHARED_PORT}", topic_prefix=self.prefix
        )
        await link.stopService()
        await sleep(0.2)
        self.assertEqual(listener.states, [])
        self.assertFalse(link.available)


class UnreachableTests(LinkTestCase):
    async def test_closed_port(self) -> None:
        port = free_port()  # bound once and released: nothing listens there
        link, listener = self.start_link(f"mqtt://127.0.0.1:{port}")
        await wait_until(lambda: link.counters["dial_failures"] >= 2, what="failed dials")
        self.assertFalse(link.available)
        self.assertEqual(listener.states, [])
        self.assertFalse(link.send_command(UpstreamCommand("d", 1, "u", "c", 1)))
        health = link.health()
        self.assertEqual(health["state"], "down")
        self.assertIn(
            f"cannot reach the MQTT broker at mqtt://127.0.0.1:{port}", health["last_error"]
        )

    async def test_not_mqtt_at_all(self) -> None:
        """A listener that accepts and never answers: CONNACK times out, and we redial."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        self.addCleanup(server.close)
        port = server.getsockname()[1]
        link, listener = self.start_link(f"mqtt://127.0.0.1:{port}", connect_timeout=0.5)
        await wait_until(lambda: link.counters["handshake_failures"] >= 2, what="timeouts")
        self.assertEqual(listener.states, [])
        self.assertIn("did not answer CONNECT", link.health()["last_error"])


class PrivateBrokerTests(LinkTestCase):
    async def test_broker_gone_and_back(self) -> None:
        broker = Mosquitto(self)
        await broker.start()
        link, listener = self.start_link(f"mqtt://127.0.0.1:{broker.port}")
        await wait_until(lambda: listener.states == [True], 10, "link up")

        broker.kill()
        await wait_until(lambda: listener.states == [True, False], 10, "link down")
        self.assertFalse(link.available)
        self.assertFalse(link.send_command(UpstreamCommand("d", 1, "u", "c", 1)))
        self.assertIsNotNone(link.health()["last_error"])

        await sleep(0.3)  # a few failed dials while it is away
        self.assertGreaterEqual(link.counters["dial_failures"], 1)
        await broker.start()
        await wait_until(lambda: listener.states == [True, False, True], 10, "link back")
        self.assertTrue(link.available)

        probe = Probe(self, "127.0.0.1", broker.port)
        probe.subscribe("bridge/+/command")
        self.assertTrue(link.send_command(UpstreamCommand("d", 1, "u", "c", 1)))
        await wait_until(lambda: probe.payloads("bridge/d/command"), what="command after return")

    async def test_credentials(self) -> None:
        mosquitto_passwd = shutil.which("mosquitto_passwd")
        require(mosquitto_passwd is not None, "mosquitto_passwd is not installed")
        assert mosquitto_passwd is not None
        broker = Mosquitto(self, extra=["allow_anonymous false"])
        passwords = os.path.join(broker.dir, "passwords")
        subprocess.run(
            [mosquitto_passwd, "-b", "-c", passwords, "bridge", PASSWORD],
            check=True,
            capture_output=True,
        )
        with open(broker.config, "a") as f:
            f.write(f"password_file {passwords}\n")
        await broker.start()
        logs = LogCapture(self)

        good, good_listener = self.start_link(
            f"mqtt://bridge@127.0.0.1:{broker.port}", password=PASSWORD
        )
        await wait_until(lambda: good_listener.states == [True], 10, "link up")

        bad, bad_listener = self.start_link(
            f"mqtt://bridge@127.0.0.1:{broker.port}", password="wrong"
        )
        anonymous, anonymous_listener = self.start_link(f"mqtt://127.0.0.1:{broker.port}")
        await wait_until(
            lambda: (
                bad.counters["connects_refused"] >= 2
                and anonymous.counters["connects_refused"] >= 2
            ),
            10,
            "refused connects",
        )
        self.assertEqual(bad_listener.states, [])
        self.assertEqual(anonymous_listener.states, [])
        error = bad.health()["last_error"]
        self.assertIn("refused the connection", error)
        self.assertIn("password", error)
        for text in [
            logs.text(),
            json.dumps(good.health()),
            json.dumps(bad.health()),
            good.description,
            repr(good),
        ]:
            self.assertNotIn(PASSWORD, text)

    async def test_tls_with_ca_file_and_client_certificate(self) -> None:
        tls = write_tls_material(self.mktemp(), ip_addresses=["127.0.0.1"])
        broker = Mosquitto(self, tls=tls, require_cert=True)
        await broker.start()
        link, listener = self.start_link(
            f"mqtts://localhost:{broker.port}",
            ca_file=tls["ca_crt"],
            client_cert=tls["client_crt"],
            client_key=tls["client_key"],
        )
        await wait_until(lambda: listener.states == [True], 10, "TLS link up")
        self.assertEqual(link.url, f"mqtts://localhost:{broker.port}")

        no_cert, no_cert_listener = self.start_link(
            f"mqtts://localhost:{broker.port}", ca_file=tls["ca_crt"]
        )
        untrusted, untrusted_listener = self.start_link(
            f"mqtts://localhost:{broker.port}",
            ca_file=tls["other_ca_crt"],
            client_cert=tls["client_crt"],
            client_key=tls["client_key"],
        )
        await wait_until(
            lambda: no_cert.health()["last_error"] and untrusted.health()["last_error"],
            10,
            "TLS failures",
        )
        self.assertEqual(no_cert_listener.states, [])
        self.assertEqual(untrusted_listener.states, [])
        self.assertIn(
            "TLS certificate verification failed for localhost", untrusted.health()["last_error"]
        )

    async def test_tls_wrong_host_name(self) -> None:
        tls = write_tls_material(self.mktemp(), dns_names=["broker.invalid"])
        broker = Mosquitto(self, tls=tls)
        await broker.start()
        link, listener = self.start_link(f"mqtts://localhost:{broker.port}", ca_file=tls["ca_crt"])
        await wait_until(lambda: link.health()["last_error"], 10, "TLS failure")
        self.assertEqual(listener.states, [])
        self.assertIn("TLS certificate verification failed", link.health()["last_error"])
        self.assertIn("localhost", link.health()["last_error"])
