/**
 * Node-RED settings for running the demo flow behind the bridge.
 *
 * Usable as-is:
 *
 *     export BRIDGE_NODERED_SECRET="$(cat /path/to/link-secret)"
 *     node-red --settings examples/nodered/settings.js --userDir ~/.node-red-bridge
 *
 * and copy examples/nodered/flows.json to <userDir>/flows.json first.
 *
 * What matters for the bridge (docs/nodered.md has the whole story):
 *
 *  - Node-RED listens on 127.0.0.1 only.  Put it on another interface only
 *    together with TLS (the `https` block below) and the link secret.
 *  - `httpNodeAuth` does NOT protect `websocket in` listeners.  The link is
 *    protected by `webSocketNodeVerifyClient` below, which accepts a WebSocket
 *    handshake only when it carries `Authorization: Bearer <secret>` and the
 *    secret equals the environment variable BRIDGE_NODERED_SECRET (the bridge
 *    reads the same secret from --nodered-secret-file or the same variable).
 *  - It protects every `websocket in` listener of this Node-RED, not only
 *    /ws/bridge: any other WebSocket client needs the same header.
 *
 * Everything not set here keeps Node-RED's default; see
 * https://nodered.org/docs/user-guide/runtime/settings-file
 */

const crypto = require("crypto");
// const fs = require("fs");   // needed by the https block below

const LINK_SECRET_ENV = "BRIDGE_NODERED_SECRET";

/**
 * Build the verifyClient hook for Node-RED's WebSocket server (the `ws`
 * package).  Node-RED passes it straight to `new ws.Server({verifyClient})`;
 * because the function takes two arguments, `ws` calls it as
 * `(info, callback)` and a refusal can carry its own HTTP status:
 *   401 - no bearer token in the handshake,
 *   403 - a bearer token that is not the secret.
 * The secret is read once, when Node-RED loads this file.
 */
function makeLinkVerifier(secret) {
    if (!secret) {
        let warned = false;
        return function verifyWebSocketClient(info, callback) {
            if (!warned) {
                warned = true;
                console.warn(
                    "[bridge] " + LINK_SECRET_ENV + " is not set: WebSocket listeners " +
                    "accept every client. Set it (and the bridge's link secret) to protect the link."
                );
            }
            callback(true);
        };
    }
    // Compare SHA-256 digests: equal length by construction, so timingSafeEqual
    // never throws and the time taken says nothing about the secret.
    const expected = crypto.createHash("sha256").update(secret, "utf8").digest();
    return function verifyWebSocketClient(info, callback) {
        const header = info.req.headers["authorization"];
        const match = typeof header === "string" ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
        if (!match) {
            callback(false, 401, "Unauthorized", {"WWW-Authenticate": 'Bearer realm="bridge"'});
            return;
        }
        const offered = crypto.createHash("sha256").update(match[1], "utf8").digest();
        if (!crypto.timingSafeEqual(offered, expected)) {
            callback(false, 403, "Forbidden");
            return;
        }
        callback(true);
    };
}

module.exports = {
    /** The flow file inside userDir; copy examples/nodered/flows.json there. */
    flowFile: "flows.json",
    flowFilePretty: true,

    /**
     * The demo flow holds no credentials, so none are encrypted (Node-RED logs
     * "Using unencrypted credentials" once).  If you add nodes that keep
     * credentials, set NODE_RED_CREDENTIAL_SECRET to a key of your own and keep it.
     */
    credentialSecret: process.env.NODE_RED_CREDENTIAL_SECRET || false,

    /** Only local clients: the bridge runs on the same host. */
    uiPort: process.env.PORT || 1880,
    uiHost: "127.0.0.1",

    /**
     * The editor lives under /nodered/ so the bridge can proxy it 1:1 to users
     * with the bridge.use_nodered permission:
     *   twistd -n bridge --nodered-admin http://127.0.0.1:1880/nodered/ ...
     * Flows' own HTTP and WebSocket endpoints stay under "/" (httpNodeRoot).
     */
    httpAdminRoot: "/nodered/",

    /**
     * TLS for the editor and for the `websocket in` listeners (the bridge then
     * dials wss://HOST:1880/ws/bridge with --nodered-ca FILE).  Uncomment the
     * `fs` require at the top as well.
     *
     * For mutual TLS also give the CA that signed the bridge's client
     * certificate and require one (the bridge: --nodered-cert FILE
     * --nodered-key FILE).  Note that requestCert applies to the editor too.
     */
    // https: {
    //     key: fs.readFileSync("/etc/node-red/tls/server.key"),
    //     cert: fs.readFileSync("/etc/node-red/tls/server.crt"),
    //     // ca: fs.readFileSync("/etc/node-red/tls/bridge-clients-ca.crt"),
    //     // requestCert: true,
    //     // rejectUnauthorized: true,
    // },
    // requireHttps: true,

    /**
     * Protect the editor and admin API as well (bcrypt hash of the password,
     * `node-red admin hash-pw`); see https://nodered.org/docs/user-guide/runtime/securing-node-red
     */
    // adminAuth: {
    //     type: "credentials",
    //     users: [{username: "admin", password: "$2b$08$...", permissions: "*"}],
    // },

    /** Checks the bridge's `Authorization: Bearer <secret>` header (see above). */
    webSocketNodeVerifyClient: makeLinkVerifier(process.env[LINK_SECRET_ENV]),

    /** Close handshakes to WebSocket paths that no flow listens on. */
    inboundWebSocketTimeout: 5000,

    diagnostics: {
        enabled: true,
        ui: true,
    },
    runtimeState: {
        enabled: false,
        ui: false,
    },
    telemetry: {
        enabled: false,
        updateNotification: false,
    },

    logging: {
        console: {
            level: "info",
            metrics: false,
            audit: false,
        },
    },

    exportGlobalContextKeys: false,
    externalModules: {},

    editorTheme: {
        tours: false,
    },

    functionExternalModules: false,
    globalFunctionTimeout: 0,
    functionTimeout: 0,
    // The payload-encryption snippet (crypto-function.js) finds Node's
    // crypto module here: global.get("crypto").
    functionGlobalContext: { crypto },
    debugMaxLength: 1000,
};
