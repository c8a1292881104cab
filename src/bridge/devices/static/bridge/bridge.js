/**
 * bridge.js: a small browser client for bridge protocol v1.
 *
 * One WebSocket, many devices. The client says hello, identifies (Django
 * session cookie, short-lived token, or anonymous), heartbeats at the
 * interval HELLO announces, reconnects with exponential backoff and jitter,
 * RESUMEs after every drop (a server restart, 1001, included), re-IDENTIFYs
 * and re-SUBSCRIBEs when the session cannot be resumed, and turns COMMAND /
 * COMMAND_RESULT pairs into promises.
 *
 *     import { BridgeClient } from "/static/bridge/bridge.js";
 *
 *     const client = new BridgeClient();            // same origin, session cookie
 *     client.on("ready", (ready) => client.subscribe(ready.devices.map((d) => d.id)));
 *     client.on("status", (status) => console.log(status.device, status.payload));
 *     client.connect();
 *     await client.command(deviceId, { on: true }); // resolves when confirmed
 *
 * The whole API is described in docs/bridge-js.md. No dependencies, no build
 * step: an ES module for current browsers (and anything with a WHATWG
 * WebSocket, such as Node.js 22+ or Deno).
 *
 * @module bridge
 */

/** Protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/** Frame opcodes (spec section 2). */
export const Op = Object.freeze({
    HELLO: 0,
    HEARTBEAT: 1,
    HEARTBEAT_ACK: 2,
    IDENTIFY: 3,
    COMMAND: 4,
    STATUS: 5,
    EVENT: 6,
    SUBSCRIBE: 7,
    UNSUBSCRIBE: 8,
    RESUME: 9,
});

/** Close codes (spec section 6). */
export const CloseCode = Object.freeze({
    UNKNOWN_ERROR: 4000,
    UNKNOWN_OP: 4001,
    DECODE_ERROR: 4002,
    FORBIDDEN: 4003,
    AUTHENTICATION_FAILED: 4004,
    ALREADY_AUTHENTICATED: 4005,
    NOT_AUTHENTICATED: 4006,
    INVALID_SEQUENCE: 4007,
    RATE_LIMITED: 4008,
    HEARTBEAT_TIMEOUT: 4009,
    FRAME_TOO_LARGE: 4010,
    IDENTITY_REVOKED: 4011,
    GOING_AWAY: 1001,
});

/**
 * Close codes after which reconnecting cannot help: the credential is bad or
 * gone, or the client sent something the server will refuse again.
 */
export const FATAL_CLOSE_CODES = Object.freeze(
    new Set([4001, 4002, 4003, 4004, 4006, 4010, 4011]),
);

/** Connection states reported by the "state" event and `client.state`. */
export const State = Object.freeze({
    IDLE: "idle",
    CONNECTING: "connecting",
    IDENTIFYING: "identifying",
    RESUMING: "resuming",
    READY: "ready",
    RECONNECTING: "reconnecting",
    CLOSED: "closed",
});

/**
 * Why a command did not succeed. `result` is the COMMAND_RESULT value
 * ("timeout", "upstream_unavailable", "rejected") or one of the client's own:
 * "not_connected" (no READY connection), "lost" (the session ended before the
 * result arrived) or "closed" (client.close() was called).
 */
export class CommandError extends Error {
    /**
     * @param {string} result
     * @param {string} detail
     * @param {object|null} frame the COMMAND_RESULT payload, when there was one
     */
    constructor(result, detail, frame = null) {
        super(detail ? `${result}: ${detail}` : result);
        this.name = "CommandError";
        this.result = result;
        this.detail = detail || "";
        this.frame = frame;
    }
}

/**
 * The WebSocket URL of the bridge that served the current page.
 * @param {string} [path="/ws/"]
 * @returns {string}
 */
export function sameOriginUrl(path = "/ws/") {
    const { protocol, host } = globalThis.location;
    return `${protocol === "https:" ? "wss:" : "ws:"}//${host}${path}`;
}

