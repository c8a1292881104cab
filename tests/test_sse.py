"""Server-Sent Events at /events/, driven by real curl against a real bridge."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bridge.sse import event_text
from tests.support import require
from tests.test_e2e import E2ETestCase


class EventTextTests(unittest.SynchronousTestCase):
    def test_id_is_the_sequence_number(self) -> None:
        self.assertEqual(
            event_text(b'{"op":5,"d":{"x":1},"s":12}'),
            b'id: 12\ndata: {"op":5,"d":{"x":1},"s":12}\n\n',
        )
        self.assertEqual(event_text(b'{"op":2}'), b'data: {"op":2}\n\n')


class Curl:
    """curl -N streaming an SSE response into a file we poll."""

    def __init__(self, args: list[str], out: str) -> None:
        self.out = out
        self.file = open(out, "wb")
        self.proc = subprocess.Popen(
            ["curl", "-sS", "-N", *args], stdout=self.file, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        with open(self.out, "rb") as f:
            return f.read().decode(errors="replace")

    def events(self) -> list[tuple[int | None, dict[str, Any]]]:
        found = []
        for block in self.text().split("\n\n"):
            lines = block.split("\n")
            data = [line[6:] for line in lines if line.startswith("data: ")]
            ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
            if data:
                found.append((ids[0] if ids else None, json.loads(data[0])))
        return found

    @defer.inlineCallbacks
    def wait_for(self, predicate: Any, timeout: float = 8.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return self.events()
            if self.proc.poll() is not None:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"curl output did not match: {self.text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.file.close()


class SSETests(E2ETestCase):
    def curl(self, path: str, *headers: str) -> Curl:
        require(
            subprocess.run(["which", "curl"], capture_output=True).returncode == 0,
            "curl is not installed",
        )
        url = self.server.url.replace("127.0.0.1", "localhost") + path
        args = ["--cacert", str(self.server.data_dir / "tls" / "cert.pem")]
        for h in headers:
            args += ["-H", h]
        c = Curl([*args, url], self.mktemp())
        self.addCleanup(c.stop)
        return c

    def http_status(self, path: str, *headers: str) -> int:
        url = self.server.url.replace("127.0.0.1", "localhost") + path
        args = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            str(self.server.data_dir / "tls" / "cert.pem"),
        ]
        for h in headers:
            args += ["-H", h]
        return int(subprocess.run([*args, url], capture_output=True, text=True).stdout)

    @defer.inlineCallbacks
    def test_stream_with_bearer_token(self) -> Any:
        sensor = self.world.ids["sensor"]
        token = self.world.token("member")
        c = self.curl(f"events/?devices={sensor}", f"Authorization: Bearer {token}")
        events = yield c.wait_for(lambda ev: len([e for e in ev if e[1]["op"] == 5]) >= 2)
        kinds = [(e[1]["op"], e[1].get("t")) for e in events]
        self.assertEqual(kinds[:2], [(6, "READY"), (6, "SUBSCRIBED")])
        self.assertEqual([e[0] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual([e[0] for e in events], [e[1]["s"] for e in events])
        status = next(e[1]["d"] for e in events if e[1]["op"] == 5)
        self.assertEqual(status["device"], sensor)
        self.assertNotIn(token, self.server.log_text())

    @defer.inlineCallbacks
    def test_last_event_id_resumes_without_gaps(self) -> Any:
        sensor = self.world.ids["sensor"]
        auth = f"Authorization: Bearer {self.world.token('member')}"
        first = self.curl(f"events/?devices={sensor}", auth)
        events = yield first.wait_for(lambda ev: any(e[1]["op"] == 5 for e in ev))
        last = events[-1][0]
        first.stop()
        yield task.deferLater(reactor, 2.2, lambda: None)  # statuses arrive meanwhile
        second = self.curl(f"events/?devices={sensor}", auth, f"Last-Event-ID: {last}")
        resumed = yield second.wait_for(lambda ev: any(e[1].get("t") == "RESUMED" for e in ev))
        ids = [e[0] for e in resumed]
        self.assertEqual(ids, list(range(last + 1, last + 1 + len(ids))))
        self.assertGreaterEqual(len([e for e in resumed if e[1]["op"] == 5]), 1)

    def test_refusals(self) -> None:
        sensor, secret = self.world.ids["sensor"], self.world.ids["secret"]
        token = self.world.token("member")
        self.assertEqual(self.http_status(f"events/?devices={sensor}"), 401)
        self.assertEqual(
            self.http_status(f"events/?devices={sensor}", "Authorization: Bearer forged"), 401
        )
        self.assertEqual(
            self.http_status(f"events/?devices={secret}", f"Authorization: Bearer {token}"), 403
        )
        self.assertEqual(
            self.http_status("events/?devices=", f"Authorization: Bearer {token}"), 400
        )
