#!/usr/bin/env node
// Fan-out load generator for the bridge (protocol v1, spec sections 2 and 3).
//
// One process holds many viewers. Each viewer connects to ws(s)://host:port/ws/,
// waits for HELLO (op 0), sends IDENTIFY (op 3), waits for EVENT READY (op 6),
// sends SUBSCRIBE (op 7, history false), waits for one EVENT SUBSCRIBED per device,
// then counts STATUS frames (op 5). Latency = arrival wall-clock time minus
// payload.sent_ns (stamped by bench/upstream_standin.py with time.time_ns()).
// HEARTBEAT (op 1, d = last s) is sent every 0.8 x heartbeat_interval; `s` must grow
// by exactly one per connection on op 5/6 frames, every break is a violation.
//
// Normally driven by bench/fanout.py:
//   node bench/loadgen.mjs CONFIG.json
// CONFIG = {"id": 0, "url": "ws://127.0.0.1:8000/ws/", "token": "...",
//           "token_url": "http://127.0.0.1:8000/api/token/" (optional, for refresh),
//           "username": "...", "password": "...", "token_refresh_s": 40,
//           "viewers": [["dev-a", "dev-b", ...], ...],   // one device list per viewer
//           "concurrency": 50, "connect_timeout_ms": 30000, "deflate": false,
//           "users": ["u1", ...] (optional, one per viewer), "tokens": {"u1": "..."}}
// stdout, one JSON object a line: {"event":"ready",...} once every viewer is
// subscribed (or failed), then {"event":"result",...} after the window.
// stdin, one JSON object a line: {"cmd":"window","t0_ms":..,"t1_ms":..,"grace_ms":..,
// "keep":false} (wall-clock ms, same clock as time.time_ns()/1e6; with "keep": true the
// process stays up after the result and counts afresh for the next window, as the ramp
// does), {"cmd":"report"} (open connections, closes, heartbeats: the idle scenario),
// {"cmd":"commands","device":"<id>","rate":20,"count":100,"timeout_ms":6000} (viewer 0
// sends COMMAND op 4 and times COMMAND_RESULT; answered by {"event":"commands",...})
// {"cmd":"tokens","tokens":{"user":"token",...}} (fresh tokens) and {"cmd":"quit"}.
// A viewer with an empty device list is ready at READY and sends no SUBSCRIBE (the
// connect storm and the command client use that).
//
// Standalone (no orchestrator; prints received counts and latency, no loss):
//   node bench/loadgen.mjs --url ws://127.0.0.1:8000/ws/ --token T --devices 100 \
//        --viewers 100 --subs 5 --warmup 3 --duration 10
// where --devices N means ids dev-0000 .. dev-(N-1) (the stand-in's default ids).

import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import readline from 'node:readline';
import WebSocket from 'ws';

// ----------------------------------------------------------------- config

function parseArgs(argv) {
  if (argv.length === 1 && argv[0].endsWith('.json')) {
    return JSON.parse(readFileSync(argv[0], 'utf8'));
  }
  const opts = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) {
      throw new Error(`bad argument ${argv[i]}; see the header of loadgen.mjs`);
    }
    opts[argv[i].slice(2)] = argv[i + 1];
  }
  const nDev = Number(opts.devices ?? 100);
  const nView = Number(opts.viewers ?? 10);
  const subs = Number(opts.subs ?? 5);
  const ids = Array.from({ length: nDev }, (_, i) => `dev-${String(i).padStart(4, '0')}`);
  const viewers = Array.from({ length: nView }, (_, v) =>
    Array.from({ length: subs }, (_, k) => ids[(v * subs + k) % nDev]));
  return {
    id: 0,
    url: opts.url ?? 'ws://127.0.0.1:8000/ws/',
    token: opts.token ?? 'bench',
    viewers,
    concurrency: Number(opts.concurrency ?? 50),
    standalone: {
      warmup_ms: Number(opts.warmup ?? 3) * 1000,
      duration_ms: Number(opts.duration ?? 10) * 1000,
      grace_ms: Number(opts.grace ?? 2) * 1000,
    },
  };
}

