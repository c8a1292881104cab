"""One twisted.web Site for everything: Django, WebSockets, health, static files.

Paths the bridge serves itself are children of :class:`Root`; every other
path goes to Django's WSGI application on its own thread pool.  Static files
are served by Twisted straight from disk, never through WSGI.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.web import http, resource, server, static
from twisted.web.wsgi import WSGIResource

# Scripts only from this origin (no inline script anywhere in the site);
# inline style attributes are allowed, as Django's admin uses them.
CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    b"form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CSP),
)
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class BridgeRequest(server.Request):
    """Adds security headers to every response that did not set its own."""

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            headers = self.responseHeaders
            extra = SECURITY_HEADERS + ((HSTS,) if self.isSecure() else ())
            for name, value in extra:
                if not headers.hasHeader(name):
                    headers.setRawHeaders(name, [value])
        super().write(data)


def _without_query(value: bytes | None) -> str:
    if not value:
        return "-"
    if b"?" in value:
        value = value.split(b"?", 1)[0] + b"?..."
    return value.decode("ascii", "backslashreplace").replace('"', '\\"')


def access_log_line(timestamp: str, request: http.Request) -> str:
    """The combined log format, minus query strings in the URI and the Referer.

    Tokens never belong in URLs, but a careless client or page should not
    leak one into the log either.
    """
    peer = request.getClientAddress()
    agent = request.getHeader(b"user-agent") or b"-"
    return '"{ip}" - - {ts} "{method} {uri} {proto}" {code} {length} "{ref}" "{agent}"'.format(
        ip=getattr(peer, "host", "-"),
        ts=timestamp,
        method=request.method.decode("ascii", "replace"),
        uri=_without_query(request.uri),
        proto=request.clientproto.decode("ascii", "replace"),
        code=request.code,
        length=request.sentLength or "-",
        ref=_without_query(request.getHeader(b"referer")),
        agent=agent.decode("ascii", "backslashreplace").replace('"', '\\"'),
    )


class BridgeSite(server.Site):
    requestFactory = BridgeRequest

    def __init__(self, resource: resource.IResource, **kwargs: object) -> None:
        super().__init__(resource, logFormatter=access_log_line, **kwargs)


class Root(resource.Resource):
    """Own children first, Django for the rest."""

    def __init__(self, wsgi: WSGIResource, children: dict[bytes, resource.IResource]) -> None:
        super().__init__()
        self.wsgi = wsgi
        for name, child in children.items():
            self.putChild(name, child)

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        # Give the segment back so Django sees the whole path.
        assert request.prepath is not None and request.postpath is not None
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self.wsgi

    def render(self, request: server.Request) -> Any:
        return self.wsgi.render(request)


class JSONResource(resource.Resource):
    isLeaf = True

    def __init__(self, body: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.body()).encode()


class StaticFiles(resource.Resource):
    """Django's static files, found once through its finders, served by Twisted."""

    isLeaf = True

    def __init__(self, root: Path | None, find: Callable[[str], str | None]) -> None:
        super().__init__()
        self.root = root
        self.find = find
        self._cache: dict[str, str | None] = {}

    def _locate(self, rel: str) -> str | None:
        if rel not in self._cache:
            path: str | None = None
            if self.root is not None:
                candidate = (self.root / rel).resolve()
                if candidate.is_file() and self.root.resolve() in candidate.parents:
                    path = str(candidate)
            if path is None:
                path = self.find(rel)
            if len(self._cache) < 10_000:
                self._cache[rel] = path
            return path
        return self._cache[rel]

    def render_GET(self, request: server.Request) -> Any:
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        # A segment may carry a decoded "/" (from %2f): never a way up or out.
        if not parts or any(p in ("", ".", "..") or "\\" in p or "/" in p for p in parts):
            return resource.NoResource().render(request)
        path = self._locate("/".join(parts))
        if path is None or not os.path.isfile(path):
            return resource.NoResource().render(request)
        f = static.File(path)
        f.type, f.encoding = mimetypes.guess_type(path)[0] or "application/octet-stream", None
        request.setHeader(b"cache-control", b"public, max-age=3600")
        return f.render(request)

    render_HEAD = render_GET


def django_static_finder(rel: str) -> str | None:
    from django.contrib.staticfiles import finders

    found = finders.find(rel)
    if isinstance(found, list):
        return found[0] if found else None
    return found
