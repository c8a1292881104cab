"""Optional end-to-end encryption of message payloads on the Node-RED link.

TLS protects the link hop by hop; this protects what a device is told and
what it reports from everything between the bridge and the flow that owns the
key (a TLS-terminating proxy, a debug node, a log of the link).  Only the
``payload`` is sealed: ``group_id`` and ``command_id`` stay readable because
both ends route on them before they hold a key-dependent opinion, and they
are bound to the ciphertext as associated data instead, so a sealed payload
cannot be moved to another device, command or direction.

The envelope (docs/encryption.md)::

    {"v": 1, "kid": "<key id>", "alg": "A256GCM",
     "nonce": "<b64, 12 bytes>", "ct": "<b64>", "tag": "<b64, 16 bytes>"}

AES-256-GCM with a random 96-bit nonce per message; the plaintext is the
UTF-8 JSON text of the payload.  Standard base64 with padding.  A key id is
derived from the key itself (:func:`key_id`), so both ends agree on it without
configuration and a key can be rotated by listing the old one next to it.

Wiring into a link is two calls, both on :class:`PayloadCipher`:
:meth:`~PayloadCipher.seal_command` on the outgoing message object and
:meth:`~PayloadCipher.open_status` on the incoming payload.  Everything here
is pure: no I/O except :func:`load_keys`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALG",
    "VERSION",
    "EnvelopeError",
    "PayloadCipher",
    "command_aad",
    "decode_key",
    "key_id",
    "load_keys",
    "open_",
    "seal",
    "status_aad",
]

VERSION: Final = 1
ALG: Final = "A256GCM"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
#: Largest plaintext sealed or opened; matches the link's message limit.
MAX_PLAINTEXT_BYTES: Final = 1024 * 1024

_AAD_LABEL: Final = b"bridge-envelope/1"
_KID_LABEL: Final = b"bridge-envelope kid"
_NONE: Final = b"\xff\xff\xff\xff"  # marks an absent field; no real field is 4 GiB long
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")
_B64_KEY = re.compile(r"[A-Za-z0-9+/_-]{43}=?")


class EnvelopeError(ValueError):
    """A payload that cannot be sealed or opened; the text never quotes key or plaintext."""


# ------------------------------------------------------------------ keys


def key_id(key: bytes) -> str:
    """The key's id: 16 hex digits of HMAC-SHA256(key, label).

    Derived, not configured, so the bridge and Node-RED agree on it from the
    key alone; a keyed hash says nothing useful about the key.
    """
    _check_key(key)
    return hmac.new(key, _KID_LABEL, hashlib.sha256).hexdigest()[:16]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise EnvelopeError(f"a key must be exactly {KEY_BYTES} bytes")


def decode_key(text: str) -> bytes:
    """One key written as 64 hex digits or as base64 (standard or URL-safe, padded or not)."""
    text = text.strip()
    if _HEX_KEY.fullmatch(text):
        return bytes.fromhex(text)
    if _B64_KEY.fullmatch(text):
        padded = text.rstrip("=") + "="
        key = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
        if len(key) == KEY_BYTES:
            return key
    raise EnvelopeError(
        f"a key must be {KEY_BYTES} bytes written as 64 hex digits or 44 base64 characters"
    )


def load_keys(path: str) -> list[bytes]:
    """Keys from a file, the one to seal with first.

    The file holds either exactly 32 raw bytes, or one key per line as hex or
    base64; blank lines and lines starting with ``#`` are skipped.  Every key
    opens; only the first seals: to rotate, put the new key on top and keep
    the old one below it until the other end has the new one too.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) == KEY_BYTES:  # no text key file is this short: a key alone is 43+ chars
        return [data]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(
            f"{path}: not a key file (32 raw bytes, or hex/base64 keys one a line)"
        ) from None
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(decode_key(line))
        except EnvelopeError as e:
            raise EnvelopeError(f"{path}, line {number}: {e}") from None
    if not keys:
        raise EnvelopeError(f"{path}: no key in the file")
    return keys


# ------------------------------------------------------ associated data


def _field(value: str | None) -> bytes:
    if value is None:
        return _NONE
    data = value.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def command_aad(group_id: str, command_id: str, user: str | None, ts: int) -> bytes:
    """What a sealed command is bound to: its device, its id, who sent it and when.

    Binding ``ts`` lets the flow refuse old commands on a clock it can trust.
    """
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise EnvelopeError("a command's ts must be an integer")
    return b"".join(
        (_field("command"), _field(group_id), _field(command_id), _field(user), _field(str(ts)))
    )


def status_aad(group_id: str, command_id: str | None) -> bytes:
    """What a sealed status is bound to: its device and the command it answers, if any."""
    return b"".join((_field("status"), _field(group_id), _field(command_id), _NONE, _NONE))


