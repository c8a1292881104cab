"""Where sessions wait while no process holds them: across restarts and replicas.

Spec §6 tells a client closed with 1001 to RESUME, and a load balancer may
send that RESUME to any replica. The vault makes it work:

- :class:`FileVault` (one process): at shutdown every resumable session is
  written, with its replay buffer, to ``sessions.json`` in the data directory
  (0600); at start-up they are restored, so a restart loses no session.
- :class:`RedisVault` (replicas): a session held by another live replica is
  handed over on request over Redis, exactly; a replica that stops writes its
  sessions to Redis for whichever replica the clients reach; and every second
  each replica checkpoints its sessions, so that when it is killed another
  replica recovers them (statuses at least once, see bridge.snapshots).

Snapshots are built and read by :mod:`bridge.snapshots`; this module only
stores and moves them.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from bridge import snapshots
from bridge.hub import Hub
from bridge.session import Identity, Limits, Session, State

log = Logger(namespace="bridge.vault")

Wall = Callable[[], float]


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call fails with when Redis is away (txredisapi only if it is used).

    Imported here rather than with the module: without ``--redis`` the
    bridge never loads txredisapi (and hiredis).
    """
    import txredisapi

    return (txredisapi.ConnectionError, txredisapi.TimeoutError, ConnectionError)


def principal(identity: Identity) -> str:
    """Who may take a snapshot over: the same principal, as RESUME requires."""
    return f"{identity.role.value}|{identity.user_id or ''}|{identity.device_id or ''}"


def movable(session: Session) -> bool:
    return (
        session.portable
        and session.state is State.READY
        and session.resumable
        and session.identity is not None
    )


class Vault(Service):
    """No vault: sessions live and die with their process."""

    name = "vault"

    def new_session_id(self) -> str:
        return secrets.token_urlsafe(18)

    def claim(self, session_id: str, identity: Identity, seq: int) -> Deferred[Session | None]:
        """A session this process does not hold, restored into its hub; or None."""
        return succeed(None)

    def health(self) -> dict[str, Any]:
        return {"kind": "none"}


# ------------------------------------------------------------------ one process


class FileVault(Vault):
    """Sessions kept across a restart of a single process, in the data directory."""

    def __init__(self, path: Path, hub: Hub, limits: Limits, wall: Wall = time.time) -> None:
        self.path = path
        self.hub = hub
        self.limits = limits
        self.wall = wall
        self.restored = 0
        self.saved = 0

    def startService(self) -> None:
        super().startService()
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_bytes())
            frames = snapshots.dispatches(data["frames"])
            for snapshot in data["sessions"]:
                if snapshots.restore(snapshot, self.hub, self.limits, self.wall(), 0, frames):
                    self.restored += 1
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            log.failure("could not restore the sessions kept in {path}", path=str(self.path))
        finally:
            self.path.unlink(missing_ok=True)
        log.info("restored {n} resumable sessions from before the restart", n=self.restored)

    def stopService(self) -> None:
        super().stopService()
        now, wall = self.hub.clock.seconds(), self.wall()
        table = snapshots.FrameTable()
        kept = []
        for session in list(self.hub.sessions.values()):
            if not movable(session):
                continue
            if session.link is not None:
                session.detach(now)
            kept.append(snapshots.take(session, self.hub, wall, table))
        if not kept:
            return
        from bridge.config import write_private

        body = json.dumps({"frames": table.frames, "sessions": kept}, separators=(",", ":"))
        try:
            write_private(self.path, body.encode())
        except OSError:
            log.failure("could not keep {n} sessions for after the restart", n=len(kept))
            return
        self.saved = len(kept)
        log.info("kept {n} resumable sessions for after the restart", n=len(kept))

    def health(self) -> dict[str, Any]:
        return {"kind": "file", "restored": self.restored, "saved": self.saved}


# -------------------------------------------------------------------- replicas

