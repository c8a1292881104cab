"""A recording stand-in for Node-RED's ``websocket in`` node, run as a subprocess.

The security tests need to prove that *nothing* of a refused request reaches
Node-RED, so this stand-in writes every message it receives on the link to a
JSON-lines file, and every handshake's ``Authorization`` header (hashed, so
the secret itself is never written) to the same file. It answers each command
with a status that echoes ``group_id``, ``payload`` and ``command_id``, like
the example flow does, so permitted commands end ``confirmed``.

    python tests/security/fake_nodered.py --log FILE [--secret-file FILE]

It prints ``{"port": N}`` on stdout once listening on ``127.0.0.1`` at
``/ws/bridge``; with ``--secret-file`` a handshake without
``Authorization: Bearer <secret>`` is refused with HTTP 401.

With ``--control`` a test steers it. A command's payload may say how the
"flow" answers: ``{"_reply": "silent"}`` not at all, ``"no_command_id"``
without ``command_id``. JSON lines on stdin act on the link:

- ``{"send": OBJ}`` sends OBJ to the bridge; ``{"send_text": STR}`` raw text;
- ``{"burst": {"group_id", "count", "pad"}}`` sends ``count`` statuses
  ``{"i": n, "pad": "x..."}`` at once;
- ``{"drop": true}`` cuts the link and refuses handshakes (503) until
  ``{"accept": true}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.protocols.basic import LineReceiver

LINK_PATH = "/ws/bridge"


class Recorder:
    def __init__(self, path: str, secret: str | None, control: bool = False) -> None:
        self.path = path
        self.secret = secret
        self.control = control
        self.refusing = False
        self.links: set[Link] = set()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class Link(WebSocketServerProtocol):
    recorder: Recorder

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path.rstrip("/") != LINK_PATH:
            raise ConnectionDeny(404, "no link here")
        if self.recorder.refusing:
            raise ConnectionDeny(503, "told to refuse")
        header = request.headers.get("authorization", "")
        self.recorder.write(
            {"handshake": True, "authorization_sha256": hashlib.sha256(header.encode()).hexdigest()}
        )
        if self.recorder.secret is not None and header != f"Bearer {self.recorder.secret}":
            raise ConnectionDeny(401, "link secret required")

    def onOpen(self) -> None:
        self.recorder.links.add(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.recorder.links.discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            self.recorder.write({"raw": payload.decode("utf-8", "replace")})
            return
        self.recorder.write({"message": message})
        if isinstance(message, dict) and isinstance(message.get("group_id"), str):
            payload = message.get("payload")
            reply = (
                payload.get("_reply")
                if self.recorder.control and isinstance(payload, dict)
                else None
            )
            if reply == "silent":
                return
            status: dict[str, Any] = {"group_id": message["group_id"], "payload": payload}
            if message.get("command_id") is not None and reply != "no_command_id":
                status["command_id"] = message["command_id"]
            self.sendMessage(json.dumps(status).encode())


class Control(LineReceiver):
    """Test commands, one JSON object per line on stdin (``--control``)."""

    delimiter = b"\n"

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        command = json.loads(line)
        links = list(self.recorder.links)
        if "send" in command:
            for link in links:
                link.sendMessage(json.dumps(command["send"]).encode())
        if "send_text" in command:
            for link in links:
                link.sendMessage(command["send_text"].encode())
        if "burst" in command:  # {"group_id", "count", "pad"}: statuses {"i": n, "pad": "x..."}
            burst = command["burst"]
            pad = "x" * int(burst.get("pad", 0))
            for link in links:
                for i in range(int(burst["count"])):
                    status = {"group_id": burst["group_id"], "payload": {"i": i, "pad": pad}}
                    link.sendMessage(json.dumps(status).encode())
        if command.get("drop"):
            self.recorder.refusing = True
            for link in links:
                link.dropConnection(abort=True)
        if command.get("accept"):
            self.recorder.refusing = False
        self.recorder.write({"control": command, "links": len(links)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True)
    parser.add_argument("--secret-file")
    parser.add_argument("--control", action="store_true", help="take commands on stdin")
    args = parser.parse_args(argv)
    secret = None
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            secret = f.read().strip()

    from twisted.internet import reactor

    factory = WebSocketServerFactory(f"ws://127.0.0.1{LINK_PATH}")

    recorder = Recorder(args.log, secret, args.control)

    class BoundLink(Link):
        pass

    BoundLink.recorder = recorder
    factory.protocol = BoundLink
    if args.control:
        from twisted.internet.stdio import StandardIO

        StandardIO(Control(recorder))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    sys.stdout.write(json.dumps({"port": port.getHost().port}) + "\n")  # type: ignore[attr-defined]
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
