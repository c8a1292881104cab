/**
 * The live dashboard and wall screen: one tile per readable device.
 *
 * Everything comes from the bridge's WebSocket (bridge.js): READY says which
 * devices exist and what this user may do with them, SUBSCRIBED brings their
 * history, STATUS their new state, DEVICE_STATE / DEVICE_CHANGED /
 * DEVICE_REMOVED keep the tiles in line with permissions at runtime.
 * A tile shows a control only with the "change" permission, and shows what
 * the device reports: a command alone never changes the displayed state.
 */

import { BridgeClient, CommandError, State } from "/static/bridge/bridge.js";

const config = JSON.parse(document.getElementById("dashboard-config").textContent);
const tilesEl = document.getElementById("tiles");
const emptyEl = document.getElementById("empty");
const connectionEl = document.getElementById("connection");
const bannerEl = document.getElementById("banner");
const announcer = document.getElementById("announcer");
const toastsEl = document.getElementById("toasts");

const SENSOR_POINTS_DEFAULT = 60;
const SENSOR_POINTS_MAX = 240;

// ----------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === "class") node.className = value;
        else if (key === "text") node.textContent = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
        if (child !== null && child !== undefined) node.append(child);
    }
    return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
    dateStyle: "medium",
    timeStyle: "medium",
});
const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

function formatTime(ms) {
    const date = new Date(ms);
    const today = new Date().toDateString() === date.toDateString();
    return (today ? timeFormat : dateTimeFormat).format(date);
}

function announce(text) {
    announcer.textContent = "";
    // A fresh text node in a fresh task is announced even when it repeats.
    setTimeout(() => {
        announcer.textContent = text;
    }, 50);
}

function toast(text) {
    const node = el("div", { class: "toast", text });
    toastsEl.append(node);
    setTimeout(() => node.remove(), 6000);
}

let idCounter = 0;
function uid(prefix) {
    idCounter += 1;
    return `${prefix}-${idCounter}`;
}

/** The on/off state of a toggle's payload, or null when it says nothing. */
function toggleState(payload) {
    if (typeof payload === "boolean") return payload;
    if (payload && typeof payload === "object" && typeof payload.on === "boolean") {
        return payload.on;
    }
    return null;
}

/** A dimmer's level 0..100, or null. */
function dimmerLevel(payload) {
    const value = payload && typeof payload === "object" ? payload.level : payload;
    return typeof value === "number" && Number.isFinite(value) ? value : null;
}

/** A sensor's reading: [label, number] of the first numeric field, or null. */
function sensorReading(payload) {
    if (typeof payload === "number" && Number.isFinite(payload)) return ["value", payload];
    if (payload && typeof payload === "object") {
        for (const [key, value] of Object.entries(payload)) {
            if (typeof value === "number" && Number.isFinite(value)) return [key, value];
        }
    }
    return null;
}

/** What each command result means, shown after the result's own name. */
const RESULT_TEXT = {
    sending: "",
    sent: "waiting for the device…",
    confirmed: "",
    timeout: "no answer from the device in time",
    upstream_unavailable: "the device is unreachable",
    rejected: "the bridge refused the command",
    lost: "connection lost before an answer",
    not_connected: "not sent: not connected",
    closed: "not sent: connection closed",
};
const RESULT_ICON = { confirmed: "✓ ", sending: "… ", sent: "… " };

// ------------------------------------------------------------------ widgets

/**
 * A widget renders one kind of device. `render(state)` is called with every
 * status; controls exist only when `canChange`.
 */
class Widget {
    constructor(tile) {
        this.tile = tile;
        this.root = el("div", { class: "widget" });
    }

    get canChange() {
        return this.tile.canChange;
    }

    history(entries) {
        if (entries.length) this.render(entries[entries.length - 1].payload);
    }

    status(payload) {
        this.render(payload);
    }

    render() {}

    setEnabled() {}
}

class ToggleWidget extends Widget {
    constructor(tile) {
        super(tile);
        this.state = null;
        if (this.canChange) {
            // The name is the device's; the state is aria-checked, not part of the name.
            this.label = el("span", {
                class: "switch-label",
                text: "Unknown",
                "aria-hidden": "true",
            });
            this.control = el(
                "button",
                {
                    type: "button",
                    class: "switch",
                    role: "switch",
                    "aria-checked": "false",
                    "aria-labelledby": tile.titleId,
                    onclick: () => this.flip(),
                },
                el("span", { class: "track", "aria-hidden": "true" }),
            );
            this.control.append(this.label);
            this.root.append(this.control);
        } else {
            this.indicator = el("span", { class: "indicator", "aria-hidden": "true" });
            this.text = el("span", { class: "state-value", text: "Unknown" });
            this.root.append(el("p", { class: "state-text" }, this.indicator, this.text));
        }
    }

