"""The bridge restarted under load: every client RESUMEs and misses nothing.

A real ``twistd bridge`` dials a stand-in Node-RED (``bench/upstream_standin.py``,
in this test's reactor) that streams statuses over ten devices; twenty viewers
watch three devices each. The bridge gets SIGTERM mid-stream and is started
again; each viewer reconnects and RESUMEs. Every status the devices' history
holds, from each viewer's first to its last, must have reached that viewer
exactly once, and each viewer's ``s`` must run without a gap or a repeat
across both connections (spec §3, RESUME; §6, 1001).
"""

from __future__ import annotations

import random
import signal
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bench.upstream_standin import LINK_PATH, Standin
from tests.server import BridgeProcess, admin, admin_sync, kill_on_exit
from tests.wsclient import connect

DEVICES = 10
VIEWERS = 20
RATE = 200.0  # statuses/s over all devices


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class Viewer:
    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self.frames: list[dict[str, Any]] = []
        self.client: Any = None
        self.session_id = ""

    def drain(self) -> None:
        queue = self.client.factory.frames
        while queue.pending:
            self.frames.append(queue.pending.pop(0))

    def statuses(self, device: str) -> list[int]:
        return [
            f["d"]["payload"]["seq"]
            for f in self.frames
            if f["op"] == 5 and f["d"]["device"] == device
        ]


class RestartUnderLoadTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_clients_resume_after_a_restart_and_miss_nothing_history_holds(self) -> Any:
        server = BridgeProcess(tls=False)
        kill_on_exit(server)
        self.addCleanup(server.stop, signal.SIGKILL)
        data = server.data_dir
        admin_sync(data, "migrate")
        admin_sync(data, "adduser", "viewer", "--password-stdin", stdin="pw-restart-1234")
        ids = []
        for i in range(DEVICES):
            out, err, code = admin_sync(
                data, "adddevice", f"d{i}", "--kind", "sensor", "--history", "1000"
            )
            assert code == 0, err
            ids.append(out)
            admin_sync(data, "grant", "--user", "viewer", out, "read")
        standin = Standin(ids, rate=RATE, size=100)
        port = standin.listen(0)
        self.addCleanup(standin.close)
        server.args = ["--nodered", f"ws://127.0.0.1:{port}{LINK_PATH}"]
        yield server.start()
        while not standin.links:
            yield sleep(0.05)
        standin.start()

        rng = random.Random(7)
        viewers = [Viewer(rng.sample(ids, 3)) for _ in range(VIEWERS)]
        ws = server.ws_url
        # One token serves them all: it is valid, and reusable, for a minute.
        token = yield self.token(data)
        for v in viewers:
            v.client = yield connect(ws)
            hello = yield v.client.next()
            v.session_id = hello["d"]["session_id"]
            v.client.send({"op": 3, "d": {"token": token}})
            ready = yield v.client.event("READY")
            v.frames.append(ready)
            v.client.send({"op": 7, "d": {"devices": v.devices, "history": False}})
        yield sleep(1.5)

        # SIGTERM mid-stream, without blocking this reactor (the stream goes on).
        stopped = server.stop_async()
        for v in viewers:
            code, _ = yield v.client.closed(15)
            self.assertEqual(code, 1001)
        yield stopped
        for v in viewers:
            v.drain()
        yield server.start()
        ws = server.ws_url  # --port 0: a new port

        token = yield self.token(data)
        for v in viewers:
            last = max(f["s"] for f in v.frames if "s" in f)
            v.client = yield connect(ws)
            yield v.client.next()
            v.client.send({"op": 9, "d": {"session_id": v.session_id, "seq": last, "token": token}})
        for v in viewers:
            frames = yield v.client.until(
                lambda f: f.get("t") in ("RESUMED", "INVALID_SESSION"), timeout=15
            )
            v.frames.extend(frames)
            self.assertEqual(frames[-1]["t"], "RESUMED", frames[-3:])
            self.assertNotIn("recovered", frames[-1]["d"])
        yield sleep(1.5)
        standin.stop()
        yield sleep(0.5)
        for v in viewers:
            v.drain()
            v.client.proto.dropConnection(abort=True)

        # What history holds now, through a fresh viewer.
        check = yield connect(ws)
        self.addCleanup(lambda: check.proto.dropConnection(abort=True))
        yield check.next()
        check.send({"op": 3, "d": {"token": token}})
        yield check.event("READY")
        check.send({"op": 7, "d": {"devices": ids, "history": True}})
        held: dict[str, list[int]] = {}
        for _ in ids:
            sub = yield check.event("SUBSCRIBED")
            held[sub["d"]["device"]] = [h["payload"]["seq"] for h in sub["d"]["history"]]

        replayed = 0
        for v in viewers:
            numbers = [f["s"] for f in v.frames if "s" in f]
            self.assertEqual(numbers, list(range(1, len(numbers) + 1)), "s: no gap, no repeat")
            for device in v.devices:
                got = v.statuses(device)
                self.assertEqual(got, sorted(set(got)), "in order, exactly once")
                self.assertTrue(got, "statuses reached the viewer")
                wanted = [n for n in held[device] if got[0] <= n <= got[-1]]
                self.assertEqual(got, wanted, "every status history holds, none other")
            resumed = next(f for f in v.frames if f.get("t") == "RESUMED")
            replayed += resumed["d"]["replayed"]
        self.assertGreater(replayed, 0, "statuses arrived while the clients were away")

    @defer.inlineCallbacks
    def token(self, data: Any) -> Any:
        out, err, code = yield admin(data, "token", "viewer")
        self.assertEqual(code, 0, err)
        return out
