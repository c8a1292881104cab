"""Protocol v1 frames: decoding, validation and encoding, with no I/O.

Everything a peer can send is turned into one typed message here, or into a
:class:`ProtocolError` carrying the close code the spec assigns.  Server
frames are built from bytes so that a status body serialised once can be
numbered per connection without being encoded again.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

PROTOCOL_VERSION: Final = 1


class Op(enum.IntEnum):
    HELLO = 0
    HEARTBEAT = 1
    HEARTBEAT_ACK = 2
    IDENTIFY = 3
    COMMAND = 4
    STATUS = 5
    EVENT = 6
    SUBSCRIBE = 7
    UNSUBSCRIBE = 8
    RESUME = 9


class CloseCode(enum.IntEnum):
    UNKNOWN_ERROR = 4000
    UNKNOWN_OP = 4001
    DECODE_ERROR = 4002
    FORBIDDEN = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    NOT_AUTHENTICATED = 4006
    INVALID_SEQUENCE = 4007
    RATE_LIMITED = 4008
    HEARTBEAT_TIMEOUT = 4009
    FRAME_TOO_LARGE = 4010
    IDENTITY_REVOKED = 4011
    GOING_AWAY = 1001


class ProtocolError(Exception):
    """A frame the server refuses; ``code`` is the close code to use."""

    def __init__(self, code: CloseCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Device ids: URL-safe base64 alphabet; generated ones are 22 characters.
MAX_DEVICE_ID_LENGTH: Final = 64
MAX_CLIENT_ID_LENGTH: Final = 128
MAX_DEVICES_PER_REQUEST: Final = 1000
_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def is_device_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_DEVICE_ID_LENGTH
        and all(c in _ID_CHARS for c in value)
    )


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Heartbeat:
    seq: int | None


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    pass


@dataclass(frozen=True, slots=True)
class Identify:
    token: str | None = None
    device_key: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.token is None and self.device_key is None


@dataclass(frozen=True, slots=True)
class Command:
    device: str
    payload: Any
    id: str


@dataclass(frozen=True, slots=True)
class Status:
    device: str
    payload: Any
    command_id: str | None


@dataclass(frozen=True, slots=True)
class Subscribe:
    devices: tuple[str, ...]
    history: bool


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resume:
    session_id: str
    seq: int
    token: str | None


@dataclass(frozen=True, slots=True)
class ServerOnly:
    """A well-formed frame with an op only the server sends (0 or 6)."""

    op: Op


Message = (
    Heartbeat
    | HeartbeatAck
    | Identify
    | Command
    | Status
    | Subscribe
    | Unsubscribe
    | Resume
    | ServerOnly
)


# ---------------------------------------------------------------- decoding


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite(literal: str) -> float:
    # 1e400 is a JSON number no double holds: Python makes it inf, which no frame,
    # audit entry or history row can carry (SQLite's JSON check refuses it).
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {literal[:20]}")
    return value


# NaN and Infinity are not JSON; Python's decoder accepts them by default.
# One decoder for every frame: json.loads with an argument builds a new one
# (and its scanner) per call, which costs more than decoding a small frame.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)


def _loads(text: str) -> Any:
    return _DECODER.decode(text)


# A \\u escape of a UTF-16 surrogate. JSON lets one stand alone, but a lone
# surrogate is no character: it cannot be written as UTF-8, so it could never
# be echoed, stored or audited (RFC 8259 section 8.2).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _decode_error(message: str) -> ProtocolError:
    return ProtocolError(CloseCode.DECODE_ERROR, message)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _device_list(d: dict[str, Any]) -> tuple[str, ...]:
    devices = d.get("devices")
    if not isinstance(devices, list) or not all(isinstance(x, str) for x in devices):
        raise _decode_error("d.devices must be a list of strings")
    if len(devices) > MAX_DEVICES_PER_REQUEST:
        raise _decode_error(f"at most {MAX_DEVICES_PER_REQUEST} devices per request")
    # Keep the order the client gave, without repeats.
    return tuple(dict.fromkeys(devices))


def _optional_str(d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise _decode_error(f"d.{key} must be a string")
    return value


def _object_payload(frame: dict[str, Any], op: Op) -> dict[str, Any]:
    d = frame.get("d")
    if not isinstance(d, dict):
        raise _decode_error(f"op {int(op)} needs an object in d")
    return d


def decode_frame(data: bytes | str) -> tuple[Op, dict[str, Any]]:
    """Steps 1 and 2 of the checks: a JSON object with a known op, or ProtocolError.

    The payload's shape is left to :func:`decode_payload`, so that the session
    can refuse an op its state does not allow (4005, 4006) before looking at
    what the op carries (docs/protocol.md, "Checks run in this order").
    """
    try:
        # Strict UTF-8: json.loads would also guess UTF-16 and UTF-32 from bytes.
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        frame = _loads(text)
    except (ValueError, RecursionError) as e:
        raise _decode_error(f"not JSON: {type(e).__name__}") from None
    if not isinstance(frame, dict):
        raise _decode_error("a frame is a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        # Rare, so checked only then: pairs decode to one character, lone ones fail.
        try:
            dumps(frame)
        except UnicodeEncodeError:
            raise _decode_error("not JSON text: a lone UTF-16 surrogate") from None
    op_value = frame.get("op")
    if not _is_int(op_value):
        raise _decode_error("op must be an integer")
    try:
        return Op(op_value), frame
    except ValueError:
        raise ProtocolError(CloseCode.UNKNOWN_OP, f"unknown op {op_value}") from None


def decode_payload(op: Op, frame: dict[str, Any]) -> Message:
    """Step 4: the typed message for a frame :func:`decode_frame` accepted."""
    if op is Op.HEARTBEAT:
        seq = frame.get("d")
        if seq is not None and not _is_int(seq):
            raise _decode_error("heartbeat d must be the last s received, or null")
        return Heartbeat(seq)
    if op is Op.HEARTBEAT_ACK:
        return HeartbeatAck()
    if op in (Op.HELLO, Op.EVENT):
        return ServerOnly(op)

    d = _object_payload(frame, op)
    if op is Op.IDENTIFY:
        token = _optional_str(d, "token")
        key = _optional_str(d, "device_key")
        if token is not None and key is not None:
            raise _decode_error("identify with a token or a device_key, not both")
        return Identify(token=token, device_key=key)
    if op is Op.COMMAND:
        device, client_id = d.get("device"), d.get("id")
        if not isinstance(device, str):
            raise _decode_error("d.device must be a string")
        if not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID_LENGTH:
            raise _decode_error(f"d.id must be a string of at most {MAX_CLIENT_ID_LENGTH}")
        if "payload" not in d:
            raise _decode_error("d.payload is required")
        return Command(device=device, payload=d["payload"], id=client_id)
    if op is Op.STATUS:
        device = d.get("device")
        if not isinstance(device, str):
            raise _decode_error("d.device must be a string")
        if "payload" not in d:
            raise _decode_error("d.payload is required")
        return Status(
            device=device, payload=d["payload"], command_id=_optional_str(d, "command_id")
        )
    if op is Op.SUBSCRIBE:
        history = d.get("history", True)
        if not isinstance(history, bool):
            raise _decode_error("d.history must be a boolean")
        return Subscribe(devices=_device_list(d), history=history)
    if op is Op.UNSUBSCRIBE:
        return Unsubscribe(devices=_device_list(d))
    # RESUME
    session_id, seq = d.get("session_id"), d.get("seq")
    if not isinstance(session_id, str):
        raise _decode_error("d.session_id must be a string")
    if not _is_int(seq) or seq < 0:
        raise _decode_error("d.seq must be a non-negative integer")
    return Resume(session_id=session_id, seq=seq, token=_optional_str(d, "token"))


def decode(data: bytes | str) -> Message:
    """Turn one text message into a typed message, or raise ProtocolError."""
    return decode_payload(*decode_frame(data))


# ---------------------------------------------------------------- encoding


# Built once: json.dumps with arguments constructs an encoder per call.
_ENCODE: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as every server frame is written."""
    return _ENCODE(obj).encode()