const cfg = parseArgs(process.argv.slice(2));
const GEN = cfg.id ?? 0;
const nowMs = () => performance.timeOrigin + performance.now();
const log = (msg) => process.stderr.write(`[loadgen ${GEN}] ${msg}\n`);
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

// ----------------------------------------------------------------- latency histogram
// Bucket i < 100000: [i, i+1) microseconds. Then 1 ms buckets up to 60.1 s; the last
// bucket also holds everything slower. bench/fanout.py decodes the same way.
const FINE = 100000;
const NBUCKETS = FINE + 60000;
const hist = new Uint32Array(NBUCKETS);
function record(latencyMs) {
  const us = latencyMs * 1000;
  let b;
  if (us < 0) { stats.negative_latency++; b = 0; }
  else if (us < FINE) b = us | 0;
  else { b = FINE + (((us - FINE) / 1000) | 0); if (b >= NBUCKETS) b = NBUCKETS - 1; }
  hist[b]++;
}

// ----------------------------------------------------------------- state

const stats = {
  status_frames: 0,       // every op 5 received
  in_window: 0,           // op 5 whose payload.sent_ns lies in [t0, t1)
  arrived_in_window: 0,   // op 5 that arrived between t0 and t1 (any sent time)
  foreign_status: 0,      // op 5 without a numeric payload.sent_ns
  unexpected_device: 0,   // op 5 for a device the viewer did not subscribe to
  seq_violations: 0,      // `s` not exactly previous + 1
  seq_gaps: 0,            // statuses skipped in a device's stand-in seq (dropped/coalesced)
  seq_dups: 0,            // stand-in seq not increasing (duplicate or reordered)
  negative_latency: 0,
  events: {},             // op 6 by t
  hb_sent: 0,
  hb_acks: 0,
  bad_frames: 0,
  closes: {},             // close code -> count, after ready
  closes_before_ready: {},
};
let win = null;            // {t0, t1, grace}
let keepAfterWindow = false; // stay up after the result (the ramp measures several windows)
const viewers = [];
const errors = [];
function noteError(msg) { if (errors.length < 20) errors.push(msg); }

let token = cfg.token;
let tokenAt = nowMs();
// Several users (the bridge limits live sessions per user): viewer i identifies as
// cfg.users[i] with tokens[user], which the orchestrator refreshes ({"cmd":"tokens"}).
let tokens = cfg.tokens ?? {};

