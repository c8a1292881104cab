"""Sessions as data, so that another process can take one over (no I/O).

A RESUME can reach a process that does not hold the session: the bridge was
restarted, or the load balancer chose another replica, or the replica that
held it died. A snapshot carries what RESUME needs there: the identity and its
grants (so the permission check on resume tells what changed), the
subscriptions, the numbering, the commands still waiting for a result, and
per subscribed device the ordinal of the last status the session had (its
*cursor*), so the taker can push every newer status its history holds.

Two kinds, one format:

- **exact** (``kept`` present): taken by the process that holds the session
  when it hands it over, at shutdown or on request; the replay buffer goes
  with it, so RESUME is exactly as on the original process.
- **checkpoint** (no ``kept``): written every second by replicas for the day
  they die. It knows the cursors at a few recent ``s`` values (``marks``);
  the taker numbers from the client's own last ``s`` and pushes every status
  newer than the mark at or below it, so nothing history holds is missed but
  some statuses may come twice. RESUMED then says ``"recovered": true``.

Frames shared by many sessions are written once, in a :class:`FrameTable`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bridge.hub import CommandRecord, Hub
from bridge.protocol import Dispatch, head_bytes
from bridge.session import DeviceView, Identity, Limits, Permission, Role, Session

VERSION = 1

#: Cursors at a few recent sequence numbers: ``[[s, {device: n}], ...]``, oldest first.
Marks = list[list[Any]]


class SnapshotError(ValueError):
    """A snapshot this version cannot read."""


# ------------------------------------------------------------ identity, grants


def identity_json(identity: Identity) -> dict[str, Any]:
    return {
        "role": identity.role.value,
        "uid": identity.user_id,
        "name": identity.username,
        "su": identity.is_superuser,
        "ah": identity.auth_hash,
        "sk": identity.session_key,
        "dev": identity.device_id,
    }


def identity_from(data: dict[str, Any]) -> Identity:
    return Identity(
        Role(data["role"]),
        user_id=data["uid"],
        username=data["name"],
        is_superuser=bool(data["su"]),
        auth_hash=data["ah"],
        session_key=data["sk"],
        device_id=data["dev"],
    )


def principal_key(identity: Identity) -> list[Any]:
    """What two identities share when they are the same principal (for RESUME)."""
    return [identity.role.value, identity.user_id, identity.device_id]


def grants_json(grants: Iterable[DeviceView]) -> list[list[Any]]:
    return [[v.id, v.name, v.kind, v.history_size, int(v.permission)] for v in grants]


def grants_from(data: list[list[Any]]) -> dict[str, DeviceView]:
    return {
        row[0]: DeviceView(row[0], row[1], row[2], int(row[3]), Permission(row[4])) for row in data
    }


# ---------------------------------------------------------------- frames


class FrameTable:
    """Dispatches written once however many sessions' replay buffers hold them."""

    def __init__(self) -> None:
        self.frames: list[list[Any]] = []
        self._index: dict[int, int] = {}

    def ref(self, dispatch: Dispatch) -> int:
        # Keyed by identity: the dispatches stay alive in the buffers meanwhile.
        key = id(dispatch)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.frames)
            self.frames.append(frame_json(dispatch))
        return index


def frame_json(dispatch: Dispatch) -> list[Any]:
    return [head_bytes(dispatch).decode(), dispatch[1], dispatch[2]]


def frame_from(data: list[Any]) -> Dispatch:
    head, device, n = data
    return (str(head).encode(), device, int(n))


# ---------------------------------------------------------------- taking


def cursors_of(session: Session, hub: Hub) -> dict[str, int]:
    """Per subscribed device, the ordinal of the last status the session has."""
    held = session.held_ordinals()
    cursors: dict[str, int] = {}
    for device_id in session.subscriptions:
        state = hub.devices.get(device_id)
        if state is None:
            continue
        have = state.ahead.get(session, state.last_n)
        if device_id in held:
            # A status held back for a slow connection is not the session's yet.
            have = min(have, held[device_id] - 1)
        cursors[device_id] = have
    return cursors


def static_part(session: Session, with_grants: bool = True) -> dict[str, Any]:
    """What changes rarely: who, and what they may read (``grants``, last)."""
    assert session.identity is not None
    part: dict[str, Any] = {
        "v": VERSION,
        "id": session.session_id,
        "who": identity_json(session.identity),
    }
    if with_grants:
        part["grants"] = grants_json(session.grants.values())
    return part