    render(payload) {
        const on = toggleState(payload);
        if (on === null) return;
        this.state = on;
        const word = on ? "On" : "Off";
        if (this.control) {
            this.control.setAttribute("aria-checked", String(on));
            this.label.textContent = word;
        } else {
            this.text.textContent = word;
            this.indicator.classList.toggle("on", on);
        }
    }

    flip() {
        // One command at a time; the switch stays focusable meanwhile.
        if (this.control.getAttribute("aria-busy") === "true") return;
        this.tile.send({ on: !this.state }, this.control);
    }

    setEnabled(enabled) {
        if (this.control) this.control.disabled = !enabled;
    }
}

class DimmerWidget extends Widget {
    constructor(tile) {
        super(tile);
        this.level = null;
        const box = el("div", { class: "dimmer" });
        if (this.canChange) {
            const id = uid("dimmer");
            this.control = el("input", {
                type: "range",
                id,
                min: "0",
                max: "100",
                step: "1",
                value: "0",
                "aria-labelledby": tile.titleId,
                "aria-valuetext": "unknown",
            });
            this.output = el("output", { for: id, text: "–" });
            this.control.addEventListener("input", () => {
                this.output.textContent = `${this.control.value} %`;
                this.control.setAttribute("aria-valuetext", `${this.control.value} percent`);
            });
            this.control.addEventListener("change", () =>
                this.tile.send({ level: Number(this.control.value) }, null),
            );
            // While the user holds the slider, statuses do not move it.
            this.control.addEventListener("pointerdown", () => {
                this.dragging = true;
            });
            this.control.addEventListener("pointerup", () => {
                this.dragging = false;
            });
            box.append(this.control, this.output);
        } else {
            this.meter = el("meter", {
                min: "0",
                max: "100",
                value: "0",
                "aria-labelledby": tile.titleId,
            });
            this.output = el("span", { class: "value", text: "–" });
            box.append(this.meter, this.output);
        }
        this.root.append(box);
    }

    render(payload) {
        const level = dimmerLevel(payload);
        if (level === null) return;
        this.level = level;
        this.output.textContent = `${numberFormat.format(level)} %`;
        if (this.control) {
            if (!this.dragging) this.control.value = String(level);
            this.control.setAttribute("aria-valuetext", `${numberFormat.format(level)} percent`);
        } else {
            this.meter.value = level;
            this.meter.textContent = `${level} %`;
        }
    }

    setEnabled(enabled) {
        if (this.control) this.control.disabled = !enabled;
    }
}

class SensorWidget extends Widget {
    constructor(tile) {
        super(tile);
        this.points = [];
        this.limit = Math.min(tile.device.history_size || SENSOR_POINTS_DEFAULT, SENSOR_POINTS_MAX);
        if (this.limit < 2) this.limit = SENSOR_POINTS_DEFAULT;
        this.value = el("span", { class: "value", text: "–" });
        this.label = el("span", { class: "label", text: "" });
        this.chart = svg("svg", {
            class: "spark",
            viewBox: "0 0 100 40",
            preserveAspectRatio: "none",
            role: "img",
            "aria-label": "No readings yet",
        });
        this.line = svg("polyline", { points: "" });
        this.chart.append(this.line);
        this.min = el("span", { text: "" });
        this.max = el("span", { text: "" });
        this.other = el("pre", { class: "json", hidden: true });
        this.root.append(
            el("p", { class: "reading" }, this.value, this.label),
            this.chart,
            el("p", { class: "spark-range", "aria-hidden": "true" }, this.min, this.max),
            this.other,
        );
    }

    history(entries) {
        this.points = [];
        for (const entry of entries) this.add(entry.payload, false);
        if (entries.length) this.render(entries[entries.length - 1].payload);
        this.draw();
    }

    status(payload) {
        this.add(payload, true);
        this.render(payload);
    }

    add(payload, draw) {
        const reading = sensorReading(payload);
        if (!reading) return;
        this.points.push(reading[1]);
        if (this.points.length > this.limit) this.points.splice(0, this.points.length - this.limit);
        if (draw) this.draw();
    }