/**
 * The value of Django's CSRF cookie (`csrftoken` unless renamed), or "".
 * @param {string} [name="csrftoken"]
 * @returns {string}
 */
export function csrfTokenFromCookie(name = "csrftoken") {
    const cookies = globalThis.document ? globalThis.document.cookie : "";
    for (const part of cookies.split(";")) {
        const [key, ...rest] = part.trim().split("=");
        if (key === name) return decodeURIComponent(rest.join("="));
    }
    return "";
}

/**
 * A short-lived IDENTIFY token from `POST /api/token/`.
 *
 * With `username` and `password` it logs in with them; without, it uses the
 * browser's Django session, which needs the CSRF token (read from the
 * cookie unless given).
 *
 * @param {object} [options]
 * @param {string} [options.url="/api/token/"]
 * @param {string} [options.username]
 * @param {string} [options.password]
 * @param {string} [options.csrfToken]
 * @returns {Promise<string>}
 */
export async function fetchToken(options = {}) {
    const url = options.url || "/api/token/";
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    let body = "{}";
    if (options.username !== undefined) {
        body = JSON.stringify({ username: options.username, password: options.password });
    } else {
        headers["X-CSRFToken"] = options.csrfToken || csrfTokenFromCookie();
    }
    const response = await fetch(url, {
        method: "POST",
        headers,
        body,
        credentials: "same-origin",
        cache: "no-store",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok || typeof data.token !== "string") {
        throw new Error(`token request failed (${response.status}): ${data.error || "no token"}`);
    }
    return data.token;
}

/** Events that are not held back while a RESUME's replay is gathered. */
const RESUME_CONTROL = new Set(["READY", "RESUMED", "INVALID_SESSION", "ERROR"]);

/** What tells two statuses of one device with the same `ts` apart (history has no command_id). */
function statusKey(entry) {
    return JSON.stringify([entry.payload, entry.by ?? null]);
}

function randomId() {
    if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
        return globalThis.crypto.randomUUID();
    }
    return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * A protocol v1 connection that stays up.
 *
 * Events (subscribe with `on(name, fn)`; `fn` gets the frame's `d` and the
 * whole frame):
 *
 * | name | when |
 * | --- | --- |
 * | `"state"` | the connection state changed: `{state, previous}` |
 * | `"hello"` | HELLO arrived |
 * | `"ready"` | a fresh session is READY (first connect, or after INVALID_SESSION) |
 * | `"resumed"` | a RESUME succeeded; missed frames were replayed before it; `d.repeated` |
 * | `"invalid_session"` | a RESUME was refused; the client identifies again |
 * | `"subscribed"` / `"unsubscribed"` | per device |
 * | `"status"` | a STATUS (op 5) for a subscribed device |
 * | `"device_state"` | online / offline |
 * | `"device_changed"` | device added, renamed or permission changed |
 * | `"device_removed"` | device gone or no longer readable |
 * | `"command_result"` | every COMMAND_RESULT, `sent` included |
 * | `"notify"` | a NOTIFY event |
 * | `"error"` | an ERROR event (sent just before the server closes) |
 * | `"event"` | any op 6 frame, known or not |
 * | `"close"` | the socket closed: `{code, reason, reconnect, delay}` |
 */
export class BridgeClient {
    /**
     * @param {object} [options]
     * @param {string} [options.url] WebSocket URL; default: `/ws/` of this page's origin.
     * @param {"session"|"token"|"anonymous"} [options.auth] how to identify.
     *   "session": the handshake's Django session cookie (the server sends READY
     *   by itself); "token": IDENTIFY with `options.token`; "anonymous":
     *   IDENTIFY `{}`. Default: "token" when `options.token` is given, else "session".
     * @param {string|(() => (string|Promise<string>))} [options.token] a token,
     *   or a function returning a fresh one (called for every IDENTIFY and RESUME).
     * @param {boolean} [options.resume] send RESUME after a drop. Default: true
     *   with "token" and "session" auth (an anonymous session has no credential).
     * @param {number} [options.initialDelay=500] first reconnect delay, ms.
     * @param {number} [options.maxDelay=30000] reconnect delay cap, ms.
     * @param {number} [options.commandTimeout=60000] client-side safety net: a
     *   command with no final result by then rejects with "timeout".
     * @param {number} [options.probeTimeout=5000] when the browser comes back
     *   online, a heartbeat not acknowledged within this many ms replaces the
     *   connection (its TCP connection may have died with the old network).
     * @param {typeof WebSocket} [options.WebSocket] WebSocket implementation.
     */
    constructor(options = {}) {
        this.options = options;
        this.url = options.url || sameOriginUrl();
        this.auth = options.auth || (options.token !== undefined ? "token" : "session");
        if (!["session", "token", "anonymous"].includes(this.auth)) {
            throw new TypeError(`unknown auth mode ${this.auth}`);
        }
        this.resumeEnabled = options.resume ?? this.auth !== "anonymous";
        this.initialDelay = options.initialDelay ?? 500;
        this.maxDelay = options.maxDelay ?? 30000;
        this.commandTimeout = options.commandTimeout ?? 60000;
        this.probeTimeout = options.probeTimeout ?? 5000;
        this.WebSocket = options.WebSocket || globalThis.WebSocket;

        /** Connection state, one of {@link State}. */
        this.state = State.IDLE;
        /** The READY payload of the current session, or null. */
        this.ready = null;
        /** Session id of the current (or last, resumable) session. */
        this.sessionId = null;
        /** Last sequence number received, or null. */
        this.lastSeq = null;
        /** Heartbeat interval from HELLO, ms. */
        this.heartbeatInterval = null;
        /** Devices this client wants to be subscribed to (kept across sessions). */
        this.wanted = new Map(); // device id -> history flag

        this._listeners = new Map();
        this._ws = null;
        this._attempt = 0;
        this._reconnectTimer = null;
        this._heartbeatTimer = null;
        this._awaitingAck = false;
        this._pending = new Map(); // client id -> {resolve, reject, timer, onProgress}
        this._stopped = true;
        // What the server session was asked to subscribe to (it survives a RESUME).
        this._subscribed = new Set();
        // Per device, the newest `ts` passed on and the statuses at that `ts`: after
        // a recovered RESUME, replayed statuses the client already had are dropped.
        this._latest = new Map(); // device id -> {ts, keys: Set<string>}
        // Frames held while RESUMING: RESUMED, which ends the replay, says
        // whether it may repeat statuses.
        this._replay = [];
        // Session mode: the cookie's READY, held while RESUME is under way.
        this._cookieReady = null;
        this._awaitCookieReady = false;
        this._resumeSent = false;
        this._probeTimer = null;
        this._onOnline = () => {
            if (this.state === State.RECONNECTING) this._reconnectNow();
            else if (this.state === State.READY) this._probe();
        };
    }

    // ------------------------------------------------------------- events

    /**
     * Call `fn(d, frame)` on every `name` event. Returns a function that removes it.
     * @param {string} name
     * @param {(d: any, frame: object) => void} fn
     * @returns {() => void}
     */
    on(name, fn) {
        if (!this._listeners.has(name)) this._listeners.set(name, new Set());
        this._listeners.get(name).add(fn);
        return () => this.off(name, fn);
    }

    /** Remove a listener added with {@link BridgeClient#on}. */
    off(name, fn) {
        const set = this._listeners.get(name);
        if (set) set.delete(fn);
    }

    /**
     * Resolve with the next `name` event's payload.
     * @param {string} name
     * @returns {Promise<any>}
     */
    once(name) {
        return new Promise((resolve) => {
            const off = this.on(name, (d) => {
                off();
                resolve(d);
            });
        });
    }

    _emit(name, d, frame = null) {
        const set = this._listeners.get(name);
        if (!set) return;
        for (const fn of [...set]) {
            try {
                fn(d, frame);
            } catch (error) {
                // A listener's bug must not break the connection.
                setTimeout(() => {
                    throw error;
                });
            }
        }
    }

    _setState(state) {
        if (state === this.state) return;
        const previous = this.state;
        this.state = state;
        this._emit("state", { state, previous });
    }

    // --------------------------------------------------------- connection

    /** Open the connection (and keep it open until {@link BridgeClient#close}). */
    connect() {
        if (!this._stopped) return this;
        this._stopped = false;
        if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);
        this._open();
        return this;
    }

    /**
     * Close for good: no reconnect; pending commands reject with "closed".
     * @param {number} [code=1000]
     * @param {string} [reason="client closed"]
     */
    close(code = 1000, reason = "client closed") {
        this._stopped = true;
        if (globalThis.removeEventListener) {
            globalThis.removeEventListener("online", this._onOnline);
        }
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        this._stopHeartbeat();
        const ws = this._ws;
        this._ws = null;
        if (ws) {
            this._detach(ws);
            try {
                ws.close(code, reason);
            } catch {
                /* already closing */
            }
        }
        this._failPending("closed", "the client was closed");
        this.sessionId = null;
        this.ready = null;
        this._subscribed.clear();
        this._replay = [];
        this._cookieReady = null;
        this._setState(State.CLOSED);
        this._emit("close", { code, reason, reconnect: false, delay: null });
    }

    /**
     * Drop the current connection and connect again at once, resuming the
     * session where RESUME is enabled (e.g. after the network changed).
     */
    reconnect() {
        if (this._stopped) return this.connect();
        if (this._ws) this._abort(4000, "reconnect requested");
        this._reconnectNow();
        return this;
    }

    _open() {
        this._setState(this._attempt === 0 ? State.CONNECTING : State.RECONNECTING);
        let ws;
        try {
            ws = new this.WebSocket(this.url);
        } catch (error) {
            this._closed(4000, String(error));
            return;
        }
        this._ws = ws;
        this._resumeSent = false;
        this._replay = [];
        this._cookieReady = null;
        this._awaitCookieReady = false;
        ws.onmessage = (event) => this._receive(event.data);
        ws.onclose = (event) => {
            if (this._ws !== ws) return;
            this._ws = null;
            this._closed(event.code, event.reason);
        };
        ws.onerror = () => {
            /* onclose follows */
        };
    }

    _detach(ws) {
        ws.onmessage = ws.onclose = ws.onerror = ws.onopen = null;
    }

    /** Drop the current socket and reconnect (used for a dead connection). */
    _abort(code, reason) {
        const ws = this._ws;
        if (!ws) return;
        this._ws = null;
        this._detach(ws);
        try {
            ws.close(code, reason);
        } catch {
            /* ignore */
        }
        this._closed(code, reason);
    }

    _closed(code, reason) {
        this._stopHeartbeat();
        if (this._stopped) return;
        const wasReady = this.state === State.READY;
        let fatal = FATAL_CLOSE_CODES.has(code);
        const refusedResume = this._resumeSent && this.auth === "session";
        if (code === CloseCode.ALREADY_AUTHENTICATED && refusedResume) {
            // This server authenticates a cookie-bearing handshake at once and
            // refuses a RESUME on top of it: reconnect without resuming.
            this.resumeEnabled = false;
            this.sessionId = null;
            fatal = false;
        } else if (code === CloseCode.ALREADY_AUTHENTICATED) {
            fatal = true;
        }
        if (code === CloseCode.INVALID_SEQUENCE) {
            this.sessionId = null; // start a new session
        }
        if (!this.resumeEnabled) {
            this._failPending("lost", "connection lost before the result arrived");
        }
        if (fatal) {
            this._stopped = true;
            this._failPending("lost", `connection closed: ${code} ${reason || ""}`.trim());
            this._setState(State.CLOSED);
            this._emit("close", { code, reason, reconnect: false, delay: null });
            return;
        }
        if (wasReady) this._attempt = 0;
        const delay = this._backoff();
        this._attempt += 1;
        this._setState(State.RECONNECTING);
        this._emit("close", { code, reason, reconnect: true, delay });
        this._reconnectTimer = setTimeout(() => this._reconnectNow(), delay);
    }

    _reconnectNow() {
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        if (!this._stopped && !this._ws) this._open();
    }

    /** Exponential backoff with jitter: half fixed, half random. */
    _backoff() {
        if (this._attempt === 0) return Math.round(Math.random() * this.initialDelay);
        const ceiling = Math.min(this.maxDelay, this.initialDelay * 2 ** (this._attempt - 1));
        return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    }

    _send(frame) {
        if (!this._ws || this._ws.readyState !== 1) return false;
        this._ws.send(JSON.stringify(frame));
        return true;
    }

    async _token() {
        const token = this.options.token;
        return typeof token === "function" ? await token() : token;
    }

    // ---------------------------------------------------------- heartbeat

    _startHeartbeat(interval) {
        this._stopHeartbeat();
        this._awaitingAck = false;
        const beat = () => {
            if (this._awaitingAck) {
                // No ACK for the previous beat: the connection is dead.
                this._abort(4000, "no heartbeat ack");
                return;
            }
            this._awaitingAck = true;
            this._send({ op: Op.HEARTBEAT, d: this.lastSeq });
            this._heartbeatTimer = setTimeout(beat, interval);
        };
        // The first beat at a random point of the interval spreads reconnect storms.
        this._heartbeatTimer = setTimeout(beat, Math.round(interval * (0.5 + Math.random() / 2)));
    }

    _stopHeartbeat() {
        clearTimeout(this._heartbeatTimer);
        clearTimeout(this._probeTimer);
        this._heartbeatTimer = null;
        this._probeTimer = null;
        this._awaitingAck = false;
    }

    /** Back online: check at once that the connection still carries frames. */
    _probe() {
        if (!this._ws || this._awaitingAck) return;
        this._awaitingAck = true;
        this._send({ op: Op.HEARTBEAT, d: this.lastSeq });
        clearTimeout(this._probeTimer);
        this._probeTimer = setTimeout(() => {
            this._probeTimer = null;
            if (this._awaitingAck) this._abort(4000, "no heartbeat ack after the network changed");
        }, this.probeTimeout);
    }

    // ------------------------------------------------------------ receive

    _receive(data) {
        let frame;
        try {
            frame = JSON.parse(data);
        } catch {
            return;
        }
        if (typeof frame !== "object" || frame === null) return;
        switch (frame.op) {
            case Op.HELLO:
                this._hello(frame.d || {});
                return;
            case Op.HEARTBEAT:
                this._send({ op: Op.HEARTBEAT_ACK });
                return;
            case Op.HEARTBEAT_ACK:
                this._awaitingAck = false;
                return;
            case Op.STATUS:
            case Op.EVENT:
                if (this.state === State.RESUMING && !RESUME_CONTROL.has(frame.t)) {
                    this._replay.push(frame);
                } else {
                    this._dispatch(frame);
                }
                return;
            default:
                return;
        }
    }

    /** Handle one numbered frame of the current session. */
    _dispatch(frame) {
        // While RESUMING, numbered frames belong to the new connection's own
        // session (cookie READY, ERROR, INVALID_SESSION), not to the one resumed.
        if (typeof frame.s === "number" && this.state !== State.RESUMING) this.lastSeq = frame.s;
        if (frame.op === Op.STATUS) {
            if (frame.d && typeof frame.d === "object") this._remember(frame.d.device, frame.d);
            this._emit("status", frame.d, frame);
        } else {
            this._event(frame.t, frame.d || {}, frame);
        }
    }

    async _hello(d) {
        this.heartbeatInterval = d.heartbeat_interval;
        this._startHeartbeat(d.heartbeat_interval || 30000);
        this._emit("hello", d);
        const ws = this._ws;
        const resume = this.resumeEnabled && this.sessionId !== null && this.lastSeq !== null;
        if (resume) {
            this._setState(State.RESUMING);
            if (this.auth === "session") {
                // The handshake's cookie brings READY first; RESUME follows it
                // at once, and the server then drops that unused session.
                this._awaitCookieReady = true;
                return;
            }
            const request = { session_id: this.sessionId, seq: this.lastSeq };
            if (this.auth === "token") {
                try {
                    request.token = await this._token();
                } catch (error) {
                    if (this._ws === ws) this._abort(4000, `no token: ${error}`);
                    return;
                }
            }
            if (this._ws === ws) this._sendResume(request);
            return;
        }
        this.lastSeq = null;
        this._identify(ws);
    }

    _sendResume(request) {
        this._resumeSent = true;
        this._send({ op: Op.RESUME, d: request });
    }

    async _identify(ws) {
        this._setState(State.IDENTIFYING);
        if (this.auth === "session") return; // the server sends READY by itself
        let d = {};
        if (this.auth === "token") {
            try {
                d = { token: await this._token() };
            } catch (error) {
                if (this._ws === ws) this._abort(4000, `no token: ${error}`);
                return;
            }
        }
        if (this._ws === ws) this._send({ op: Op.IDENTIFY, d });
    }

    _event(name, d, frame) {
        switch (name) {
            case "READY":
                if (this._awaitCookieReady) {
                    // Kept for the case the RESUME fails; not a new session yet.
                    this._awaitCookieReady = false;
                    this._cookieReady = frame;
                    this._sendResume({ session_id: this.sessionId, seq: this.lastSeq });
                    return;
                }
                this._ready(d, frame);
                break;
            case "RESUMED":
                this._resumed(d, frame);
                return;
            case "INVALID_SESSION":
                this._invalidSession(d, frame);
                return;
            case "SUBSCRIBED":
                if (Array.isArray(d.history)) {
                    // What the application now shows for this device.
                    this._latest.delete(d.device);
                    for (const entry of d.history) this._remember(d.device, entry);
                }
                this._emit("subscribed", d, frame);
                break;
            case "UNSUBSCRIBED":
                this._latest.delete(d.device);
                this._emit("unsubscribed", d, frame);
                break;
            case "COMMAND_RESULT":
                this._commandResult(d, frame);
                break;
            case "DEVICE_STATE":
                this._updateReady(d.device, { online: d.online });
                this._emit("device_state", d, frame);
                break;
            case "DEVICE_CHANGED":
                this._deviceChanged(d);
                this._emit("device_changed", d, frame);
                break;
            case "DEVICE_REMOVED":
                // The server has unsubscribed us; a later grant starts afresh.
                this.wanted.delete(d.device);
                this._subscribed.delete(d.device);
                this._latest.delete(d.device);
                if (this.ready) {
                    this.ready.devices = this.ready.devices.filter((x) => x.id !== d.device);
                }
                this._emit("device_removed", d, frame);
                break;
            case "NOTIFY":
                this._emit("notify", d, frame);
                break;
            case "ERROR":
                this._emit("error", d, frame);
                break;
            default:
                break;
        }
        this._emit("event", d, frame);
    }

    _ready(d, frame) {
        this._attempt = 0;
        this.ready = d;
        this.sessionId = d.session_id;
        if (frame && typeof frame.s === "number") this.lastSeq = frame.s;
        this._failPending("lost", "a new session started before the result arrived");
        this._setState(State.READY);
        // Subscribe again to what was wanted and is still readable, before
        // listeners run: what they subscribe to in "ready" is then sent once.
        this._subscribed.clear();
        this._syncSubscriptions();
        this._emit("ready", d, frame);
    }

    /**
     * RESUMED ends the replay: pass the held frames on, minus (after a
     * recovered resume) the statuses this client already had.
     */
    _resumed(d, frame) {
        const replay = this._replay;
        this._replay = [];
        this._cookieReady = null;
        this._attempt = 0;
        const from = this.lastSeq;
        this._setState(State.READY);
        let repeated = 0;
        for (const held of replay) {
            // The replay starts after `from`: anything lower was numbered by the
            // cookie session the RESUME replaced.
            if (typeof held.s === "number" && from !== null && held.s <= from) continue;
            if (d.recovered === true && held.op === Op.STATUS && this._had(held.d)) {
                repeated += 1;
                if (typeof held.s === "number") this.lastSeq = held.s;
                continue;
            }
            this._dispatch(held);
            if (this._ws === null || this.state !== State.READY) return; // a listener closed it
        }
        if (typeof frame.s === "number") this.lastSeq = frame.s;
        // What was asked for or dropped while disconnected.
        this._syncSubscriptions();
        const resumed = { ...d, repeated };
        this._emit("resumed", resumed, frame);
        this._emit("event", resumed, frame);
    }

    _invalidSession(d, frame) {
        const cookieReady = this._cookieReady;
        const held = this._replay;
        this._cookieReady = null;
        this._replay = [];
        this.sessionId = null;
        this.ready = null;
        this.lastSeq = null;
        this._failPending("lost", "the session could not be resumed");
        this._emit("invalid_session", d, frame);
        this._emit("event", d, frame);
        if (this.auth !== "session") {
            this._identify(this._ws);
            return;
        }
        if (cookieReady === null) {
            // Only a new handshake carries the cookie again.
            this._abort(1000, "new session");
            return;
        }
        // The connection stays READY on the cookie's session: take it up.
        this._setState(State.IDENTIFYING);
        this._dispatch(cookieReady);
        for (const f of held) this._dispatch(f);
        if (typeof frame.s === "number") this.lastSeq = frame.s;
    }

    /** SUBSCRIBE what is wanted and readable, UNSUBSCRIBE what is no longer wanted. */
    _syncSubscriptions() {
        const readable = new Set(this.ready ? this.ready.devices.map((x) => x.id) : []);
        const groups = new Map();
        for (const [device, history] of this.wanted) {
            if (!readable.has(device) || this._subscribed.has(device)) continue;
            if (!groups.has(history)) groups.set(history, []);
            groups.get(history).push(device);
        }
        for (const [history, devices] of groups) {
            for (const device of devices) this._subscribed.add(device);
            this._send({ op: Op.SUBSCRIBE, d: { devices, history } });
        }
        const unwanted = [...this._subscribed].filter((device) => !this.wanted.has(device));
        if (unwanted.length) {
            for (const device of unwanted) this._subscribed.delete(device);
            this._send({ op: Op.UNSUBSCRIBE, d: { devices: unwanted } });
        }
    }

    _remember(device, entry) {
        if (typeof entry.ts !== "number") return;
        const key = statusKey(entry);
        const latest = this._latest.get(device);
        if (!latest || entry.ts > latest.ts) {
            this._latest.set(device, { ts: entry.ts, keys: new Set([key]) });
        } else if (entry.ts === latest.ts) {
            latest.keys.add(key);
        }
    }

    /** Whether a replayed status is one this client passed on already (or older). */
    _had(status) {
        if (!status || typeof status.ts !== "number") return false;
        const latest = this._latest.get(status.device);
        if (!latest) return false;
        if (status.ts !== latest.ts) return status.ts < latest.ts;
        return latest.keys.has(statusKey(status));
    }

    _updateReady(device, fields) {
        if (!this.ready) return;
        const entry = this.ready.devices.find((x) => x.id === device);
        if (entry) Object.assign(entry, fields);
    }

    _deviceChanged(d) {
        if (!this.ready) return;
        const fields = {
            name: d.name,
            kind: d.kind,
            history_size: d.history_size,
            permission: d.permission,
        };
        const entry = this.ready.devices.find((x) => x.id === d.device);
        if (entry) Object.assign(entry, fields);
        else this.ready.devices.push({ id: d.device, online: true, ...fields });
    }

    // ------------------------------------------------------ subscriptions

    /**
     * The device entry of the current READY (kept up to date by DEVICE_*), or undefined.
     * @param {string} id
     */
    device(id) {
        return this.ready ? this.ready.devices.find((x) => x.id === id) : undefined;
    }

    /**
     * Subscribe to devices (remembered: sent again after every new session).
     * @param {string[]} devices
     * @param {{history?: boolean}} [options]
     */
    subscribe(devices, options = {}) {
        const history = options.history ?? true;
        const fresh = devices.filter((id) => !this._subscribed.has(id));
        for (const id of devices) this.wanted.set(id, history);
        if (fresh.length && this.state === State.READY) {
            for (const id of fresh) this._subscribed.add(id);
            this._send({ op: Op.SUBSCRIBE, d: { devices: fresh, history } });
        }
    }

    /**
     * Unsubscribe from devices.
     * @param {string[]} devices
     */
    unsubscribe(devices) {
        for (const id of devices) this.wanted.delete(id);
        const known = devices.filter((id) => this._subscribed.has(id));
        if (known.length && this.state === State.READY) {
            for (const id of known) this._subscribed.delete(id);
            this._send({ op: Op.UNSUBSCRIBE, d: { devices: known } });
        }
    }

    // ----------------------------------------------------------- commands

    /**
     * Send a COMMAND; resolve with the final COMMAND_RESULT payload when the
     * device confirms it, reject with a {@link CommandError} otherwise.
     *
     * @param {string} device
     * @param {any} payload any JSON
     * @param {object} [options]
     * @param {string} [options.id] client id (default: a random UUID)
     * @param {(d: object) => void} [options.onProgress] called with each
     *   COMMAND_RESULT of this command, `sent` included
     * @param {number} [options.timeout] overrides `commandTimeout`, ms
     * @returns {Promise<object>}
     */
    command(device, payload, options = {}) {
        const id = options.id || randomId();
        if (this.state !== State.READY || this._pending.has(id)) {
            const why = this._pending.has(id) ? "duplicate command id" : "not connected";
            return Promise.reject(new CommandError("not_connected", why));
        }
        return new Promise((resolve, reject) => {
            const timeout = options.timeout ?? this.commandTimeout;
            const timer = setTimeout(() => {
                this._pending.delete(id);
                reject(new CommandError("timeout", "no result from the server"));
            }, timeout);
            this._pending.set(id, { resolve, reject, timer, onProgress: options.onProgress });
            this._send({ op: Op.COMMAND, d: { device, payload, id } });
        });
    }

    _commandResult(d, frame) {
        this._emit("command_result", d, frame);
        const pending = this._pending.get(d.id);
        if (!pending) return;
        if (pending.onProgress) {
            try {
                pending.onProgress(d);
            } catch (error) {
                setTimeout(() => {
                    throw error;
                });
            }
        }
        if (d.result === "sent") return;
        this._pending.delete(d.id);
        clearTimeout(pending.timer);
        if (d.result === "confirmed") pending.resolve(d);
        else pending.reject(new CommandError(String(d.result), d.detail, d));
    }

    _failPending(result, detail) {
        const pending = [...this._pending.values()];
        this._pending.clear();
        for (const p of pending) {
            clearTimeout(p.timer);
            p.reject(new CommandError(result, detail));
        }
    }
}

export default BridgeClient;
