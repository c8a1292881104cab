"""Helpers for the Node-RED link tests: a fake listener, log capture, waiting,
throwaway TLS material, and a real Node-RED process."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal as signals
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, reactor, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from bridge.upstream import IUpstreamListener

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "nodered"

clock: Any = reactor


# ------------------------------------------------------------- listener


@implementer(IUpstreamListener)
class FakeListener:
    """Records what the link reports, in order."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, Any, str | None]] = []
        self.states: list[bool] = []

    def upstream_status(self, device_id: str, payload: Any, command_id: str | None) -> None:
        self.statuses.append((device_id, payload, command_id))

    def upstream_state(self, online: bool) -> None:
        self.states.append(online)

    def statuses_for(self, device_id: str) -> list[tuple[str, Any, str | None]]:
        return [s for s in self.statuses if s[0] == device_id]


# ---------------------------------------------------------------- waiting


async def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"
) -> float:
    """Poll ``predicate`` on the reactor; return the seconds it took, fail after ``timeout``."""
    start = clock.seconds()
    while not predicate():
        if clock.seconds() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(clock, 0.02, lambda: None)
    return float(clock.seconds() - start)


async def sleep(seconds: float) -> None:
    await task.deferLater(clock, seconds, lambda: None)


# ------------------------------------------------------------------- logs