    render(payload) {
        const reading = sensorReading(payload);
        if (!reading) {
            this.other.hidden = false;
            this.other.textContent = JSON.stringify(payload, null, 2);
            return;
        }
        this.other.hidden = true;
        this.value.textContent = numberFormat.format(reading[1]);
        this.label.textContent = reading[0] === "value" ? "" : reading[0];
        this.readingName = reading[0];
    }

    draw() {
        const points = this.points;
        if (points.length === 0) {
            this.line.setAttribute("points", "");
            return;
        }
        const lo = Math.min(...points);
        const hi = Math.max(...points);
        const pad = hi === lo ? 1 : (hi - lo) * 0.1;
        const bottom = lo - pad;
        const top = hi + pad;
        // Spread what there is over the whole width; one point is a flat line.
        const series = points.length === 1 ? [points[0], points[0]] : points;
        const step = 100 / (series.length - 1);
        const coords = series.map((v, i) => {
            const x = i * step;
            const y = 40 - ((v - bottom) / (top - bottom)) * 40;
            return `${x.toFixed(2)},${y.toFixed(2)}`;
        });
        this.line.setAttribute("points", coords.join(" "));
        this.min.textContent = `min ${numberFormat.format(lo)}`;
        this.max.textContent = `max ${numberFormat.format(hi)}`;
        const what = this.readingName;
        const name = what && what !== "value" ? ` of ${what}` : "";
        this.chart.setAttribute(
            "aria-label",
            `Chart of the last ${points.length} readings${name}, from ${numberFormat.format(lo)}` +
                ` to ${numberFormat.format(hi)}`,
        );
    }
}

class JsonWidget extends Widget {
    constructor(tile) {
        super(tile);
        this.pre = el("pre", { class: "json", tabindex: "0", "aria-label": "Last reported state" });
        this.pre.textContent = "No state reported yet";
        this.root.append(this.pre);
        if (this.canChange) {
            const id = uid("json");
            this.input = el("textarea", { id, spellcheck: "false" });
            this.input.value = "{}";
            this.error = el("span", { class: "error", role: "alert" });
            this.button = el("button", { type: "submit", text: "Send" });
            const form = el(
                "form",
                { class: "json-command" },
                el("label", { for: id, text: "Command (JSON)" }),
                this.input,
                this.button,
                " ",
                this.error,
            );
            form.addEventListener("submit", (event) => {
                event.preventDefault();
                let payload;
                try {
                    payload = JSON.parse(this.input.value);
                } catch {
                    this.error.textContent = "Not valid JSON";
                    return;
                }
                this.error.textContent = "";
                this.tile.send(payload, this.button);
            });
            this.root.append(el("details", {}, el("summary", { text: "Send a command" }), form));
        }
    }

    render(payload) {
        this.pre.textContent = JSON.stringify(payload, null, 2);
    }

    setEnabled(enabled) {
        if (this.button) this.button.disabled = !enabled;
    }
}

const WIDGETS = { toggle: ToggleWidget, dimmer: DimmerWidget, sensor: SensorWidget };

// -------------------------------------------------------------------- tiles

class Tile {
    constructor(device, client) {
        this.client = client;
        this.device = { ...device };
        this.titleId = uid("tile-title");
        this.pending = 0;
        this.li = el("li", { class: "tile-item" });
        this.build();
    }

    get canChange() {
        return !config.readOnly && this.device.permission === "change";
    }

    build() {
        const d = this.device;
        this.title = el("h2", { class: "tile-title", id: this.titleId, text: d.name });
        this.kind = el("p", { class: "tile-kind", text: d.kind });
        this.offline = el("span", { class: "badge offline", text: "Offline", hidden: true });
        this.permission = el("span", {
            class: "badge",
            text: this.canChange ? "can change" : "read only",
        });
        this.meta = el("p", { class: "tile-meta" });
        this.progress = el("p", { class: "progress", role: "status", "aria-live": "polite" });
        this.body = el("div", { class: "tile-body" });
        this.article = el(
            "article",
            {
                class: "tile",
                "aria-labelledby": this.titleId,
                dataset: { device: d.id, kind: d.kind, permission: d.permission },
            },
            el(
                "div",
                { class: "tile-head" },
                el("div", {}, this.title, this.kind),
                el("div", { class: "badges" }, this.offline, this.permission),
            ),
            this.body,
            this.meta,
            this.progress,
        );
        this.li.replaceChildren(this.article);
        const Kind = Object.hasOwn(WIDGETS, d.kind) ? WIDGETS[d.kind] : JsonWidget;
        this.widget = new Kind(this);
        this.body.append(this.widget.root);
        this.setOnline(d.online !== false);
        if (this.lastStatus) {
            this.widget.history(this.historyEntries || []);
            this.showMeta(this.lastStatus);
        }
    }