def dynamic_part(
    session: Session,
    hub: Hub,
    wall_now: float,
    marks: Marks,
    commands: list[tuple[CommandRecord, float]] | None = None,
    with_online: bool = False,
) -> dict[str, Any]:
    """What moves with every dispatch: numbering, cursors, commands, time detached.

    ``with_online`` adds what the session was last told of each device's
    state: exact snapshots need it; a recovered session is told again anyway.
    """
    if commands is None:
        commands = hub.commands_of(session)
    detached_for = 0.0
    if session.detached_at is not None:
        detached_for = max(0.0, hub.clock.seconds() - session.detached_at)
    part: dict[str, Any] = {
        "seq": session.seq,
        "subs": sorted(session.subscriptions),
        "marks": marks,
        "pending": [
            [
                record.client_id,
                record.command_id,
                record.device_id,
                record.user_id,
                record.username,
                remaining,
                record.remote_addr,
            ]
            for record, remaining in commands
        ],
        "at": wall_now,
        "age": detached_for,
    }
    if with_online:
        part["online"] = {d: hub.is_online(d) for d in part["subs"]}
    return part


def take(
    session: Session,
    hub: Hub,
    wall_now: float,
    frames: FrameTable | None = None,
    after: int = 0,
) -> dict[str, Any]:
    """An exact snapshot of a detached session, for the process that takes it over.

    Frames numbered ``after`` or lower are left out (the client has them);
    with a ``frames`` table the replay buffer refers to shared entries.
    """
    kept = session.kept()
    first = session.seq - len(kept) + 1
    # A client claiming more than was sent gets 4007 from the taker, as here.
    after = min(after, session.seq)
    if after >= first:
        kept = kept[after - first + 1 :]
        first = after + 1
    snapshot = static_part(session)
    marks = [[session.seq, cursors_of(session, hub)]]
    snapshot.update(dynamic_part(session, hub, wall_now, marks, with_online=True))
    snapshot["first"] = first
    snapshot["kept"] = (
        [frames.ref(d) for d in kept] if frames is not None else [frame_json(d) for d in kept]
    )
    return snapshot


# ---------------------------------------------------------------- restoring


def restore(
    data: dict[str, Any],
    hub: Hub,
    limits: Limits,
    wall_now: float,
    client_seq: int,
    frames: list[Dispatch] | None = None,
) -> Session | None:
    """Rebuild a session from a snapshot into ``hub``, brought up to date.

    ``client_seq`` is the last ``s`` the client says it saw (RESUME's
    ``seq``); ``frames`` resolves an exact snapshot's references into a
    shared table. None when the session's resume window has passed.
    """
    if data.get("v") != VERSION:
        raise SnapshotError(f"snapshot version {data.get('v')!r}")
    age = float(data["age"]) + max(0.0, wall_now - float(data["at"]))
    if age > limits.resume_window:
        return None
    identity = identity_from(data["who"])
    grants = grants_from(data["grants"])
    subscriptions = set(data["subs"]) & grants.keys()
    now = hub.clock.seconds()
    online: dict[str, bool] | None
    if "kept" in data:
        kept = [
            frames[ref] if isinstance(ref, int) and frames is not None else frame_from(ref)
            for ref in data["kept"]
        ]
        seq = int(data["first"]) + len(kept) - 1
        if seq != int(data["seq"]):
            raise SnapshotError("the replay buffer does not end at seq")
        session = Session.restored(
            data["id"], limits, now, identity, grants, subscriptions, seq, kept, age
        )
        cursors = dict(data["marks"][-1][1])
        online = dict(data["online"])
    else:
        # A checkpoint: the cursors of the latest mark the client had reached.
        reached = [mark for mark in data["marks"] if int(mark[0]) <= client_seq]
        cursors = dict(reached[-1][1]) if reached else {}
        session = Session.restored(
            data["id"],
            limits,
            now,
            identity,
            grants,
            subscriptions,
            client_seq,
            [],
            age,
            recovered=True,
        )
        online = None
    hub.restore(session, cursors, online)
    elapsed = max(0.0, wall_now - float(data["at"]))
    hub.adopt_commands(
        session,
        [
            (
                CommandRecord(
                    command_id=command_id,
                    client_id=client_id,
                    device_id=device_id,
                    user_id=user_id,
                    username=username,
                    payload=None,
                    result="sent",
                    remote_addr=remote_addr,
                ),
                max(0.0, float(remaining) - elapsed),
            )
            for client_id, command_id, device_id, user_id, username, remaining, remote_addr in (
                data["pending"]
            )
        ],
    )
    return session


def dispatches(frames: Iterable[list[Any]]) -> list[Dispatch]:
    """A frame table read back."""
    return [frame_from(f) for f in frames]
