// matrix-js-sdk 37 (Rust crypto, WebAssembly) in Node against Hearth.
// Usage: node jssdk.test.mjs HEARTH_BASE_URL [BOB_BASE_URL BOB_SESSION_JSON BOB_PASSWORD]
// With the second form Bob lives on another server (a Synapse, or a second Hearth) and everything between the two
// users goes over federation; his session (`{access_token, user_id, device_id}`) was made by the caller.
//
// Two users, each a js-sdk client with `startClient({lazyLoadMembers: true})` and Rust crypto (in-memory store),
// with cross-signing bootstrapped (device_signing/upload behind password UIA, signatures/upload) and a key backup
// created; Alice makes an encrypted room, Bob joins, each sends an encrypted message that the other decrypts
// (device keys, one-time key claims, to-device Olm, Megolm). A third client for Bob then restores the room key
// from the backup, Alice's client learns of that new device (device list update) and it decrypts her next message.

import * as sdk from "matrix-js-sdk";
import {logger} from "matrix-js-sdk/lib/logger.js";

const [hs, bobHs = hs, bobSessionJson, bobPassword] = process.argv.slice(2);
if (!hs) {
    console.error("usage: node jssdk.test.mjs HEARTH_BASE_URL [BOB_BASE_URL BOB_SESSION_JSON BOB_PASSWORD]");
    process.exit(2);
}
logger.setLevel(process.env.JSSDK_DEBUG ? "debug" : "warn");
// The Rust crypto (WebAssembly) logs through console.debug.
if (!process.env.JSSDK_DEBUG) console.debug = () => {};
const log = (...a) => console.log(`[js-sdk ${new Date().toISOString().slice(11, 23)}]`, ...a);
const PASSWORD = "js-sdk-pass";

async function api(method, path, token, body, base = hs) {
    const headers = {"content-type": "application/json"};
    if (token) headers.authorization = `Bearer ${token}`;
    let res, json;
    for (let attempt = 0; ; attempt++) {
        res = await fetch(`${base}/_matrix/client/v3${path}`, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
        json = await res.json().catch(() => null);
        if (res.status !== 429 || attempt >= 30) break;
        await new Promise(r => setTimeout(r, Math.min(json?.retry_after_ms ?? 1000, 10_000))); // rate limited: wait as told
    }
    if (!res.ok) throw new Error(`${method} ${path} -> ${res.status} ${JSON.stringify(json)}`);
    return json;
}

async function register(username) {
    return api("POST", "/register", null, {username, password: PASSWORD, auth: {type: "m.login.dummy"}});
}

async function login(base, username, password, deviceId) {
    return api("POST", "/login", null, {type: "m.login.password", identifier: {type: "m.id.user", user: username}, password, device_id: deviceId}, base);
}

function withTimeout(promise, ms, what) {
    let t;
    return Promise.race([promise, new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms); })])
        .finally(() => clearTimeout(t));
}

async function startClient(session, base = hs) {
    const client = sdk.createClient({baseUrl: base, accessToken: session.access_token, userId: session.user_id, deviceId: session.device_id});
    await client.initRustCrypto({useIndexedDB: false});
    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
            if (state === "PREPARED") resolve();
            if (state === "ERROR") reject(new Error(`sync error: ${data?.error}`));
        });
    });
    await client.startClient({lazyLoadMembers: true, initialSyncLimit: 20});
    await withTimeout(prepared, 30_000, `${session.user_id} initial sync`);
    return client;
}

/// Cross-signing keys uploaded behind password UIA, then a server-side key backup.
async function setUpEncryption(client, username, password = PASSWORD) {
    const crypto = client.getCrypto();
    await crypto.bootstrapCrossSigning({
        authUploadDeviceSigningKeys: async makeRequest => {
            await makeRequest({type: "m.login.password", identifier: {type: "m.id.user", user: username}, password});
        },
        setupNewCrossSigning: true,
    });
    const status = await crypto.getCrossSigningStatus();
    if (!status.publicKeysOnDevice || !status.privateKeysCachedLocally.masterKey) throw new Error(`cross-signing not set up: ${JSON.stringify(status)}`);
    if (!(await crypto.isCrossSigningReady())) throw new Error("cross-signing is not ready");
    await crypto.resetKeyBackup();
    await waitFor(`${username}'s key backup to be active`, async () => !!(await crypto.getActiveSessionBackupVersion()));
    return crypto.getActiveSessionBackupVersion();
}

/// Resolves with the first decrypted m.room.message in `roomId` with `body`.
function waitForDecrypted(client, roomId, body) {
    return new Promise((resolve, reject) => {
        const check = event => {
            if (event.getRoomId() !== roomId || event.isBeingDecrypted()) return;
            if (event.isDecryptionFailure()) {
                log(`${client.getUserId()}: decryption failure for ${event.getId()}: ${event.decryptionFailureReason}`);
                return;
            }
            if (event.getType() === "m.room.message" && event.getContent().body === body) {
                if (!event.isEncrypted()) reject(new Error(`"${body}" arrived unencrypted`));
                else resolve(event);
            }
        };
        client.on(sdk.MatrixEventEvent.Decrypted, check);
        client.on(sdk.RoomEvent.Timeline, check);
    });
}

async function waitFor(what, fn, ms = 30_000) {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
        if (await fn()) return;
        await new Promise(r => setTimeout(r, 200));
    }
    throw new Error(`timed out waiting for ${what}`);
}