    /** DEVICE_CHANGED: rebuild when what is shown or allowed has changed. */
    update(changes) {
        const before = this.device;
        this.device = { ...before, ...changes };
        if (
            before.kind !== this.device.kind ||
            before.permission !== this.device.permission ||
            before.history_size !== this.device.history_size
        ) {
            this.build();
        } else if (before.name !== this.device.name) {
            this.title.textContent = this.device.name;
        }
    }

    setOnline(online) {
        this.device.online = online;
        this.article.dataset.online = String(online);
        this.offline.hidden = online;
        this.refreshEnabled();
    }

    /** Controls work while the device is online and the connection is up. */
    refreshEnabled() {
        this.widget.setEnabled(this.device.online !== false && connected());
    }

    subscribed(d) {
        this.historyEntries = d.history.slice();
        this.widget.history(d.history);
        const last = d.history[d.history.length - 1];
        if (last) {
            this.lastStatus = last;
            this.showMeta(last);
        }
    }

    status(d) {
        this.lastStatus = d;
        this.historyEntries = (this.historyEntries || []).concat([d]).slice(-SENSOR_POINTS_MAX);
        this.widget.status(d.payload);
        this.showMeta(d);
    }

    showMeta(d) {
        this.meta.replaceChildren();
        if (typeof d.ts !== "number") return;
        const time = el("time", { datetime: new Date(d.ts).toISOString(), text: formatTime(d.ts) });
        if (d.by) {
            const by = el("strong", { class: "by", text: d.by });
            this.meta.append("Changed by ", by, " at ", time);
        } else {
            this.meta.append("Reported by the device at ", time);
        }
    }

    showProgress(result, detail = "") {
        this.progress.dataset.result = result;
        const icon = RESULT_ICON[result] || (result in RESULT_TEXT ? "✗ " : "");
        let text = RESULT_TEXT[result] ?? "";
        if (detail && result !== "confirmed" && result !== "sent") {
            text = text ? `${text} (${detail})` : detail;
        }
        this.progress.replaceChildren(
            el("span", { class: "result", text: `${icon}${result}` }),
            text ? ` · ${text}` : "",
        );
    }

    /** Send a command and show its progress; `control` is marked busy meanwhile. */
    async send(payload, control) {
        this.pending += 1;
        if (control) control.setAttribute("aria-busy", "true");
        this.showProgress("sending");
        try {
            const result = await this.client.command(this.device.id, payload, {
                onProgress: (d) => {
                    if (d.result === "sent") this.showProgress("sent");
                },
            });
            this.showProgress(result.result);
        } catch (error) {
            if (error instanceof CommandError) {
                this.showProgress(error.result, error.detail);
                announce(`${this.device.name}: command ${error.result}`);
            } else {
                this.showProgress("rejected", String(error));
            }
        } finally {
            this.pending -= 1;
            if (control) control.removeAttribute("aria-busy");
        }
    }
}

// ---------------------------------------------------------------- dashboard

const client = new BridgeClient({ auth: config.mode === "anonymous" ? "anonymous" : "session" });
const tiles = new Map();

function connected() {
    return client.state === State.READY;
}

function sortTiles() {
    const ordered = [...tiles.values()].sort(
        (a, b) =>
            a.device.name.localeCompare(b.device.name, undefined, { sensitivity: "base" }) ||
            a.device.id.localeCompare(b.device.id),
    );
    for (const tile of ordered) tilesEl.append(tile.li);
    emptyEl.hidden = tiles.size > 0;
}

function addTile(device) {
    let tile = tiles.get(device.id);
    if (tile) {
        tile.update(device);
        tile.setOnline(device.online !== false);
    } else {
        tile = new Tile(device, client);
        tiles.set(device.id, tile);
    }
    return tile;
}

