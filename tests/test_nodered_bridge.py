"""The whole chain against a real Node-RED: browser client -> twistd bridge -> flow -> back.

Node-RED runs the example flow (with a console debug node added so the test
can see what the flow received); the bridge is a real ``twistd bridge --tls``
process dialling it with a link secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from twisted.trial import unittest

from tests.nodered_support import NodeRed, find_node_red
from tests.server import BridgeProcess, admin_sync
from tests.wsclient import connect

SECRET = "bridge-link-secret-for-tests"
PASSWORD = "correct-horse-battery-42"


class WatchedNodeRed(NodeRed):
    """The example flow plus a debug node that prints every command it receives."""

    def _write_settings(self) -> None:
        super()._write_settings()
        flows_path = os.path.join(self.user_dir, "flows.json")
        with open(flows_path) as f:
            flows = json.load(f)
        flows.append(
            {
                "id": "test-debug",
                "type": "debug",
                "z": "bridge-demo-tab",
                "name": "commands seen",
                "active": True,
                "tosidebar": False,
                "console": True,
                "tostatus": False,
                "complete": "true",
                "targetType": "full",
                "x": 400,
                "y": 300,
                "wires": [],
            }
        )
        for node in flows:
            if node.get("id") == "bridge-ws-in":
                node["wires"][0].append("test-debug")
        with open(flows_path, "w") as f:
            json.dump(flows, f)
        with open(self.settings) as f:
            js = f.read()
        with open(self.settings, "w") as f:
            f.write(js.replace('level: "warn"', 'level: "info"'))


class NodeRedBridgeTests(unittest.TestCase):
    timeout = 120

    async def start(self) -> tuple[NodeRed, BridgeProcess]:
        executable = find_node_red(self)
        nr = WatchedNodeRed(self, executable, secret=SECRET)
        await nr.start()
        bridge = BridgeProcess(args=["--nodered", nr.url, "--nodered-secret-file", self.secret()])
        self.addCleanup(bridge.stop)
        d = bridge.data_dir
        for args, stdin in (
            (["migrate", "-v", "0"], None),
            (["adduser", "op", "--password-stdin"], PASSWORD),
            (["adddevice", "Demo toggle", "--kind", "toggle", "--id", "demo-toggle"], None),
            (["adddevice", "Demo sensor", "--kind", "sensor", "--id", "demo-sensor"], None),
            (["grant", "--user", "op", "demo-toggle", "change"], None),
            (["grant", "--user", "op", "demo-sensor", "read"], None),
        ):
            out, err, code = admin_sync(d, *args, stdin=stdin)
            self.assertEqual(code, 0, err)
        await bridge.start()
        return nr, bridge

    def secret(self) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(SECRET + "\n")
        os.chmod(path, 0o600)
        return path

    async def operator(self, bridge: BridgeProcess) -> Any:
        url = bridge.url.replace("https", "wss", 1) + "ws/"
        c = await connect(url, ca_pem=bridge.ca_pem)
        self.addCleanup(lambda: c.proto.dropConnection(abort=True))
        await c.next()
        out, err, code = admin_sync(bridge.data_dir, "token", "op")
        c.send({"op": 3, "d": {"token": out}})
        ready = await c.event("READY")
        c.send({"op": 7, "d": {"devices": ["demo-toggle", "demo-sensor"], "history": False}})
        await c.event("SUBSCRIBED")
        await c.event("SUBSCRIBED")
        return c, ready

    async def wait_online(self, c: Any, ready: Any) -> None:
        online = {d["id"]: d["online"] for d in ready["d"]["devices"]}
        while not online.get("demo-toggle"):
            frame = await c.event("DEVICE_STATE", timeout=15)
            online[frame["d"]["device"]] = frame["d"]["online"]

    async def test_command_confirmed_sensor_streams_and_link_loss(self) -> None:
        nr, bridge = await self.start()
        c, ready = await self.operator(bridge)
        await self.wait_online(c, ready)

        c.send({"op": 4, "d": {"device": "demo-toggle", "payload": {"on": True}, "id": "t1"}})
        frames = await c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent", timeout=10
        )
        result = frames[-1]["d"]
        self.assertEqual(result["result"], "confirmed")
        [status] = [f["d"] for f in frames if f["op"] == 5 and f["d"]["device"] == "demo-toggle"]
        self.assertEqual(
            (status["payload"], status["by"], status["command_id"]),
            ({"on": True}, "op", result["command_id"]),
        )
        # What Node-RED received carried the acting user and the command id.
        # The debug node prints the message as a multi-line object.
        lines = nr.output.splitlines()
        at = [i for i, line in enumerate(lines) if result["command_id"] in line]
        self.assertTrue(at, nr.output[-2000:])
        seen = " ".join(lines[max(0, at[0] - 8) : at[0] + 8])
        self.assertRegex(seen, r"""user['"]?:\s*['"]op['"]""")
        self.assertRegex(seen, r"""group_id['"]?:\s*['"]demo-toggle['"]""")

        # The example sensor reports every second; its statuses reach the viewer.
        sensor = await c.until(
            lambda f: f["op"] == 5 and f["d"]["device"] == "demo-sensor", timeout=5
        )
        self.assertIn("temperature", sensor[-1]["d"]["payload"])

        # Node-RED killed: devices go offline within the ping bound, and a
        # command ends at once with upstream_unavailable.
        killed_at = time.monotonic()
        await nr.kill()
        offline = await c.until(
            lambda f: f.get("t") == "DEVICE_STATE" and f["d"]["device"] == "demo-toggle",
            timeout=10,
        )
        self.assertFalse(offline[-1]["d"]["online"])
        self.assertLess(time.monotonic() - killed_at, 8.0)
        c.send({"op": 4, "d": {"device": "demo-toggle", "payload": {"on": False}, "id": "t2"}})
        sent_at = time.monotonic()
        frames = await c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent", timeout=5
        )
        self.assertEqual(frames[-1]["d"]["result"], "upstream_unavailable")
        self.assertLess(time.monotonic() - sent_at, 1.0)

        # Node-RED back on the same port: the link and the devices come back
        # without restarting the bridge.
        await nr.start()
        online = await c.until(
            lambda f: (
                f.get("t") == "DEVICE_STATE"
                and f["d"]["device"] == "demo-toggle"
                and f["d"]["online"]
            ),
            timeout=45,
        )
        self.assertTrue(online[-1]["d"]["online"])
        c.send({"op": 4, "d": {"device": "demo-toggle", "payload": {"on": False}, "id": "t3"}})
        frames = await c.until(
            lambda f: f.get("t") == "COMMAND_RESULT" and f["d"]["result"] != "sent", timeout=10
        )
        self.assertEqual(frames[-1]["d"]["result"], "confirmed")
        health = json.loads(
            subprocess.run(
                [
                    "curl",
                    "-s",
                    "--cacert",
                    str(bridge.data_dir / "tls" / "cert.pem"),
                    bridge.url.replace("127.0.0.1", "localhost") + "healthz",
                ],
                capture_output=True,
                text=True,
            ).stdout
        )
        self.assertEqual(health["upstream"]["state"], "up")
        self.assertNotIn(SECRET, bridge.log_text())