def _full_aad(kid: str, aad: bytes) -> bytes:
    """The envelope's own header is bound too: alg and kid can't be swapped."""
    return _AAD_LABEL + _field(ALG) + _field(kid) + aad


# ------------------------------------------------------------ seal, open


def seal(payload: Any, key: bytes, kid: str, aad: bytes) -> dict[str, Any]:
    """Encrypt ``payload`` (any JSON value) into an envelope bound to ``aad``."""
    _check_key(key)
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        plaintext = text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        raise EnvelopeError("the payload is not JSON") from None
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise EnvelopeError("the payload is too large to seal")
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(bytes(key)).encrypt(nonce, plaintext, _full_aad(kid, aad))
    ct, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    return {
        "v": VERSION,
        "kid": kid,
        "alg": ALG,
        "nonce": _b64(nonce),
        "ct": _b64(ct),
        "tag": _b64(tag),
    }


def open_(envelope: Any, keys: Mapping[str, bytes], aad: bytes) -> Any:
    """Decrypt an envelope with the key its ``kid`` names; return the payload.

    Raises :class:`EnvelopeError` for anything but an intact envelope sealed
    with one of ``keys`` for exactly this ``aad``: a plaintext payload is
    refused too, so nobody on the link can downgrade to it.
    """
    if not isinstance(envelope, dict):
        raise EnvelopeError("the payload is not an encrypted envelope")
    version = envelope.get("v")
    if isinstance(version, bool) or version != VERSION:
        raise EnvelopeError("unsupported envelope version")
    if envelope.get("alg") != ALG:
        raise EnvelopeError("unsupported envelope algorithm")
    kid = envelope.get("kid")
    if not isinstance(kid, str):
        raise EnvelopeError("the envelope has no key id")
    key = keys.get(kid)
    if key is None:
        raise EnvelopeError(f"unknown key id {kid[:32]!r}")
    nonce = _unb64(envelope.get("nonce"), "nonce")
    ct = _unb64(envelope.get("ct"), "ct")
    tag = _unb64(envelope.get("tag"), "tag")
    if len(nonce) != NONCE_BYTES:
        raise EnvelopeError(f"the nonce must be {NONCE_BYTES} bytes")
    if len(tag) != TAG_BYTES:
        raise EnvelopeError(f"the tag must be {TAG_BYTES} bytes")
    if len(ct) > MAX_PLAINTEXT_BYTES:
        raise EnvelopeError("the ciphertext is too large")
    try:
        plaintext = AESGCM(bytes(key)).decrypt(nonce, ct + tag, _full_aad(kid, aad))
    except InvalidTag:
        raise EnvelopeError(
            "authentication failed: wrong key, tampered envelope, or sealed for "
            "another device, command or direction"
        ) from None
    try:
        return json.loads(plaintext.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EnvelopeError("the decrypted payload is not JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, name: str) -> bytes:
    """Strict standard base64 with padding: one spelling per byte string."""
    if not isinstance(value, str) or not _B64.fullmatch(value):
        raise EnvelopeError(f"the envelope's {name} is not standard base64")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise EnvelopeError(f"the envelope's {name} is not standard base64") from None


# ------------------------------------------------------- link-side helper


@dataclass(frozen=True, repr=False)
class PayloadCipher:
    """The keys of one link: seals with the first, opens with any of them."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise EnvelopeError("at least one key is needed")
        for key in self.keys:
            _check_key(key)

    @classmethod
    def from_file(cls, path: str) -> PayloadCipher:
        return cls(tuple(load_keys(path)))

    @cached_property
    def kid(self) -> str:
        """The id of the key that seals."""
        return key_id(self.keys[0])

    @cached_property
    def by_kid(self) -> dict[str, bytes]:
        """Every key by its id (the first listed wins should two ids ever collide)."""
        return {key_id(k): k for k in reversed(self.keys)}

    def seal_command(self, message: dict[str, Any]) -> dict[str, Any]:
        """A copy of an outgoing command (``UpstreamCommand.to_json()``) with its payload sealed."""
        aad = command_aad(
            message["group_id"], message["command_id"], message.get("user"), message["ts"]
        )
        return {**message, "payload": seal(message["payload"], self.keys[0], self.kid, aad)}

    def open_status(self, group_id: str, payload: Any, command_id: str | None) -> Any:
        """The plaintext payload of an incoming status; :class:`EnvelopeError` if it isn't one."""
        return open_(payload, self.by_kid, status_aad(group_id, command_id))

    def __repr__(self) -> str:  # never show key material
        return f"<PayloadCipher kid={self.kid} keys={len(self.keys)}>"