#: KEYS: key.  ARGV: principal prefix.  GET and DEL when the value is that principal's.
CLAIM_KEY = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
return v
"""

#: KEYS: checkpoint hash.  ARGV: session id, principal prefix.
CLAIM_CHECKPOINT = """
local d = redis.call('HGET', KEYS[1], ARGV[1])
local s = redis.call('HGET', KEYS[1], ARGV[1] .. '#s')
if not d or not s then return false end
if string.sub(s, 1, #ARGV[2]) ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. '#s')
return {d, s}
"""

#: KEYS: key.  ARGV: value.  DEL when it still holds that value.
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Written:
    """What the checkpoint writer last wrote of one session."""

    __slots__ = ("dirty", "grants_version", "marks", "moved")

    def __init__(self, moved: bool) -> None:
        self.grants_version = -1
        self.dirty: tuple[Any, ...] = ()
        self.marks: deque[list[Any]] = deque(maxlen=3)
        self.moved = moved


class RedisVault(Vault):
    """Sessions shared by the replicas of one cluster, through its Redis."""

    #: Sessions checkpointed per reactor turn (about 3 ms of work).
    slice = 50

    def __init__(
        self,
        bus: Any,
        hub: Hub,
        limits: Limits,
        clock: Any,
        replica_id: str,
        wall: Wall = time.time,
        interval: float = 1.0,
        ask_timeout: float = 2.0,
    ) -> None:
        self.bus = bus
        self.hub = hub
        self.limits = limits
        self.clock = clock
        self.replica_id = replica_id
        self.wall = wall
        self.interval = interval
        self.ask_timeout = ask_timeout
        # Session ids start with the tag of the replica that made them.
        self.tag = "r" + secrets.token_urlsafe(6).replace("-", "x").replace("_", "y")
        self.counters: Counter[str] = Counter()
        self._written: dict[str, _Written] = {}
        self._asked: dict[str, tuple[Deferred[Any], IDelayedCall]] = {}
        self._passing: Deferred[None] | None = None
        self._grants_json: dict[tuple[int, ...], tuple[tuple[Any, ...], str]] = {}
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        bus.on(f"sx:{self.tag}", self._on_message)
        bus.listeners.append(self._bus_changed)

    @property
    def keep_ms(self) -> int:
        return int((self.limits.resume_window + 10) * 1000)

    def new_session_id(self) -> str:
        return f"{self.tag}.{secrets.token_urlsafe(18)}"

    # ------------------------------------------------------------ claiming

    @inlineCallbacks
    def claim(self, session_id: str, identity: Identity, seq: int) -> Any:
        who = principal(identity) + " "
        try:
            session = yield self._claim_parked(session_id, who, seq)
            if session is not None:
                return session
            owner = yield self.bus.execute("GET", self._key("loc", session_id))
            owner = str(owner) if owner else session_id.partition(".")[0]
            if owner == self.tag or not owner:
                return None
            alive = yield self.bus.execute("EXISTS", self._key("alive", owner))
            if alive:
                answer = yield self._ask(owner, session_id, seq, who)
                if answer is not _NO_ANSWER and answer is not None:
                    self.counters["claimed_handover"] += 1
                    return self._restored(answer, seq, None)
                # It may have parked the session meanwhile (it is stopping).
                session = yield self._claim_parked(session_id, who, seq)
                if session is not None or answer is None:
                    return session
            found = yield self.bus.execute(
                "EVAL", CLAIM_CHECKPOINT, 1, self._key("ckpt", owner), session_id, who
            )
            if not found:
                return None
            data = json.loads(found[1][len(who) :])
            data.update(json.loads(found[0]))
            self.counters["claimed_checkpoint"] += 1
            log.info(
                "recovered session {sid} of the stopped replica {owner} from its checkpoint",
                sid=session_id,
                owner=owner,
            )
            return self._restored(data, seq, None)
        except _redis_errors() as e:
            self.counters["claim_failures"] += 1
            log.warn("could not take over session {sid}: {error}", sid=session_id, error=e)
            return None
        except Exception:
            self.counters["claim_failures"] += 1
            log.failure("could not take over session {sid}", sid=session_id)
            return None

    @inlineCallbacks
    def _claim_parked(self, session_id: str, who: str, seq: int) -> Any:
        """A session a stopping replica parked: taken (deleted) by its principal only."""
        parked = yield self.bus.execute("EVAL", CLAIM_KEY, 1, self._key("sess", session_id), who)
        if not parked:
            return None
        data = json.loads(parked[len(who) :])
        frames = yield self._frames(data)
        self.counters["claimed_parked"] += 1
        return self._restored(data, seq, frames)

    def _restored(self, data: dict[str, Any], seq: int, frames: list[Any] | None) -> Session | None:
        session = snapshots.restore(data, self.hub, self.limits, self.wall(), seq, frames)
        if session is not None:
            self._written[session.session_id] = _Written(
                not session.session_id.startswith(self.tag + ".")
            )
        return session

    @inlineCallbacks
    def _frames(self, data: dict[str, Any]) -> Any:
        refs = [r for r in data.get("kept", []) if isinstance(r, int)]
        if not refs:
            return None
        values = yield self.bus.execute("HMGET", self._key("frames", data["owner"]), *refs)
        table: list[Any] = [None] * (max(refs) + 1)
        for ref, value in zip(refs, values, strict=True):
            if value is None:
                raise snapshots.SnapshotError("a parked frame is gone")
            table[ref] = snapshots.frame_from(json.loads(value))
        return table

    def _ask(self, owner: str, session_id: str, seq: int, who: str) -> Deferred[Any]:
        """Ask the replica that holds a session to hand it over."""
        rid = secrets.token_hex(8)
        d: Deferred[Any] = Deferred()

        def no_answer() -> None:
            self._asked.pop(rid, None)
            self.counters["handover_timeouts"] += 1
            d.callback(_NO_ANSWER)

        timer = self.clock.callLater(self.ask_timeout, no_answer)
        self._asked[rid] = (d, timer)
        request = {
            "k": "take",
            "rid": rid,
            "sid": session_id,
            "seq": seq,
            "who": who,
            "from": self.tag,
            "o": self.replica_id,
        }
        self.bus.publish(f"sx:{owner}", json.dumps(request, separators=(",", ":")))
        return d

    def _on_message(self, text: str) -> None:
        message = json.loads(text)
        if message.get("k") == "take":
            self._hand_over(message)
        elif message.get("k") == "given":
            asked = self._asked.pop(message["rid"], None)
            if asked is not None:
                d, timer = asked
                if timer.active():
                    timer.cancel()
                d.callback(message.get("snap"))

    def _hand_over(self, request: dict[str, Any]) -> None:
        """Another replica got a RESUME for one of ours: give the session up, exactly."""
        session = self.hub.sessions.get(request["sid"])
        snap = None
        if (
            session is not None
            and movable(session)
            and session.identity is not None
            and principal(session.identity) + " " == request["who"]
        ):
            if session.link is not None:
                session.link.replaced()
            if session.link is not None:
                session.detach(self.clock.seconds())
            snap = snapshots.take(session, self.hub, self.wall(), after=int(request["seq"]))
            self.hub.hand_over(session, request["o"])
            self.counters["handed_over"] += 1
            log.info(
                "handed session {sid} over to replica {to}", sid=session.session_id, to=request["o"]
            )
        reply = {"k": "given", "rid": request["rid"], "snap": snap}
        self.bus.publish(f"sx:{request['from']}", json.dumps(reply, separators=(",", ":")))

    # ---------------------------------------------------------- checkpoints

    def tick(self) -> Deferred[Any] | None:
        """Say this replica is alive, and checkpoint every session that changed.

        The pass runs ``slice`` sessions per reactor turn, so thousands of
        sessions never hold the reactor (and every viewer's next status)
        for more than a few milliseconds.
        """
        if not self.bus.up or self._passing is not None:
            return None
        alive = self.bus.execute("SET", self._key("alive", self.tag), self.replica_id, "PX", 3000)
        alive.addErrback(self._write_failed)
        sessions = [s for s in self.hub.sessions.values() if movable(s)]
        live = {s.session_id for s in sessions}
        gone = [sid for sid in self._written if sid not in live]
        key = self._key("ckpt", self.tag)
        for sid in gone:
            written = self._written.pop(sid)
            if written.moved:
                d = self.bus.execute("EVAL", DELETE_IF, 1, self._key("loc", sid), self.tag)
                d.addErrback(self._write_failed)
        if gone:
            d = self.bus.execute("HDEL", key, *gone, *(f"{sid}#s" for sid in gone))
            d.addErrback(self._write_failed)
        done: Deferred[None] = Deferred()
        self._passing = done
        self._slice(sessions, 0, self.hub.commands_by_session(), self.wall())
        return done

    def _slice(
        self,
        sessions: list[Session],
        start: int,
        commands: dict[Session, list[Any]],
        wall: float,
    ) -> None:
        fields: list[str] = []
        moved: list[str] = []
        for session in sessions[start : start + self.slice]:
            if not movable(session) or session.identity is None:
                continue
            sid = session.session_id
            written = self._written.get(sid)
            if written is None:
                written = self._written[sid] = _Written(False)
            if written.grants_version != session.grants_version:
                written.grants_version = session.grants_version
                static = _dumps(snapshots.static_part(session, with_grants=False))
                text = static[:-1] + ',"grants":' + self._grants_text(session) + "}"
                fields += [f"{sid}#s", principal(session.identity) + " " + text]
            mine = commands.get(session, [])
            dirty = (session.seq, session.link is None, len(mine))
            if dirty != written.dirty:
                written.dirty = dirty
                written.marks.append([session.seq, snapshots.cursors_of(session, self.hub)])
                dynamic = snapshots.dynamic_part(session, self.hub, wall, list(written.marks), mine)
                fields += [sid, _dumps(dynamic)]
            if written.moved:
                moved.append(sid)
        key = self._key("ckpt", self.tag)
        writes = [self.bus.execute("HSET", key, *fields)] if fields else []
        if fields:
            writes.append(self.bus.execute("PEXPIRE", key, self.keep_ms))
        for sid in moved:
            # A session taken over keeps its first replica's tag: say where it is now.
            writes.append(
                self.bus.execute("SET", self._key("loc", sid), self.tag, "PX", self.keep_ms)
            )
        for d in writes:
            d.addErrback(self._write_failed)
        self.counters["checkpoint_fields"] += len(fields) // 2
        start += self.slice
        if start < len(sessions) and self.bus.up:
            self.clock.callLater(0, self._slice, sessions, start, commands, wall)
            return
        done, self._passing = self._passing, None
        if done is not None:
            done.callback(None)

    def _grants_text(self, session: Session) -> str:
        """The grants' JSON, encoded once for every session with the same (shared) views."""
        views = tuple(session.grants.values())
        key = tuple(map(id, views))
        cached = self._grants_json.get(key)
        if cached is None:
            if len(self._grants_json) > 10_000:
                self._grants_json.clear()
            # The views are kept with their JSON, so their ids cannot be reused meanwhile.
            cached = self._grants_json[key] = (views, _dumps(snapshots.grants_json(views)))
        return cached[1]

    def _write_failed(self, failure: Any) -> None:
        self.counters["checkpoint_failures"] += 1

    def _bus_changed(self, up: bool) -> None:
        if up:
            # Redis may have come back empty: write everything again.
            for written in self._written.values():
                written.grants_version, written.dirty = -1, ()
            if self.running:
                self.tick()

    # -------------------------------------------------------------- service

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if not self.bus.up:
            log.warn("Redis is down: this replica's sessions cannot be resumed elsewhere")
            return
        now, wall = self.clock.seconds(), self.wall()
        table = snapshots.FrameTable()
        parked = []
        for session in list(self.hub.sessions.values()):
            if not movable(session) or session.identity is None:
                continue
            if session.link is not None:
                session.detach(now)
            data = snapshots.take(session, self.hub, wall, table)
            data["owner"] = self.tag
            left = self.limits.resume_window - float(data["age"])
            if left > 0:
                parked.append((session, data, int(left * 1000)))
        ds = []
        frames_key = self._key("frames", self.tag)
        for start in range(0, len(table.frames), 400):
            chunk = table.frames[start : start + 400]
            pairs = [v for i, f in enumerate(chunk, start) for v in (i, _dumps(f))]
            ds.append(self.bus.execute("HSET", frames_key, *pairs))
        if table.frames:
            ds.append(self.bus.execute("PEXPIRE", frames_key, self.keep_ms))
        for session, data, ttl in parked:
            assert session.identity is not None
            value = principal(session.identity) + " " + _dumps(data)
            ds.append(
                self.bus.execute("SET", self._key("sess", session.session_id), value, "PX", ttl)
            )
        ds.append(
            self.bus.execute("DEL", self._key("ckpt", self.tag), self._key("alive", self.tag))
        )
        for session, _, _ in parked:
            # Parked: a RESUME that still reaches this replica finds them in Redis.
            self.hub.forget(session)
        try:
            yield gatherResults(ds, consumeErrors=True)
        except Exception:
            log.failure("could not park this replica's sessions in Redis")
            return
        log.info("parked {n} resumable sessions in Redis for the other replicas", n=len(parked))

    def _key(self, kind: str, name: str) -> str:
        return self.bus.key(f"{kind}:{name}")

    def health(self) -> dict[str, Any]:
        return {"kind": "redis", "tag": self.tag, "counters": dict(self.counters)}


_NO_ANSWER: Any = object()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
