"""A small protocol v1 client for tests, on Autobahn, with Deferred-based reads."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet import defer, reactor, ssl
from twisted.internet.defer import Deferred, DeferredQueue


class TestClientProtocol(WebSocketClientProtocol):
    factory: TestClientFactory

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.frames.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        self.factory.closed.callback((code, reason))


class TestClientFactory(WebSocketClientFactory):
    protocol = TestClientProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: Deferred[TestClientProtocol] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.frames: DeferredQueue[dict[str, Any]] = DeferredQueue()


class Client:
    def __init__(self, factory: TestClientFactory, proto: TestClientProtocol) -> None:
        self.factory = factory
        self.proto = proto
        self.last_s = 0

    def send(self, frame: Any) -> None:
        data = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        self.proto.sendMessage(data)

    def next(self, timeout: float = 5.0) -> Deferred[dict[str, Any]]:
        d = self.factory.frames.get()
        timer = reactor.callLater(timeout, d.cancel)  # type: ignore[attr-defined]

        def got(frame: dict[str, Any]) -> dict[str, Any]:
            if timer.active():
                timer.cancel()
            if "s" in frame:
                self.last_s = frame["s"]
            return frame

        return d.addCallback(got)

    @defer.inlineCallbacks
    def until(self, predicate: Any, timeout: float = 5.0) -> Any:
        """Frames up to and including the first that matches."""
        seen = []
        while True:
            frame = yield self.next(timeout)
            seen.append(frame)
            if predicate(frame):
                return seen

    @defer.inlineCallbacks
    def event(self, name: str, timeout: float = 5.0) -> Any:
        frames = yield self.until(lambda f: f.get("op") == 6 and f.get("t") == name, timeout)
        return frames[-1]

    def closed(self, timeout: float = 5.0) -> Deferred[tuple[int | None, str | None]]:
        d: Deferred[tuple[int | None, str | None]] = Deferred()
        timer = reactor.callLater(timeout, d.cancel)  # type: ignore[attr-defined]

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
                d.callback(result)
            return result

        self.factory.closed.addBoth(done)
        return d

    def close(self) -> None:
        self.proto.sendClose(1000)


@defer.inlineCallbacks
def connect(
    url: str,
    headers: dict[str, str] | None = None,
    ca_pem: bytes | None = None,
    origin: str | None = None,
) -> Any:
    factory = TestClientFactory(url, headers=headers or {}, origin=origin)
    context = None
    if url.startswith("wss://"):
        trust = ssl.Certificate.loadPEM(ca_pem) if ca_pem else None
        context = ssl.optionsForClientTLS("localhost", trustRoot=trust)
    connectWS(factory, context)
    proto = yield factory.opened
    return Client(factory, proto)