const clients = [];
let ok = false;
try {
    const a = await register("alice");
    const b = bobSessionJson ? JSON.parse(bobSessionJson) : await register("bob");
    const bobPass = bobPassword || PASSWORD;
    const bobLocalpart = b.user_id.slice(1).split(":")[0];
    const alice = await startClient(a);
    const bob = await startClient(b, bobHs);
    clients.push(alice, bob);
    log(`both clients synced (lazyLoadMembers, Rust crypto): ${a.user_id} on ${hs}, ${b.user_id} on ${bobHs}`);

    const aliceBackup = await setUpEncryption(alice, "alice");
    await setUpEncryption(bob, bobLocalpart, bobPass);
    log(`cross-signing set up for both; key backups created (alice: version ${aliceBackup})`);
    const {room_id: roomId} = await alice.createRoom({
        name: "Secret garden",
        invite: [b.user_id],
        initial_state: [{type: "m.room.encryption", state_key: "", content: {algorithm: "m.megolm.v1.aes-sha2"}}],
    });
    await waitFor("bob to get the invite", () => bob.getRoom(roomId)?.getMyMembership() === "invite");
    await bob.joinRoom(roomId);
    await waitFor("alice to see bob joined", () => alice.getRoom(roomId)?.getMember(b.user_id)?.membership === "join");
    await waitFor("both to know the room is encrypted", async () =>
        (await alice.getCrypto().isEncryptionEnabledInRoom(roomId)) && (await bob.getCrypto().isEncryptionEnabledInRoom(roomId)));
    log(`encrypted room ${roomId}: bob joined`);

    const secret = `the password is swordfish ${Date.now()}`;
    const bobGets = waitForDecrypted(bob, roomId, secret);
    await alice.sendMessage(roomId, {msgtype: "m.text", body: secret});
    const got = await withTimeout(bobGets, 30_000, "bob decrypting alice's message");
    log(`bob decrypted alice's message (${got.getWireType()} -> ${got.getType()}, sender key verified: ${!got.isKeySourceUntrusted()})`);

    const answer = `understood ${Date.now()}`;
    const aliceGets = waitForDecrypted(alice, roomId, answer);
    await bob.sendMessage(roomId, {msgtype: "m.text", body: answer});
    await withTimeout(aliceGets, 30_000, "alice decrypting bob's reply");
    log("alice decrypted bob's reply");

    // The raw event on the server is encrypted: the server never sees the text.
    const raw = await api("GET", `/rooms/${encodeURIComponent(roomId)}/messages?dir=b&limit=10`, a.access_token, undefined, hs);
    if (!raw.chunk.some(e => e.type === "m.room.encrypted")) throw new Error("no m.room.encrypted event on the server");
    if (JSON.stringify(raw).includes("swordfish")) throw new Error("the plaintext reached the server");

    // Bob's room key went into his backup: a new device of Bob restores it from the backup and decrypts.
    await waitFor("bob's backup to hold the room key", async () => {
        const v = await api("GET", "/room_keys/version", b.access_token, undefined, bobHs);
        const keys = await api("GET", `/room_keys/keys?version=${v.version}`, b.access_token, undefined, bobHs);
        return Object.keys(keys.rooms?.[roomId]?.sessions ?? {}).length > 0;
    }, 60_000);
    const backupKey = await bob.getCrypto().getSessionBackupPrivateKey();
    const b2 = await login(bobHs, bobLocalpart, bobPass, "BOBSECOND");
    const bob2 = await startClient(b2, bobHs);
    clients.push(bob2);
    const info = await bob2.getCrypto().getKeyBackupInfo();
    await bob2.getCrypto().storeSessionBackupPrivateKey(backupKey, info.version);
    const restored = await bob2.getCrypto().restoreKeyBackup();
    log(`bob's second device restored ${restored.imported} of ${restored.total} keys from backup version ${info.version}`);
    if (restored.imported < 1) throw new Error("nothing restored from the key backup");
    const room2 = bob2.getRoom(roomId);
    await waitFor("bob's second device to decrypt the history", async () => {
        for (const ev of room2.getLiveTimeline().getEvents()) {
            if (ev.isEncrypted() && ev.isDecryptionFailure()) await bob2.decryptEventIfNeeded(ev, {isRetry: true});
        }
        return room2.getLiveTimeline().getEvents().some(ev => ev.getContent().body === secret);
    });
    log("bob's second device decrypted alice's message with the key from the backup");

    // Device list update: Alice's client learns of Bob's new device (over federation when Bob is elsewhere) and
    // shares her next room key with it too.
    await waitFor("alice to see bob's second device", async () =>
        (await alice.getCrypto().getUserDeviceInfo([b.user_id], true)).get(b.user_id)?.has(b2.device_id), 60_000);
    const later = `after the new device ${Date.now()}`;
    const bob2Gets = waitForDecrypted(bob2, roomId, later);
    await alice.sendMessage(roomId, {msgtype: "m.text", body: later});
    await withTimeout(bob2Gets, 30_000, "bob's second device decrypting a new message");
    log("alice saw bob's new device; it decrypted her next message");
    ok = true;
} catch (e) {
    console.error(`FAILED: ${e.stack || e}`);
} finally {
    for (const c of clients) c.stopClient();
}
console.log(ok ? "1 passed, 0 failed" : "0 passed, 1 failed");
process.exit(ok ? 0 : 1);