def _optional_str_json(value: str | None) -> bytes:
    return b"null" if value is None else _ENCODE(value).encode()


def is_json_safe(obj: Any) -> bool:
    """True when ``obj`` re-encodes as strict JSON (no NaN or infinity)."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(is_json_safe(v) for v in obj.values())
    if isinstance(obj, list):
        return all(is_json_safe(v) for v in obj)
    return True


# A numbered server frame (op 5 or 6) whose body is already JSON: ``head`` is
# everything up to and including ``"s":``, ``device`` the device it is about,
# if any, and ``n`` the status's ordinal in its device's history (0 for
# events): what a session snapshot records so that another process can tell
# which statuses a session already has. Each connection completes it with its
# own sequence number, so the body is encoded once however many connections
# receive it. A plain tuple of bytes, str and int, because CPython's collector
# untracks those: thousands of them sit in replay buffers and would otherwise
# lengthen every full collection.
#
# A head may also come in two parts, joined when written: a long start shared
# by many sessions and a short end of this session's own (READY, whose device
# list is the same for every session of a user and whose ``session_id`` is
# not, stays in the replay buffer of every idle session).
Head = bytes | tuple[bytes, bytes]
Dispatch = tuple[Head, str | None, int]


def frame(dispatch: Dispatch, seq: int) -> bytes:
    head = dispatch[0]
    if isinstance(head, bytes):
        return b"".join((head, str(seq).encode(), b"}"))
    return b"".join((head[0], head[1], str(seq).encode(), b"}"))


def head_bytes(dispatch: Dispatch) -> bytes:
    """The whole head, up to and including ``"s":``."""
    head = dispatch[0]
    return head if isinstance(head, bytes) else head[0] + head[1]


def _head_start(dispatch: Dispatch) -> bytes:
    # A two-part head's first part always holds at least ``{"op":6,"t":"NAME",``.
    head = dispatch[0]
    return head if isinstance(head, bytes) else head[0]


def status_dispatch(device: str, body: bytes, n: int = 0) -> Dispatch:
    return (b'{"op":5,"d":' + body + b',"s":', device, n)


def event_dispatch(name: str, d: Any, device: str | None = None) -> Dispatch:
    head = b'{"op":6,"t":' + dumps(name) + b',"d":' + dumps(d) + b',"s":'
    return (head, device, 0)


def is_status(dispatch: Dispatch) -> bool:
    return _head_start(dispatch).startswith(b'{"op":5')


def is_event(dispatch: Dispatch, name: str) -> bool:
    return _head_start(dispatch).startswith(b'{"op":6,"t":' + dumps(name) + b",")


def ready_start(user: dict[str, Any] | None, role: str, devices: list[dict[str, Any]]) -> bytes:
    """READY's head up to its ``session_id``: the part sessions of one user share.

    With :func:`ready_dispatch`, the head is byte for byte what
    ``event_dispatch("READY", {"user", "role", "devices", "session_id"})`` gives.
    """
    return b"".join(
        (
            b'{"op":6,"t":"READY","d":{"user":',
            dumps(user),
            b',"role":',
            dumps(role),
            b',"devices":',
            dumps(devices),
        )
    )


def ready_dispatch(start: bytes, session_id: str) -> Dispatch:
    return ((start, b',"session_id":' + dumps(session_id) + b'},"s":'), None, 0)


def status_body(
    device: str, payload: Any, ts: int, by: str | None, command_id: str | None
) -> bytes:
    return status_body_json(device, dumps(payload), ts, by, command_id)


def status_body_json(
    device: str, payload_json: bytes, ts: int, by: str | None, command_id: str | None
) -> bytes:
    """STATUS ``d`` around a payload already encoded (it is also what history stores)."""
    return b"".join(
        (
            b'{"device":',
            _ENCODE(device).encode(),
            b',"payload":',
            payload_json,
            b',"ts":',
            str(ts).encode(),
            b',"by":',
            _optional_str_json(by),
            b',"command_id":',
            _optional_str_json(command_id),
            b"}",
        )
    )


def hello(heartbeat_interval_ms: int, session_id: str) -> bytes:
    return dumps(
        {
            "op": Op.HELLO,
            "d": {
                "heartbeat_interval": heartbeat_interval_ms,
                "session_id": session_id,
                "protocol": PROTOCOL_VERSION,
            },
        }
    )


def heartbeat_ack() -> bytes:
    return b'{"op":2}'


def command_frame(device: str, payload: Any, command_id: str) -> bytes:
    """COMMAND as sent to a device client; ``id`` is the server's command id."""
    return dumps({"op": Op.COMMAND, "d": {"device": device, "payload": payload, "id": command_id}})
