/**
 * bridge payload encryption for Node-RED function nodes (docs/encryption.md).
 *
 * The same file goes into two function nodes of the flow; each node's last
 * line (at the very bottom) picks what it does:
 *
 *   websocket in ──> [decrypt commands] ──> ... your devices ...
 *   ... your devices ... ──> [encrypt statuses] ──> websocket out
 *
 * In each of the two function nodes:
 *
 *  1. "On Message" tab: paste this whole file, then uncomment exactly one of
 *     the two `return` lines at the bottom.
 *  2. "Setup" tab, "Modules": add module `crypto`, variable `crypto`.  Node-RED
 *     4 loads Node.js built-in modules there without installing anything; it
 *     needs `functionExternalModules` to be left at its default (true) in
 *     settings.js.  (Instead, settings.js may carry
 *     `functionGlobalContext: { crypto: require("crypto") }`: this code then
 *     finds it with `global.get("crypto")`.)
 *
 * Environment of the Node-RED process (read with env.get):
 *
 *   BRIDGE_PAYLOAD_KEY        the key that seals, 32 bytes as base64 (44
 *                             characters) or 64 hex digits; the bridge's key
 *                             file has the same key on its first line.
 *   BRIDGE_PAYLOAD_OLD_KEYS   optional, comma-separated: more keys that still
 *                             open (while a key is being rotated).
 *   BRIDGE_PAYLOAD_MAX_AGE    optional, seconds: drop commands whose `ts` is
 *                             older than this (ts is authenticated, so it can
 *                             be trusted as far as the two clocks agree).
 *
 * The envelope:  {"v":1,"kid":"<16 hex>","alg":"A256GCM","nonce":"<b64>",
 *                 "ct":"<b64>","tag":"<b64>"}
 * replaces msg.payload; group_id, command_id, user and ts stay readable and
 * are bound to it as AES-GCM associated data.  A message that does not open
 * is dropped with node.error (a Catch node sees it); nothing of its content
 * is logged.
 */
