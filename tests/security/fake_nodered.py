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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest

LINK_PATH = "/ws/bridge"


class Recorder:
    def __init__(self, path: str, secret: str | None) -> None:
        self.path = path
        self.secret = secret

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class Link(WebSocketServerProtocol):
    recorder: Recorder

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path.rstrip("/") != LINK_PATH:
            raise ConnectionDeny(404, "no link here")
        header = request.headers.get("authorization", "")
        self.recorder.write(
            {"handshake": True, "authorization_sha256": hashlib.sha256(header.encode()).hexdigest()}
        )
        if self.recorder.secret is not None and header != f"Bearer {self.recorder.secret}":
            raise ConnectionDeny(401, "link secret required")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            self.recorder.write({"raw": payload.decode("utf-8", "replace")})
            return
        self.recorder.write({"message": message})
        if isinstance(message, dict) and isinstance(message.get("group_id"), str):
            status: dict[str, Any] = {
                "group_id": message["group_id"],
                "payload": message.get("payload"),
            }
            if message.get("command_id") is not None:
                status["command_id"] = message["command_id"]
            self.sendMessage(json.dumps(status).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True)
    parser.add_argument("--secret-file")
    args = parser.parse_args(argv)
    secret = None
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            secret = f.read().strip()

    from twisted.internet import reactor

    factory = WebSocketServerFactory(f"ws://127.0.0.1{LINK_PATH}")

    class BoundLink(Link):
        recorder = Recorder(args.log, secret)

    factory.protocol = BoundLink
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    sys.stdout.write(json.dumps({"port": port.getHost().port}) + "\n")  # type: ignore[attr-defined]
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