@implementer(ILogObserver)
class LogCapture:
    """Collects formatted log lines from the global publisher while installed."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def matching(self, *needles: str) -> list[str]:
        return [line for line in self.lines if all(n in line for n in needles)]

    def text(self) -> str:
        return "\n".join(self.lines)


# -------------------------------------------------------------------- TLS


def write_tls_material(
    directory: str,
    *,
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = (),
) -> dict[str, str]:
    """A throwaway CA, a server certificate it signs, a client certificate it
    signs, and an unrelated second CA; returns their PEM file names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    files: dict[str, str] = {}

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(name: str, data: bytes) -> None:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        files[name.rsplit(".", 1)[0].replace("-", "_") + "_" + name.rsplit(".", 1)[1]] = path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def make_leaf(
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        cn: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_key, ca_cert = make_ca("bridge test CA")
    other_key, other_cert = make_ca("some other CA")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    server_key, server_cert = make_leaf(
        ca_key, ca_cert, "node-red test server", sans, ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key, client_cert = make_leaf(
        ca_key, ca_cert, "bridge test client", [], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    write("ca.crt", ca_cert.public_bytes(pem))
    write("other-ca.crt", other_cert.public_bytes(pem))
    write("server.crt", server_cert.public_bytes(pem))
    write("server.key", key_pem(server_key))
    write("client.crt", client_cert.public_bytes(pem))
    write("client.key", key_pem(client_key))
    del other_key
    return files


# --------------------------------------------------------------- Node-RED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_node_red(test: TestCase) -> str:
    """The node-red executable, or skip (fail under CI=true) with the reason."""
    path = os.environ.get("BRIDGE_NODERED_BIN") or str(
        REPO / ".cache" / "node-red" / "node_modules" / ".bin" / "node-red"
    )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        problem = f"node-red not found at {path}; run .ci/install-nodered or set BRIDGE_NODERED_BIN"
    elif shutil.which("node") is None:
        problem = "node (Node.js) is not on PATH"
    else:
        return path
    if os.environ.get("CI", "").lower() == "true":
        test.fail(f"CI=true and a required component is missing: {problem}")
    raise SkipTest(problem)


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exit: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.exit = reason
        self.ended.callback(None)


class NodeRed:
    """One Node-RED 4 process with the example flow and a settings.js built
    from the example one; restartable on the same port."""

    def __init__(
        self,
        test: TestCase,
        executable: str,
        *,
        secret: str | None = None,
        tls: dict[str, str] | None = None,
        mutual_tls: bool = False,
    ) -> None:
        self.test = test
        self.mutual_tls = mutual_tls
        self.executable = executable
        self.secret = secret
        self.tls = tls
        self.port = free_port()
        self.user_dir = os.path.abspath(test.mktemp())
        os.makedirs(self.user_dir)
        shutil.copy(EXAMPLES / "flows.json", os.path.join(self.user_dir, "flows.json"))
        self.settings = os.path.join(self.user_dir, "test-settings.js")
        self._write_settings()
        self._proc: Any = None
        self._out: _Output | None = None
        test.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/ws/bridge"

    def url_for(self, host: str) -> str:
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}/ws/bridge"

    def _write_settings(self) -> None:
        overrides = [
            f"uiPort: {self.port}",
            f"userDir: {json.dumps(self.user_dir)}",
            'flowFile: "flows.json"',
            "disableEditor: true",
            'logging: {console: {level: "warn", metrics: false, audit: false}}',
        ]
        if self.tls:
            overrides.append(
                "https: {"
                f"key: fs.readFileSync({json.dumps(self.tls['server_key'])}), "
                f"cert: fs.readFileSync({json.dumps(self.tls['server_crt'])})"
                + (
                    f", ca: fs.readFileSync({json.dumps(self.tls['ca_crt'])}), "
                    "requestCert: true, rejectUnauthorized: true"
                    if self.mutual_tls
                    else ""
                )
                + "}"
            )
        base = json.dumps(str(EXAMPLES / "settings.js"))
        js = (
            "// Generated by tests/nodered_support.py: the example settings plus test overrides.\n"
            'const fs = require("fs");\n'
            f"const base = require({base});\n"
            "module.exports = Object.assign({}, base, {\n    "
            + ",\n    ".join(overrides)
            + "\n});\n"
        )
        with open(self.settings, "w") as f:
            f.write(js)

    @property
    def output(self) -> str:
        return self._out.output.decode("utf-8", "replace") if self._out else ""

    async def start(self, timeout: float = 20.0) -> None:
        """Start Node-RED and wait until its port accepts connections."""
        env = {k: v for k, v in os.environ.items() if k != "BRIDGE_NODERED_SECRET"}
        if self.secret is not None:
            env["BRIDGE_NODERED_SECRET"] = self.secret
        self._out = _Output()
        self._proc = clock.spawnProcess(
            self._out,
            self.executable,
            [self.executable, "--settings", self.settings, "--userDir", self.user_dir],
            env=env,
            path=self.user_dir,
        )
        out = self._out

        def listening() -> bool:
            if out.ended.called:
                raise AssertionError(f"Node-RED exited early:\n{self.output}")
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        await wait_until(listening, timeout, f"Node-RED to listen on {self.port}")
        # Node-RED listens before its flows run; until then a handshake on
        # /ws/bridge gets no answer at all.
        await wait_until(self._listener_ready, timeout, "the flow's websocket listener")

    def _listener_ready(self) -> bool:
        """One WebSocket handshake on /ws/bridge: any HTTP answer means the flow runs."""
        if self._out is not None and self._out.ended.called:
            raise AssertionError(f"Node-RED exited early:\n{self.output}")
        request = (
            f"GET /ws/bridge HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.3) as raw:
                sock: socket.socket = raw
                if self.tls:
                    ctx = ssl.create_default_context(cafile=self.tls["ca_crt"])
                    ctx.check_hostname = False
                    if self.mutual_tls:
                        ctx.load_cert_chain(self.tls["client_crt"], self.tls["client_key"])
                    sock = ctx.wrap_socket(raw)
                sock.sendall(request)
                return sock.recv(64).startswith(b"HTTP/1.1 ")
        except OSError:  # includes timeouts and TLS errors
            return False

    def signal(self, name: str) -> None:
        """Send SIG<name> (STOP, CONT, KILL, ...) to Node-RED."""
        self._proc.signalProcess(int(getattr(signals, "SIG" + name)))

    async def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        if self._out is None or self._out.ended.called:
            return
        self._proc.signalProcess("KILL")
        await self._out.ended

    async def stop(self) -> None:
        if self._out is None or self._out.ended.called:
            return
        try:
            self.signal("CONT")  # in case a test left it stopped
            self.signal("KILL")
        except ProcessExitedAlready:
            return
        await self._out.ended

    @property
    def exited(self) -> bool:
        return self._out is not None and self._out.ended.called


__all__ = [
    "EXAMPLES",
    "REPO",
    "FakeListener",
    "LogCapture",
    "NodeRed",
    "find_node_red",
    "free_port",
    "sleep",
    "wait_until",
    "write_tls_material",
]