function removeTile(id) {
    const tile = tiles.get(id);
    if (!tile) return;
    tiles.delete(id);
    const hadFocus = tile.li.contains(document.activeElement);
    tile.li.remove();
    emptyEl.hidden = tiles.size > 0;
    announce(`${tile.device.name} is no longer available`);
    if (hadFocus) document.getElementById("main").focus();
}

function setConnection(state, text) {
    connectionEl.dataset.state = state;
    connectionEl.textContent = text;
    for (const tile of tiles.values()) tile.refreshEnabled();
}

function showBanner(text, link) {
    bannerEl.replaceChildren(text);
    if (link) bannerEl.append(" ", el("a", { href: link.href, text: link.text }));
    bannerEl.hidden = false;
}

client.on("ready", (ready) => {
    bannerEl.hidden = true;
    const readable = new Set(ready.devices.map((d) => d.id));
    for (const id of [...tiles.keys()]) if (!readable.has(id)) removeTile(id);
    for (const device of ready.devices) addTile(device);
    sortTiles();
    tilesEl.setAttribute("aria-busy", "false");
    client.subscribe(ready.devices.map((d) => d.id));
});

client.on("subscribed", (d) => {
    const tile = tiles.get(d.device);
    if (tile) tile.subscribed(d);
});

client.on("status", (d) => {
    const tile = tiles.get(d.device);
    if (tile) tile.status(d);
});

client.on("device_state", (d) => {
    const tile = tiles.get(d.device);
    if (!tile) return;
    // A recovered RESUME tells every device's state again: announce changes only.
    const changed = (tile.device.online !== false) !== d.online;
    tile.setOnline(d.online);
    if (changed) announce(`${tile.device.name} is ${d.online ? "online" : "offline"}`);
});

client.on("device_changed", (d) => {
    const known = tiles.has(d.device);
    const device = {
        id: d.device,
        name: d.name,
        kind: d.kind,
        history_size: d.history_size,
        permission: d.permission,
    };
    if (!known) device.online = (client.device(d.device) || {}).online !== false;
    addTile(device);
    sortTiles();
    if (!known) {
        client.subscribe([d.device]);
        announce(`${d.name} was added`);
    }
});

client.on("device_removed", (d) => removeTile(d.device));

client.on("notify", (d) => {
    const data = d.data === undefined || d.data === null ? "" : `: ${JSON.stringify(d.data)}`;
    toast(`${d.event}${data}`);
});

let countdown = null;
client.on("state", ({ state }) => {
    // The reconnect countdown must not overwrite what came after it.
    if (state !== State.RECONNECTING) clearInterval(countdown);
    if (state === State.READY) setConnection("ready", "Live");
    else if (state === State.CONNECTING || state === State.IDENTIFYING) {
        setConnection("connecting", "Connecting…");
    } else if (state === State.RESUMING) setConnection("connecting", "Resuming…");
});

client.on("close", ({ code, reason, reconnect, delay }) => {
    clearInterval(countdown);
    if (reconnect) {
        const until = Date.now() + delay;
        const tick = () => {
            if (client.state !== State.RECONNECTING) {
                clearInterval(countdown);
                return;
            }
            const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
            const text = left > 0 ? `Reconnecting in ${left} s…` : "Reconnecting…";
            setConnection("reconnecting", text);
            if (left <= 0) clearInterval(countdown);
        };
        tick();
        countdown = setInterval(tick, 1000);
        return;
    }
    setConnection("closed", "Disconnected");
    const login = { href: `${config.loginUrl}?next=${encodeURIComponent(location.pathname)}`,
        text: "Log in again" };
    if (code === 4011 || code === 4006) {
        showBanner("Your session has ended.", login);
    } else if (code === 4004 && config.mode === "anonymous") {
        showBanner("The public view is not enabled on this bridge.", {
            href: config.loginUrl,
            text: "Log in",
        });
    } else if (code === 4004) {
        showBanner("The bridge did not accept your login.", login);
    } else {
        showBanner(`The connection was closed (${code}${reason ? `: ${reason}` : ""}).`, {
            href: location.pathname,
            text: "Reload",
        });
    }
});

// The wall screen's clock.
const clockEl = document.getElementById("clock");
if (clockEl) {
    const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "short" });
    const tick = () => {
        clockEl.textContent = clockFormat.format(new Date());
    };
    tick();
    setInterval(tick, 10000);
}

// For tests and debugging: window.bridgeDashboard.client is the live client.
window.bridgeDashboard = { client, tiles };
client.connect();
