"""Payload envelopes (bridge.envelope) and their interop with the Node-RED
function-node snippet examples/nodered/crypto-function.js, run by a real
``node`` in a sandbox shaped like Node-RED's function node."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from bridge.envelope import (
    EnvelopeError,
    PayloadCipher,
    command_aad,
    decode_key,
    key_id,
    load_keys,
    open_,
    seal,
    status_aad,
)

from .support import REPO, require

SNIPPET = REPO / "examples" / "nodered" / "crypto-function.js"

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
KID = key_id(KEY)
AAD = status_aad("press-1", "cmd-1")


def flip(b64: str, index: int = 0) -> str:
    """The same base64 field with one bit of byte ``index`` flipped."""
    data = bytearray(base64.b64decode(b64))
    data[index] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


# ------------------------------------------------------------- Python side


class SealOpenTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        payloads: list[Any] = [None, 0, -1.5, "s", "ünïcödé ✓", [], {}, {"on": True, "l": [1, 2]}]
        for payload in payloads:
            envelope = seal(payload, KEY, KID, AAD)
            self.assertEqual(open_(envelope, {KID: KEY}, AAD), payload)

    @settings(max_examples=60, deadline=None)
    @given(json_values)
    def test_round_trip_any_json(self, payload: Any) -> None:
        self.assertEqual(open_(seal(payload, KEY, KID, AAD), {KID: KEY}, AAD), payload)

    def test_envelope_format(self) -> None:
        envelope = seal({"on": True}, KEY, KID, AAD)
        self.assertEqual(set(envelope), {"v", "kid", "alg", "nonce", "ct", "tag"})
        self.assertEqual((envelope["v"], envelope["kid"], envelope["alg"]), (1, KID, "A256GCM"))
        self.assertEqual(len(base64.b64decode(envelope["nonce"], validate=True)), 12)
        self.assertEqual(len(base64.b64decode(envelope["tag"], validate=True)), 16)
        self.assertEqual(len(base64.b64decode(envelope["ct"], validate=True)), len('{"on":true}'))
        json.dumps(envelope)  # plain JSON all the way down
        self.assertNotIn("true", json.dumps(envelope))

    def test_fresh_nonce_every_time(self) -> None:
        nonces = {seal(1, KEY, KID, AAD)["nonce"] for _ in range(50)}
        self.assertEqual(len(nonces), 50)

    def assertRefused(
        self, envelope: Any, keys: dict[str, bytes] | None = None, aad: bytes = AAD, why: str = ""
    ) -> EnvelopeError:
        with self.assertRaises(EnvelopeError, msg=why) as ctx:
            open_(envelope, {KID: KEY} if keys is None else keys, aad)
        return ctx.exception

    def test_wrong_key(self) -> None:
        envelope = seal("secret", OTHER_KEY, KID, AAD)  # claims our kid, sealed with another key
        error = self.assertRefused(envelope)
        self.assertIn("authentication failed", str(error))

    def test_unknown_kid(self) -> None:
        envelope = seal("secret", OTHER_KEY, key_id(OTHER_KEY), AAD)
        self.assertIn("unknown key id", str(self.assertRefused(envelope)))

    def test_tampering(self) -> None:
        envelope = seal({"level": 42}, KEY, KID, AAD)
        for name in ("ct", "tag", "nonce"):
            for index in (0, -1):
                bad = dict(envelope, **{name: flip(envelope[name], index)})
                self.assertRefused(bad, why=f"{name}[{index}]")
        self.assertRefused(dict(envelope, ct=envelope["ct"][:-4] or "AAAA"), why="truncated")

    def test_associated_data_binds_device_command_and_direction(self) -> None:
        envelope = seal({"on": True}, KEY, KID, status_aad("press-1", "cmd-1"))
        for aad, why in [
            (status_aad("press-2", "cmd-1"), "other device"),
            (status_aad("press-1", "cmd-2"), "other command"),
            (status_aad("press-1", None), "command id dropped"),
            (status_aad("press-1", ""), "empty is not absent"),
            (command_aad("press-1", "cmd-1", None, 0), "other direction"),
        ]:
            self.assertRefused(envelope, aad=aad, why=why)
        command = seal({"on": True}, KEY, KID, command_aad("d", "c", "alice", 1000))
        for aad, why in [
            (command_aad("d", "c", "mallory", 1000), "other user"),
            (command_aad("d", "c", None, 1000), "user dropped"),
            (command_aad("d", "c", "alice", 1001), "other ts"),
        ]:
            self.assertRefused(command, aad=aad, why=why)
        self.assertEqual(
            open_(command, {KID: KEY}, command_aad("d", "c", "alice", 1000)), {"on": True}
        )

    def test_header_is_bound(self) -> None:
        envelope = seal("x", KEY, KID, AAD)
        # The same key under a second id: the kid is authenticated, not just a lookup hint.
        self.assertRefused(dict(envelope, kid="another"), keys={KID: KEY, "another": KEY})

    def test_malformed(self) -> None:
        good = seal("x", KEY, KID, AAD)
        cases: dict[str, Any] = {
            "plaintext payload (downgrade)": {"on": True},
            "string": "x",
            "null": None,
            "list": [good],
            "no v": {k: v for k, v in good.items() if k != "v"},
            "v 2": dict(good, v=2),
            "v true": dict(good, v=True),
            "v string": dict(good, v="1"),
            "other alg": dict(good, alg="A128GCM"),
            "no kid": {k: v for k, v in good.items() if k != "kid"},
            "numeric kid": dict(good, kid=7),
            "no nonce": {k: v for k, v in good.items() if k != "nonce"},
            "short nonce": dict(good, nonce=base64.b64encode(b"123456789012"[:8]).decode()),
            "long tag": dict(good, tag=base64.b64encode(bytes(17)).decode()),
            "nonce not base64": dict(good, nonce="!!!!!!!!!!!!!!!!"),
            "unpadded base64": dict(good, tag=good["tag"].rstrip("=")),
            "url-safe base64": dict(
                good,
                ct=good["ct"].replace("+", "-").replace("/", "_")
                if ("+" in good["ct"] or "/" in good["ct"])
                else "-_-_",
            ),
            "base64 with newline": dict(good, tag=good["tag"][:8] + "\n" + good["tag"][8:]),
            "numeric ct": dict(good, ct=5),
        }
        for why, envelope in cases.items():
            self.assertRefused(envelope, why=why)

    def test_errors_never_quote_secrets(self) -> None:
        envelope = seal("top-secret-plaintext", KEY, KID, AAD)
        for bad in (dict(envelope, tag=flip(envelope["tag"])), {"not": "top-secret-plaintext"}):
            text = str(self.assertRefused(bad))
            self.assertNotIn("top-secret-plaintext", text)
            self.assertNotIn(KEY.hex(), text)

    def test_seal_refuses_non_json_and_bad_keys(self) -> None:
        for payload in (float("nan"), {1j: 1}, object()):
            with self.assertRaises(EnvelopeError):
                seal(payload, KEY, KID, AAD)
        with self.assertRaises(EnvelopeError):
            seal(1, KEY[:16], KID, AAD)
        with self.assertRaises(EnvelopeError):
            command_aad("d", "c", None, 1.5)  # type: ignore[arg-type]


class KeyTests(unittest.TestCase):
    def test_key_id(self) -> None:
        self.assertRegex(KID, r"^[0-9a-f]{16}$")
        self.assertEqual(key_id(KEY), KID)
        self.assertNotEqual(key_id(OTHER_KEY), KID)
        self.assertNotIn(KID, KEY.hex())  # not a slice of the key

    def test_decode_key(self) -> None:
        std = base64.b64encode(KEY).decode()
        for text in (
            KEY.hex(),
            KEY.hex().upper(),
            std,
            std.rstrip("="),
            f"  {std}\n",
        ):
            self.assertEqual(decode_key(text), KEY)
        self.assertEqual(decode_key(base64.urlsafe_b64encode(b"\xff" * 32).decode()), b"\xff" * 32)
        for bad in (
            "",
            "abc",
            KEY.hex()[:-2],
            base64.b64encode(KEY[:31]).decode(),
            base64.b64encode(KEY + b"x").decode(),
            "g" * 64,
        ):
            with self.assertRaises(EnvelopeError, msg=bad):
                decode_key(bad)

    def test_load_keys(self) -> None:
        raw = self.mktemp()
        with open(raw, "wb") as f:
            f.write(KEY)
        self.assertEqual(load_keys(raw), [KEY])

        text = self.mktemp()
        with open(text, "w") as f:
            f.write(f"# current\n{base64.b64encode(OTHER_KEY).decode()}\n\n# old\n{KEY.hex()}\n")
        self.assertEqual(load_keys(text), [OTHER_KEY, KEY])

        for content, needle in [
            (b"", "no key"),
            (b"# only a comment\n", "no key"),
            (b"abc\n", "line 1"),
            (b"\xff" * 40, "not a key file"),
        ]:
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(content)
            with self.assertRaises(EnvelopeError) as ctx:
                load_keys(path)
            self.assertIn(needle, str(ctx.exception))

    def test_cipher_rotation(self) -> None:
        old = PayloadCipher((KEY,))
        new = PayloadCipher((OTHER_KEY, KEY))
        self.assertEqual(new.kid, key_id(OTHER_KEY))
        command = {"group_id": "d", "payload": [1], "user": "u", "command_id": "c", "ts": 5}
        sealed = new.seal_command(command)
        self.assertEqual(sealed["payload"]["kid"], new.kid)
        self.assertEqual(
            {k: v for k, v in sealed.items() if k != "payload"},
            {k: v for k, v in command.items() if k != "payload"},
        )
        self.assertEqual(command["payload"], [1])  # the original is left alone
        # A status sealed with the old key still opens on the rotated side...
        envelope = seal("s", KEY, old.kid, status_aad("d", None))
        self.assertEqual(new.open_status("d", envelope, None), "s")
        # ...but not the other way round.
        with self.assertRaises(EnvelopeError):
            old.open_status("d", seal("s", OTHER_KEY, new.kid, status_aad("d", None)), None)
        self.assertNotIn(KEY.hex(), repr(new))
        self.assertNotIn(base64.b64encode(KEY).decode(), repr(new))
        with self.assertRaises(EnvelopeError):
            PayloadCipher(())


# ------------------------------------------------------ node interop harness

# Runs the shipped snippet the way Node-RED's function node does: as the body
# of a function, in a vm context holding only what that node's sandbox holds
# (no require, no module), with `crypto` coming from the Setup tab's module
# list, or else from global context.
HARNESS = r"""
const vm = require("vm");
const fs = require("fs");
const nodeCrypto = require("crypto");
const input = JSON.parse(fs.readFileSync(0, "utf8"));
const code = fs.readFileSync(input.file, "utf8");
const results = [];
for (const c of input.cases) {
    const errors = [];
    const globals = c.global_crypto ? {crypto: nodeCrypto} : {};
    const sandbox = {
        console: console, Buffer: Buffer, Date: Date, URL: URL,
        env: {get: (name) => (name in c.env ? c.env[name] : undefined)},
        global: {get: (name) => globals[name], set: () => {}, keys: () => Object.keys(globals)},
        flow: {get: () => undefined, set: () => {}, keys: () => []},
        context: {get: () => undefined, set: () => {}, keys: () => []},
    };
    if (c.libs) {
        sandbox.crypto = nodeCrypto;
    }
    vm.createContext(sandbox);
    const body = code + "\nreturn bridgeEnvelope." + c.entry + "(msg);\n";
    const fn = vm.runInContext("(function (msg, node) {\n" + body + "\n})", sandbox);
    const node = {
        error: (text) => errors.push(String(text)),
        warn: (text) => errors.push(String(text)),
        log: () => {},
    };
    let out;
    try {
        out = fn(c.msg, node);
    } catch (e) {
        errors.push("THROWN: " + e.message);
        out = null;
    }
    results.push({out: out === undefined ? null : out, errors: errors});
}
process.stdout.write(JSON.stringify(results));
"""


def run_snippet(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    require(node is not None, "node (Node.js) is not on PATH")
    assert node is not None
    done = subprocess.run(
        [node, "-e", HARNESS],
        input=json.dumps({"file": str(SNIPPET), "cases": cases}),
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_PAYLOAD")},
    )
    if done.returncode != 0:
        raise AssertionError(f"node failed ({done.returncode}):\n{done.stderr}")
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def case(
    entry: str,
    msg: dict[str, Any],
    key: bytes = KEY,
    *,
    libs: bool = True,
    global_crypto: bool = False,
    **env: str,
) -> dict[str, Any]:
    return {
        "entry": entry,
        "msg": msg,
        "env": {"BRIDGE_PAYLOAD_KEY": b64(key), **env},
        "libs": libs,
        "global_crypto": global_crypto,
    }


class NodeInteropTests(unittest.TestCase):
    """Python seals, the snippet opens; the snippet seals, Python opens."""

    def setUp(self) -> None:
        require(shutil.which("node") is not None, "node (Node.js) is not on PATH")
        self.cipher = PayloadCipher((KEY,))

    def command(self, payload: Any, **extra: Any) -> dict[str, Any]:
        message = {
            "group_id": "press-1",
            "payload": payload,
            "user": "alice",
            "command_id": "0b5f6c1e-0000-4000-8000-000000000001",
            "ts": 1_700_000_000_123,
            **extra,
        }
        # What Node-RED's `websocket in` adds to the whole-message object.
        sealed = self.cipher.seal_command(message)
        return {**sealed, "_msgid": "abc123", "_session": {"type": "websocket", "id": "1"}}

    def test_python_seals_node_opens(self) -> None:
        payloads: list[Any] = [{"on": True}, {"level": 42.5}, "ünïcödé ✓ 𝄞", None, [1, [2, {}]]]
        results = run_snippet([case("decryptCommand", self.command(p)) for p in payloads])
        for payload, result in zip(payloads, results, strict=True):
            self.assertEqual(result["errors"], [])
            self.assertEqual(result["out"]["payload"], payload)
            self.assertEqual(result["out"]["group_id"], "press-1")
            self.assertEqual(result["out"]["_msgid"], "abc123")

    def test_hex_key_and_user_null(self) -> None:
        msg = self.command({"on": False}, user=None)
        [result] = run_snippet(
            [{**case("decryptCommand", msg), "env": {"BRIDGE_PAYLOAD_KEY": KEY.hex()}}]
        )
        self.assertEqual(result["errors"], [])
        self.assertEqual(result["out"]["payload"], {"on": False})

    def test_node_seals_python_opens(self) -> None:
        statuses: list[dict[str, Any]] = [
            {"group_id": "press-1", "payload": {"on": True}, "command_id": "cmd-9"},
            {"group_id": "press-1", "payload": {"t": 21.5, "s": "ünï ✓"}},
            {"group_id": "press-1", "payload": None, "command_id": None, "topic": "x"},
        ]
        results = run_snippet([case("encryptStatus", copy.deepcopy(s)) for s in statuses])
        for status, result in zip(statuses, results, strict=True):
            self.assertEqual(result["errors"], [])
            out = result["out"]
            envelope = out["payload"]
            self.assertEqual(set(envelope), {"v", "kid", "alg", "nonce", "ct", "tag"})
            self.assertEqual(envelope["kid"], KID)  # both sides derive the same id
            opened = self.cipher.open_status(out["group_id"], envelope, out.get("command_id"))
            self.assertEqual(opened, status["payload"])

    def test_crypto_from_global_context(self) -> None:
        [sealed, missing] = run_snippet(
            [
                case(
                    "encryptStatus", {"group_id": "d", "payload": 1}, libs=False, global_crypto=True
                ),
                case("encryptStatus", {"group_id": "d", "payload": 1}, libs=False),
            ]
        )
        self.assertEqual(self.cipher.open_status("d", sealed["out"]["payload"], None), 1)
        self.assertIsNone(missing["out"])
        self.assertIn("Setup tab", missing["errors"][0])

    def test_node_rejects_tampered_wrong_key_and_misrouted(self) -> None:
        good = self.command({"on": True})
        tampered = copy.deepcopy(good)
        tampered["payload"]["ct"] = flip(tampered["payload"]["ct"])
        bad_tag = copy.deepcopy(good)
        bad_tag["payload"]["tag"] = flip(bad_tag["payload"]["tag"], -1)
        other_device = dict(copy.deepcopy(good), group_id="press-2")
        other_user = dict(copy.deepcopy(good), user="mallory")
        later = dict(copy.deepcopy(good), ts=good["ts"] + 1)
        plaintext = dict(copy.deepcopy(good), payload={"on": True})
        results = run_snippet(
            [
                case("decryptCommand", tampered),
                case("decryptCommand", bad_tag),
                case("decryptCommand", good, key=OTHER_KEY),  # node holds another key
                case("decryptCommand", other_device),
                case("decryptCommand", other_user),
                case("decryptCommand", later),
                case("decryptCommand", plaintext),
                case("decryptCommand", good),  # control: the untouched one opens
            ]
        )
        for result in results[:-1]:
            self.assertIsNone(result["out"])
            self.assertEqual(len(result["errors"]), 1)
            self.assertIn("bridge: dropped a command", result["errors"][0])
            self.assertNotIn('"on"', result["errors"][0])
        self.assertIn("unknown key id", results[2]["errors"][0])
        self.assertEqual(results[-1]["out"]["payload"], {"on": True})

    def test_node_rotation_and_max_age(self) -> None:
        old_cipher = PayloadCipher((OTHER_KEY,))
        sealed_with_old = old_cipher.seal_command(
            {"group_id": "d", "payload": 7, "user": None, "command_id": "c", "ts": 1}
        )
        rotated, not_rotated, too_old = run_snippet(
            [
                case("decryptCommand", sealed_with_old, BRIDGE_PAYLOAD_OLD_KEYS=b64(OTHER_KEY)),
                case("decryptCommand", sealed_with_old),
                case("decryptCommand", self.command(1), BRIDGE_PAYLOAD_MAX_AGE="60"),
            ]
        )
        self.assertEqual(rotated["out"]["payload"], 7)
        self.assertIsNone(not_rotated["out"])
        self.assertIsNone(too_old["out"])
        self.assertIn("BRIDGE_PAYLOAD_MAX_AGE", too_old["errors"][0])

    def test_python_rejects_node_tampered(self) -> None:
        [result] = run_snippet(
            [
                case(
                    "encryptStatus",
                    {"group_id": "press-1", "payload": {"on": 1}, "command_id": "c"},
                )
            ]
        )
        envelope = result["out"]["payload"]
        self.assertEqual(self.cipher.open_status("press-1", envelope, "c"), {"on": 1})
        for name in ("ct", "tag", "nonce"):
            with self.assertRaises(EnvelopeError, msg=name):
                self.cipher.open_status(
                    "press-1", dict(envelope, **{name: flip(envelope[name])}), "c"
                )
        with self.assertRaises(EnvelopeError):
            self.cipher.open_status("press-2", envelope, "c")
        with self.assertRaises(EnvelopeError):
            self.cipher.open_status("press-1", envelope, None)
        with self.assertRaises(EnvelopeError):
            PayloadCipher((OTHER_KEY,)).open_status("press-1", envelope, "c")

    def test_node_refuses_bad_configuration(self) -> None:
        msg = {"group_id": "d", "payload": 1}
        no_key, bad_key = run_snippet(
            [
                {**case("encryptStatus", msg), "env": {}},
                case("encryptStatus", msg, BRIDGE_PAYLOAD_KEY="c2hvcnQ="),
            ]
        )
        self.assertIsNone(no_key["out"])
        self.assertIn("BRIDGE_PAYLOAD_KEY is not set", no_key["errors"][0])
        self.assertIsNone(bad_key["out"])
        self.assertIn("32 bytes", bad_key["errors"][0])


# ----------------------------------------------- through a real Node-RED 4


def _function_node(node_id: str, name: str, func: str, wires: list[str]) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "function",
        "z": "crypto-tab",
        "name": name,
        "func": func,
        "outputs": 1,
        "timeout": 0,
        "noerr": 0,
        "initialize": "",
        "finalize": "",
        # The Setup tab's "Modules" list: Node's built-in crypto as `crypto`.
        "libs": [{"var": "crypto", "module": "crypto"}],
        "x": 400,
        "y": 100,
        "wires": [wires],
    }


def crypto_flow() -> list[dict[str, Any]]:
    """websocket in -> decrypt -> echo -> encrypt -> websocket out, with the shipped snippet."""
    snippet = SNIPPET.read_text()
    echo = (
        "return {group_id: msg.group_id, command_id: msg.command_id, _session: msg._session,"
        " payload: {echo: msg.payload, user: msg.user}};"
    )
    return [
        {"id": "crypto-tab", "type": "tab", "label": "bridge envelope test"},
        {"id": "ws", "type": "websocket-listener", "path": "/ws/bridge", "wholemsg": "true"},
        {
            "id": "in",
            "type": "websocket in",
            "z": "crypto-tab",
            "server": "ws",
            "client": "",
            "x": 100,
            "y": 100,
            "wires": [["decrypt"]],
        },
        _function_node(
            "decrypt",
            "decrypt commands",
            snippet + "\nreturn bridgeEnvelope.decryptCommand(msg);\n",
            ["echo"],
        ),
        {**_function_node("echo", "echo", echo, ["encrypt"]), "libs": []},
        _function_node(
            "encrypt",
            "encrypt statuses",
            snippet + "\nreturn bridgeEnvelope.encryptStatus(msg);\n",
            ["out"],
        ),
        {
            "id": "out",
            "type": "websocket out",
            "z": "crypto-tab",
            "server": "ws",
            "client": "",
            "x": 700,
            "y": 100,
            "wires": [],
        },
    ]


class RealNodeRedTests(unittest.TestCase):
    """The snippet in real function nodes (Setup tab module `crypto`), behind the real link."""

    timeout = 60

    async def test_sealed_round_trip_through_node_red(self) -> None:
        import time
        import uuid

        from bridge.nodered import NodeRedLink
        from bridge.upstream import IUpstreamListener, UpstreamCommand

        from .nodered_support import FakeListener, NodeRed, find_node_red, wait_until

        executable = find_node_red(self)
        self.addCleanup(os.environ.update, dict(os.environ))
        os.environ["BRIDGE_PAYLOAD_KEY"] = b64(KEY)  # Node-RED inherits it at start
        self.addCleanup(os.environ.pop, "BRIDGE_PAYLOAD_KEY", None)
        nr = NodeRed(self, executable, secret="envelope-test-link-secret")
        with open(os.path.join(nr.user_dir, "flows.json"), "w") as f:
            json.dump(crypto_flow(), f)
        # The example settings keep function-node modules off; allow built-in crypto only.
        settings_js = os.path.join(nr.user_dir, "crypto-settings.js")
        with open(settings_js, "w") as f:
            f.write(
                f"module.exports = Object.assign({{}}, require({json.dumps(nr.settings)}), {{\n"
                "    functionExternalModules: true,\n"
                '    externalModules: {modules: {allowInstall: false, allowList: ["crypto"]}},\n'
                "});\n"
            )
        nr.settings = settings_js
        await nr.start()

        cipher = PayloadCipher((KEY,))
        link = NodeRedLink(
            nr.url,
            secret="envelope-test-link-secret",
            retry_policy=lambda attempt: 0.2,
            cipher=cipher,
        )
        listener = FakeListener()
        link.attach(cast(IUpstreamListener, listener))
        link.startService()
        self.addCleanup(link.stopService)
        await wait_until(lambda: listener.states == [True], 15, "link up")

        good = UpstreamCommand(
            "press-1", {"on": True}, "alice", str(uuid.uuid4()), int(time.time() * 1000)
        )
        # The link seals the plain command and opens the sealed echo.
        self.assertTrue(link.send_command(good))
        await wait_until(lambda: listener.statuses, 10, "the sealed echo")
        [(device, payload, command_id)] = listener.statuses
        self.assertEqual((device, command_id), ("press-1", good.command_id))
        self.assertEqual(payload, {"echo": {"on": True}, "user": "alice"})
        self.assertEqual(link.counters["undecryptable"], 0)

        # A payload sealed for press-1 but addressed to press-2 is dropped by
        # the flow: no echo. Sent raw, as an attacker on the wire would.
        forged = cipher.seal_command(good.to_json())
        forged["group_id"] = "press-2"
        assert link._protocol is not None
        link._protocol.sendMessage(json.dumps(forged).encode())
        await wait_until(lambda: "does not open" in nr.output, 10, "Node-RED's error")
        self.assertEqual(len(listener.statuses), 1)