const bridgeEnvelope = (function () {
    "use strict";

    const ALG = "A256GCM";
    const KEY_BYTES = 32;
    const NONCE_BYTES = 12;
    const TAG_BYTES = 16;
    const AAD_LABEL = Buffer.from("bridge-envelope/1", "utf8");
    const KID_LABEL = Buffer.from("bridge-envelope kid", "utf8");
    const NONE = Buffer.from([0xff, 0xff, 0xff, 0xff]);
    const B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
    const HEX_KEY = /^[0-9A-Fa-f]{64}$/;
    const B64_KEY = /^[A-Za-z0-9+/_-]{43}=?$/;

    /** Node's crypto: the function node's module variable, else global context. */
    function nodeCrypto() {
        if (typeof crypto !== "undefined" && crypto && typeof crypto.createCipheriv === "function") {
            return crypto;
        }
        const fromGlobal = typeof global !== "undefined" && global && typeof global.get === "function"
            ? global.get("crypto") : undefined;
        if (fromGlobal && typeof fromGlobal.createCipheriv === "function") {
            return fromGlobal;
        }
        throw new Error("Node's crypto module is not available: add module 'crypto' as " +
            "variable 'crypto' in this function node's Setup tab");
    }

    function decodeKey(text) {
        text = String(text).trim();
        let key = null;
        if (HEX_KEY.test(text)) {
            key = Buffer.from(text, "hex");
        } else if (B64_KEY.test(text)) {
            key = Buffer.from(text.replace(/-/g, "+").replace(/_/g, "/"), "base64");
        }
        if (!key || key.length !== KEY_BYTES) {
            throw new Error("a key must be 32 bytes written as 44 base64 characters or 64 hex digits");
        }
        return key;
    }

    /** The key's id, as the bridge derives it: 16 hex digits of HMAC-SHA256(key, label). */
    function keyId(key) {
        return nodeCrypto().createHmac("sha256", key).update(KID_LABEL).digest("hex").slice(0, 16);
    }

    /** {kid, key} that seals, and every key that opens, by id. */
    function keyring() {
        const current = env.get("BRIDGE_PAYLOAD_KEY");
        if (!current) {
            throw new Error("BRIDGE_PAYLOAD_KEY is not set");
        }
        const key = decodeKey(current);
        const kid = keyId(key);
        const byKid = {};
        const old = env.get("BRIDGE_PAYLOAD_OLD_KEYS") || "";
        for (const text of String(old).split(",")) {
            if (text.trim()) {
                const k = decodeKey(text);
                byKid[keyId(k)] = k;
            }
        }
        byKid[kid] = key;
        return { kid: kid, key: key, byKid: byKid };
    }

    /** One length-prefixed field of the associated data; null/undefined is "absent". */
    function field(value) {
        if (value === null || value === undefined) {
            return NONE;
        }
        if (typeof value !== "string") {
            throw new Error("an associated-data field is not a string");
        }
        const data = Buffer.from(value, "utf8");
        const length = Buffer.alloc(4);
        length.writeUInt32BE(data.length, 0);
        return Buffer.concat([length, data]);
    }

    function commandAad(msg) {
        if (!Number.isSafeInteger(msg.ts)) {
            throw new Error("the command's ts is not an integer");
        }
        return Buffer.concat([field("command"), field(msg.group_id), field(msg.command_id),
            field(msg.user), field(String(msg.ts))]);
    }

    function statusAad(msg) {
        return Buffer.concat([field("status"), field(msg.group_id), field(msg.command_id),
            NONE, NONE]);
    }

    function fullAad(kid, aad) {
        return Buffer.concat([AAD_LABEL, field(ALG), field(kid), aad]);
    }

    function seal(payload, key, kid, aad) {
        const text = JSON.stringify(payload);
        if (text === undefined) {
            throw new Error("the payload is not JSON");
        }
        const c = nodeCrypto();
        const nonce = c.randomBytes(NONCE_BYTES);
        const cipher = c.createCipheriv("aes-256-gcm", key, nonce, { authTagLength: TAG_BYTES });
        cipher.setAAD(fullAad(kid, aad));
        const ct = Buffer.concat([cipher.update(text, "utf8"), cipher.final()]);
        return {
            v: 1, kid: kid, alg: ALG,
            nonce: nonce.toString("base64"),
            ct: ct.toString("base64"),
            tag: cipher.getAuthTag().toString("base64"),
        };
    }

    function unb64(value, name, length) {
        if (typeof value !== "string" || !B64.test(value)) {
            throw new Error("the envelope's " + name + " is not standard base64");
        }
        const data = Buffer.from(value, "base64");
        if (length !== undefined && data.length !== length) {
            throw new Error("the envelope's " + name + " must be " + length + " bytes");
        }
        return data;
    }

    function open(envelope, byKid, aad) {
        if (!envelope || typeof envelope !== "object" || Array.isArray(envelope)) {
            throw new Error("the payload is not an encrypted envelope");
        }
        if (envelope.v !== 1) {
            throw new Error("unsupported envelope version");
        }
        if (envelope.alg !== ALG) {
            throw new Error("unsupported envelope algorithm");
        }
        const kid = envelope.kid;
        if (typeof kid !== "string" || !Object.prototype.hasOwnProperty.call(byKid, kid)) {
            throw new Error("unknown key id");
        }
        const nonce = unb64(envelope.nonce, "nonce", NONCE_BYTES);
        const ct = unb64(envelope.ct, "ct");
        const tag = unb64(envelope.tag, "tag", TAG_BYTES);
        const decipher = nodeCrypto().createDecipheriv("aes-256-gcm", byKid[kid], nonce,
            { authTagLength: TAG_BYTES });
        decipher.setAAD(fullAad(kid, aad));
        decipher.setAuthTag(tag);
        let text;
        try {
            text = Buffer.concat([decipher.update(ct), decipher.final()]).toString("utf8");
        } catch (e) {
            throw new Error("authentication failed: wrong key, tampered envelope, or sealed " +
                "for another device, command or direction");
        }
        return JSON.parse(text);
    }

    /** After `websocket in`: the command's payload in clear, or null (dropped). */
    function decryptCommand(msg) {
        try {
            if (typeof msg.group_id !== "string" || typeof msg.command_id !== "string") {
                throw new Error("not a command from the bridge");
            }
            const keys = keyring();
            const payload = open(msg.payload, keys.byKid, commandAad(msg));
            const maxAge = Number(env.get("BRIDGE_PAYLOAD_MAX_AGE") || 0);
            if (maxAge > 0 && Date.now() - msg.ts > maxAge * 1000) {
                throw new Error("the command is older than BRIDGE_PAYLOAD_MAX_AGE");
            }
            msg.payload = payload;
            return msg;
        } catch (e) {
            node.error("bridge: dropped a command that does not open: " + e.message, msg);
            return null;
        }
    }

    /** Before `websocket out`: the status with its payload sealed, or null (dropped). */
    function encryptStatus(msg) {
        try {
            if (typeof msg.group_id !== "string") {
                throw new Error("the status has no group_id");
            }
            const keys = keyring();
            msg.payload = seal(msg.payload, keys.key, keys.kid, statusAad(msg));
            return msg;
        } catch (e) {
            node.error("bridge: could not seal a status: " + e.message, msg);
            return null;
        }
    }

    return { decryptCommand: decryptCommand, encryptStatus: encryptStatus, keyId: keyId };
})();

// The node's last line: uncomment exactly one.
// return bridgeEnvelope.decryptCommand(msg);   // after `websocket in`: commands from the bridge
// return bridgeEnvelope.encryptStatus(msg);    // before `websocket out`: statuses to the bridge