function fetchToken() {
  return new Promise((resolve, reject) => {
    const u = new URL(cfg.token_url);
    const body = JSON.stringify({ username: cfg.username, password: cfg.password });
    const mod = u.protocol === 'https:' ? https : http;
    const req = mod.request(u, {
      method: 'POST',
      rejectUnauthorized: false,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { data += c; });
      res.on('end', () => {
        try {
          if (res.statusCode !== 200) throw new Error(`HTTP ${res.statusCode}`);
          resolve(JSON.parse(data).token);
        } catch (e) { reject(new Error(`token fetch failed: ${e.message} ${data.slice(0, 100)}`)); }
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function currentToken() {
  const refresh = (cfg.token_refresh_s ?? 40) * 1000;
  if (cfg.token_url && cfg.username && nowMs() - tokenAt > refresh) {
    try { token = await fetchToken(); tokenAt = nowMs(); }
    catch (e) { noteError(String(e.message)); tokenAt = nowMs() - refresh / 2; }
  }
  return token;
}

// ----------------------------------------------------------------- one viewer

class Viewer {
  constructor(index, devices) {
    this.index = index;
    this.devices = new Set(devices);
    this.deviceList = devices;
    this.lastS = null;
    this.lastSeq = new Map();
    this.inWindow = 0;
    this.ready = false;
    this.ws = null;
    this.hbTimer = null;
    this.connectMs = 0;
  }

  connect(tok) {
    return new Promise((resolve, reject) => {
      const started = nowMs();
      let pendingSubs = new Set(this.deviceList);
      let settled = false;
      const settle = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err); else { this.connectMs = nowMs() - started; resolve(); }
      };
      const timer = setTimeout(() => {
        settle(new Error('timed out before all SUBSCRIBED'));
        this.ws?.terminate();
      }, cfg.connect_timeout_ms ?? 30000);
      const ws = new WebSocket(cfg.url, {
        rejectUnauthorized: false,
        perMessageDeflate: Boolean(cfg.deflate),
        handshakeTimeout: cfg.connect_timeout_ms ?? 30000,
      });
      this.ws = ws;
      ws.on('message', (data) => {
        const now = nowMs();
        let msg;
        try { msg = JSON.parse(data.toString()); } catch { stats.bad_frames++; return; }
        const s = msg.s;
        if (s !== undefined && s !== null) {
          if (this.lastS !== null && s !== this.lastS + 1) stats.seq_violations++;
          this.lastS = s;
        }
        switch (msg.op) {
          case 5:
            this.onStatus(msg.d, now);
            break;
          case 6: {
            const t = msg.t;
            stats.events[t] = (stats.events[t] ?? 0) + 1;
            if (t === 'READY') {
              if (this.deviceList.length === 0) {
                this.ready = true;
                settle();
              } else {
                ws.send(JSON.stringify({ op: 7, d: { devices: this.deviceList, history: false } }));
              }
            } else if (t === 'COMMAND_RESULT') {
              commander.onResult(msg.d, now);
            } else if (t === 'SUBSCRIBED') {
              pendingSubs.delete(msg.d?.device);
              if (pendingSubs.size === 0 && !this.ready) { this.ready = true; settle(); }
            } else if (t === 'ERROR') {
              noteError(`viewer ${this.index}: ERROR ${JSON.stringify(msg.d)}`);
            }
            break;
          }
          case 0: {
            const interval = Number(msg.d?.heartbeat_interval ?? 41250);
            this.startHeartbeat(interval);
            ws.send(JSON.stringify({ op: 3, d: { token: tok } }));
            break;
          }
          case 2:
            stats.hb_acks++;
            break;
          case 1:
            ws.send('{"op":2,"d":null}');
            break;
          default:
            break;
        }
      });
      ws.on('close', (code) => {
        clearInterval(this.hbTimer);
        clearTimeout(this.hbTimer);
        const bucket = this.ready ? stats.closes : stats.closes_before_ready;
        bucket[code] = (bucket[code] ?? 0) + 1;
        if (!settled) settle(new Error(`closed ${code} before ready`));
      });
      ws.on('error', (err) => {
        if (!settled) settle(err);
        else noteError(`viewer ${this.index}: ${err.message}`);
      });
    });
  }

  startHeartbeat(intervalMs) {
    const period = Math.max(100, intervalMs * 0.8);
    const beat = () => {
      if (this.ws?.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify({ op: 1, d: this.lastS }));
        stats.hb_sent++;
      }
    };
    // First beat at a random point of the period so 1000 viewers do not beat together.
    this.hbTimer = setTimeout(() => {
      beat();
      this.hbTimer = setInterval(beat, period);
    }, Math.random() * period);
  }

  onStatus(d, now) {
    stats.status_frames++;
    const p = d?.payload;
    if (p === null || typeof p !== 'object' || typeof p.sent_ns !== 'number') {
      stats.foreign_status++;
      return;
    }
    const device = d.device;
    if (!this.devices.has(device)) stats.unexpected_device++;
    if (typeof p.seq === 'number') {
      const last = this.lastSeq.get(device);
      if (last === undefined || p.seq > last) {
        if (last !== undefined && p.seq > last + 1) stats.seq_gaps += p.seq - last - 1;
        this.lastSeq.set(device, p.seq);
      } else {
        stats.seq_dups++;
      }
    }
    if (win !== null) {
      const sentMs = p.sent_ns / 1e6; // same double arithmetic as upstream_standin.counts()
      if (sentMs >= win.t0 && sentMs < win.t1) {
        const latency = now - sentMs;
        this.inWindow++;
        stats.in_window++;
        record(latency);
        const sec = ((sentMs - win.t0) / 1000) | 0;
        secCount[sec]++;
        secSum[sec] += latency;
        if (latency > secMax[sec]) secMax[sec] = latency;
      }
      if (now >= win.t0 && now < win.t1) stats.arrived_in_window++;
    }
  }
}

// ----------------------------------------------------------------- commands
// Viewer 0 sends COMMAND (op 4) at a steady rate and times, per command, the first
// COMMAND_RESULT `sent` and the final one (`confirmed` or another result): the
// round trip browser -> server -> upstream -> server -> browser.

const commander = {
  pending: new Map(),   // client id -> send time (ms)
  sentMs: [],
  finalMs: [],
  results: {},
  issued: 0,
  seq: 0,
  done: null,

  run(msg) {
    const v = viewers.find((x) => x.ready && x.ws?.readyState === WebSocket.OPEN);
    const report = () => this.report(msg);
    if (v === undefined) {
      out({ event: 'commands', error: 'no ready connection to send commands on' });
      return;
    }
    this.pending.clear();
    this.sentMs = [];
    this.finalMs = [];
    this.results = {};
    this.issued = 0;
    const count = Number(msg.count ?? 100);
    const period = 1000 / Number(msg.rate ?? 20);
    const started = nowMs();
    const tick = () => {
      // Catch up if a timer ran late, so the rate is what was asked for.
      const due = Math.min(count, Math.floor((nowMs() - started) / period) + 1);
      while (this.issued < due) {
        const id = `c${GEN}-${++this.seq}`;
        this.pending.set(id, { t: nowMs(), sent: false });
        v.ws.send(JSON.stringify({ op: 4, d: { device: msg.device, payload: { on: this.seq % 2 === 1 }, id } }));
        this.issued++;
      }
      if (this.issued < count) setTimeout(tick, Math.max(0, started + this.issued * period - nowMs()));
      else this.done = setTimeout(report, Number(msg.timeout_ms ?? 6000));
    };
    tick();
  },

  onResult(d, now) {
    const p = d ? this.pending.get(d.id) : undefined;
    if (p === undefined) return;
    if (d.result === 'sent') {
      if (!p.sent) { p.sent = true; this.sentMs.push(now - p.t); }
      return;
    }
    this.results[d.result] = (this.results[d.result] ?? 0) + 1;
    if (d.result === 'confirmed') this.finalMs.push(now - p.t);
    this.pending.delete(d.id);
    if (this.pending.size === 0 && this.done !== null) {
      clearTimeout(this.done);
      this.done = null;
      this.report();
    }
  },

  report() {
    this.done = null;
    const pct = (arr) => {
      const a = [...arr].sort((x, y) => x - y);
      const at = (q) => (a.length ? a[Math.min(a.length - 1, Math.ceil(q * a.length) - 1)] : null);
      return { n: a.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: a.length ? a[a.length - 1] : null };
    };
    out({
      event: 'commands',
      issued: this.issued,
      results: this.results,
      unanswered: this.pending.size,
      sent_ms: pct(this.sentMs),
      confirmed_ms: pct(this.finalMs),
      errors: errors.slice(0, 5),
    });
    this.pending.clear();
  },
};

// ----------------------------------------------------------------- run

async function connectAll() {
  const started = nowMs();
  for (let i = 0; i < cfg.viewers.length; i++) viewers.push(new Viewer(i, cfg.viewers[i]));
  let next = 0;
  let failed = 0;
  const attempts = cfg.connect_attempts ?? 3;
  const worker = async () => {
    while (next < viewers.length) {
      const v = viewers[next++];
      for (let attempt = 1; attempt <= attempts; attempt++) {
        try {
          const user = cfg.users?.[v.index];
          await v.connect(user !== undefined && tokens[user] ? tokens[user] : await currentToken());
          break;
        } catch (e) {
          noteError(`viewer ${v.index} attempt ${attempt}: ${e.message}`);
          v.ws?.terminate();
          if (attempt === attempts) failed++;
          else await new Promise((r) => setTimeout(r, 200 * attempt));
        }
      }
    }
  };
  const n = Math.max(1, Math.min(cfg.concurrency ?? 50, viewers.length));
  await Promise.all(Array.from({ length: n }, worker));
  const times = viewers.filter((v) => v.ready).map((v) => v.connectMs).sort((a, b) => a - b);
  const at = (q) => (times.length ? times[Math.min(times.length - 1, Math.floor(q * times.length))] : null);
  const rampS = (nowMs() - started) / 1000;
  return {
    connected: times.length,
    failed,
    ramp_s: rampS,
    connected_per_s: rampS > 0 ? times.length / rampS : null,
    connect_ms_p50: at(0.5),
    connect_ms_p90: at(0.9),
    connect_ms_p99: at(0.99),
    connect_ms_max: times.length ? times[times.length - 1] : null,
    rss_mb: process.memoryUsage().rss / 1048576,
  };
}

// Loop delay samples include the sampling timer's own period (LOOP_RES ms): subtract it.
const LOOP_RES = 10;
const loopDelay = monitorEventLoopDelay({ resolution: LOOP_RES });
let cpuAtT0 = null;
let cpuWindow = null;
let eluAtT0 = null;
let eluWindow = null; // fraction of the window the event loop was busy: near 1 = saturated

// Per second of the window (by send time): how many, mean and max latency. A mean
// that keeps growing means the server falls further behind: it is saturated.
let secCount = new Uint32Array(0);
let secSum = new Float64Array(0);
let secMax = new Float64Array(0);

// Counters of one window, zeroed when a kept process starts counting the next one.
function resetCounts() {
  hist.fill(0);
  for (const key of ['status_frames', 'in_window', 'arrived_in_window', 'foreign_status',
    'unexpected_device', 'seq_violations', 'seq_gaps', 'seq_dups', 'negative_latency',
    'hb_sent', 'hb_acks', 'bad_frames']) stats[key] = 0;
  for (const v of viewers) v.inWindow = 0;
  errors.length = 0;
}

function startWindow(t0, t1, grace, keep = false) {
  keepAfterWindow = keep;
  const seconds = Math.ceil((t1 - t0) / 1000) + 1;
  secCount = new Uint32Array(seconds);
  secSum = new Float64Array(seconds);
  secMax = new Float64Array(seconds);
  win = { t0, t1, grace };
  setTimeout(() => {
    cpuAtT0 = process.cpuUsage();
    eluAtT0 = performance.eventLoopUtilization();
    loopDelay.reset();
    loopDelay.enable();
  }, Math.max(0, t0 - nowMs()));
  setTimeout(() => {
    const d = process.cpuUsage(cpuAtT0 ?? undefined);
    if (eluAtT0) eluWindow = performance.eventLoopUtilization(eluAtT0).utilization;
    loopDelay.disable();
    cpuWindow = { user_ms: d.user / 1000, system_ms: d.system / 1000 };
  }, Math.max(0, t1 - nowMs()));
  setTimeout(finish, Math.max(0, t1 + grace - nowMs()));
}

function percentileMs(q) {
  let total = 0;
  for (let i = 0; i < NBUCKETS; i++) total += hist[i];
  let acc = 0;
  for (let i = 0; i < NBUCKETS; i++) {
    acc += hist[i];
    if (total > 0 && acc >= q * total) return i < FINE ? (i + 0.5) / 1000 : FINE / 1000 + (i - FINE) + 0.5;
  }
  return null;
}

function finish() {
  if (cfg.standalone) {
    out({
      deliveries_per_s: stats.in_window / ((win.t1 - win.t0) / 1000),
      p50_ms: percentileMs(0.5),
      p99_ms: percentileMs(0.99),
      cpu_pct: cpuWindow ? (100 * (cpuWindow.user_ms + cpuWindow.system_ms)) / (win.t1 - win.t0) : null,
      event_loop_utilization: eluWindow,
      seq_violations: stats.seq_violations,
      seq_gaps: stats.seq_gaps,
      closes: stats.closes,
      errors: errors.slice(0, 5),
    });
    shutdown(0);
    return;
  }
  const sparse = [];
  for (let i = 0; i < NBUCKETS; i++) if (hist[i] !== 0) sparse.push([i, hist[i]]);
  const windowS = (win.t1 - win.t0) / 1000;
  out({
    event: 'result',
    id: GEN,
    viewers: viewers.length,
    ready_at_end: viewers.filter((v) => v.ws?.readyState === WebSocket.OPEN).length,
    ...stats,
    per_viewer_in_window: viewers.map((v) => v.inWindow),
    per_viewer_ready: viewers.map((v) => (v.ready ? 1 : 0)),
    hist: sparse,
    per_second: { count: Array.from(secCount), sum_ms: Array.from(secSum), max_ms: Array.from(secMax) },
    cpu: cpuWindow,
    cpu_pct: cpuWindow ? (100 * (cpuWindow.user_ms + cpuWindow.system_ms)) / (windowS * 1000) : null,
    event_loop_utilization: eluWindow,
    loop_delay_ms: {
      p50: Math.max(0, loopDelay.percentile(50) / 1e6 - LOOP_RES),
      p99: Math.max(0, loopDelay.percentile(99) / 1e6 - LOOP_RES),
      max: Math.max(0, loopDelay.max / 1e6 - LOOP_RES),
    },
    errors,
  });
  if (keepAfterWindow) {
    win = null;
    resetCounts();
  } else {
    shutdown(0);
  }
}

function shutdown(code) {
  for (const v of viewers) {
    clearInterval(v.hbTimer);
    clearTimeout(v.hbTimer);
    if (v.ws && v.ws.readyState === WebSocket.OPEN) v.ws.close(1000);
  }
  setTimeout(() => process.exit(code), 1500).unref();
  const check = setInterval(() => {
    if (viewers.every((v) => !v.ws || v.ws.readyState === WebSocket.CLOSED)) {
      clearInterval(check);
      process.exit(code);
    }
  }, 50);
}

async function main() {
  if (cfg.standalone) {
    const ramp = await connectAll();
    log(`ready: ${JSON.stringify(ramp)}`);
    const t0 = nowMs() + cfg.standalone.warmup_ms;
    startWindow(t0, t0 + cfg.standalone.duration_ms, cfg.standalone.grace_ms);
    return;
  }
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    if (!line.trim()) return;
    let msg;
    try { msg = JSON.parse(line); } catch { log(`bad control line ${line.slice(0, 80)}`); return; }
    if (msg.cmd === 'window') {
      startWindow(msg.t0_ms, msg.t1_ms, msg.grace_ms ?? 3000, Boolean(msg.keep));
    } else if (msg.cmd === 'report') {
      out({
        event: 'report',
        id: GEN,
        viewers: viewers.length,
        open: viewers.filter((v) => v.ws?.readyState === WebSocket.OPEN).length,
        ready: viewers.filter((v) => v.ready).length,
        closes: stats.closes,
        closes_before_ready: stats.closes_before_ready,
        hb_sent: stats.hb_sent,
        hb_acks: stats.hb_acks,
        seq_violations: stats.seq_violations,
        rss_mb: process.memoryUsage().rss / 1048576,
        errors: errors.slice(0, 10),
      });
    } else if (msg.cmd === 'tokens') {
      tokens = { ...tokens, ...msg.tokens };
    } else if (msg.cmd === 'commands') {
      commander.run(msg);
    } else if (msg.cmd === 'quit') {
      shutdown(0);
    }
  });
  rl.on('close', () => { if (win === null) shutdown(1); });
  const ramp = await connectAll();
  out({ event: 'ready', id: GEN, ...ramp, errors: errors.slice(0, 5) });
}

main().catch((e) => {
  log(`fatal: ${e.stack ?? e}`);
  process.exit(2);
});
