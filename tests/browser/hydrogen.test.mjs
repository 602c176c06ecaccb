// Hydrogen (the full web app from hydrogen-view-sdk, built by build.mjs) in headless Chromium against a running
// Hearth. Usage: node hydrogen.test.mjs HEARTH_BASE_URL ARTIFACTS_DIR
//
// Alice logs in through Hydrogen's login form, sees the room list, opens a room, reads its history back to the first
// message (Hydrogen paginates with /messages), sees Bob's display name and avatar, sends a message from the
// composer (checked through the API as Bob), sees Bob's reply (sent through the API) arrive live, and sends a
// picture from the composer's attachment menu (uploaded, shown through authenticated media, downloaded by Bob).
// On failure a screenshot, the page HTML and the browser console are written to ARTIFACTS_DIR.

import {chromium} from "playwright-core";
import {createServer} from "node:http";
import {mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync} from "node:fs";
import {tmpdir} from "node:os";
import {dirname, extname, join, normalize} from "node:path";
import {fileURLToPath} from "node:url";
import {deflateSync} from "node:zlib";

const [hs, artifacts] = process.argv.slice(2);
if (!hs || !artifacts) {
    console.error("usage: node hydrogen.test.mjs HEARTH_BASE_URL ARTIFACTS_DIR");
    process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const HISTORY = 40;
const log = (...a) => console.log(`[hydrogen ${new Date().toISOString().slice(11, 23)}]`, ...a);

// ---- the homeserver API (setting up users and the room, and Bob's side) ----------------------------------------

async function api(method, path, token, body, raw) {
    const headers = {};
    if (token) headers.authorization = `Bearer ${token}`;
    if (body !== undefined && !raw) headers["content-type"] = "application/json";
    if (raw) headers["content-type"] = raw;
    let res, json;
    for (let attempt = 0; ; attempt++) {
        res = await fetch(`${hs}${path}`, {method, headers, body: raw ? body : body === undefined ? undefined : JSON.stringify(body)});
        json = await res.json().catch(() => null);
        if (res.status !== 429 || attempt >= 30) break;
        // Rate limited (the setup sends bursts): wait as told, like a client does.
        await new Promise(r => setTimeout(r, Math.min(json?.retry_after_ms ?? 1000, 10_000)));
    }
    if (!res.ok) throw new Error(`${method} ${path} -> ${res.status} ${JSON.stringify(json)}`);
    return json;
}
const c = p => `/_matrix/client/v3${p}`;
const enc = encodeURIComponent;

async function register(username) {
    const body = {username, password: "hydrogen-pass", auth: {type: "m.login.dummy"}};
    const r = await api("POST", c("/register"), null, body);
    return {token: r.access_token, userId: r.user_id};
}

// A 64x64 PNG (solid teal) for Bob's avatar, made here (IHDR, one zlib-compressed IDAT, IEND).
function png(size, [r, g, b]) {
    const crcTable = Array.from({length: 256}, (_, n) => {
        for (let k = 0; k < 8; k++) n = n & 1 ? 0xedb88320 ^ (n >>> 1) : n >>> 1;
        return n >>> 0;
    });
    const crc = buf => { let x = 0xffffffff; for (const byte of buf) x = crcTable[(x ^ byte) & 0xff] ^ (x >>> 8); return (x ^ 0xffffffff) >>> 0; };
    const chunk = (type, data) => {
        const head = Buffer.alloc(8); head.writeUInt32BE(data.length, 0); head.write(type, 4, "ascii");
        const tail = Buffer.alloc(4); tail.writeUInt32BE(crc(Buffer.concat([head.subarray(4), data])), 0);
        return Buffer.concat([head, data, tail]);
    };
    const ihdr = Buffer.alloc(13); ihdr.writeUInt32BE(size, 0); ihdr.writeUInt32BE(size, 4); ihdr[8] = 8; ihdr[9] = 2;
    const row = Buffer.concat([Buffer.from([0]), Buffer.from(Array.from({length: size}, () => [r, g, b]).flat())]);
    const raw = Buffer.concat(Array.from({length: size}, () => row));
    return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr), chunk("IDAT", deflateSync(raw)), chunk("IEND", Buffer.alloc(0))]);
}
const AVATAR_PNG = png(64, [0, 128, 128]);

// ---- a static server for the built app ------------------------------------------------------------------------

const TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json", ".svg": "image/svg+xml", ".woff": "font/woff", ".woff2": "font/woff2"};

function serveApp() {
    return new Promise(resolve => {
        const server = createServer((req, res) => {
            const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^(\.\.[/\\])+/, "");
            let file = join(dist, path === "/" ? "index.html" : path);
            if (!file.startsWith(dist) || !existsSync(file)) {
                res.writeHead(404).end("not found");
                return;
            }
            res.writeHead(200, {"content-type": TYPES[extname(file)] || "application/octet-stream", "cache-control": "no-store"});
            res.end(readFileSync(file));
        });
        server.listen(0, "127.0.0.1", () => resolve(server));
    });
}

// ---- the test -------------------------------------------------------------------------------------------------

const consoleLines = [];
const failedRequests = [];
let page, context, server, userDataDir;

async function run() {
    // Users, profiles, the room and its history.
    const alice = await register("alice");
    const bob = await register("bob");
    await api("PUT", c(`/profile/${enc(alice.userId)}/displayname`), alice.token, {displayname: "Alice Liddell"});
    await api("PUT", c(`/profile/${enc(bob.userId)}/displayname`), bob.token, {displayname: "Bob Builder"});
    const avatar = await api("POST", "/_matrix/media/v3/upload?filename=bob.png", bob.token, AVATAR_PNG, "image/png");
    await api("PUT", c(`/profile/${enc(bob.userId)}/avatar_url`), bob.token, {avatar_url: avatar.content_uri});
    const {room_id: roomId} = await api("POST", c("/createRoom"), bob.token, {name: "Tea Party", preset: "private_chat", invite: [alice.userId]});
    await api("POST", c(`/join/${enc(roomId)}`), alice.token, {});
    for (let i = 1; i <= HISTORY; i++) {
        await api("PUT", c(`/rooms/${enc(roomId)}/send/m.room.message/h${i}`), bob.token, {msgtype: "m.text", body: `history message ${i}`});
    }
    log(`set up ${alice.userId}, ${bob.userId}, room ${roomId} with ${HISTORY} messages`);

    server = await serveApp();
    const appUrl = `http://127.0.0.1:${server.address().port}`;
    userDataDir = mkdtempSync(join(tmpdir(), "hearth-chromium-"));
    context = await chromium.launchPersistentContext(userDataDir, {
        executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
        headless: true,
        viewport: {width: 1280, height: 900},
        args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage", "--no-first-run"],
    });
    page = context.pages()[0] || await context.newPage();
    page.setDefaultTimeout(30_000);
    page.on("console", m => consoleLines.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", e => consoleLines.push(`[pageerror] ${e.message}`));
    context.on("response", r => {
        if (r.url().startsWith(hs) && r.status() >= 400) failedRequests.push(`${r.status()} ${r.request().method()} ${r.url().slice(hs.length)}`);
    });

    // 1. Log in through the form.
    await page.goto(`${appUrl}/?hs=${enc(hs)}#/login`);
    await page.waitForSelector("#username", {timeout: 60_000});
    await page.fill("#username", "alice");
    await page.fill("#password", "hydrogen-pass");
    await page.click(".PasswordLoginView button[type=submit]");
    log("submitted the login form");

    // 2. The room list shows the room.
    const roomTile = page.locator(".RoomList li", {hasText: "Tea Party"});
    await roomTile.waitFor({timeout: 60_000});
    log("room list shows Tea Party");

    // 3. Open it: the latest history is there, with Bob's display name and avatar.
    await roomTile.click();
    await page.locator(".RoomHeader", {hasText: "Tea Party"}).waitFor();
    const messages = page.locator(".Timeline_message .Timeline_messageBody");
    await messages.filter({hasText: `history message ${HISTORY}`}).waitFor();
    await page.locator(".Timeline_messageSender", {hasText: "Bob Builder"}).first().waitFor();
    log("room open: latest history and Bob's display name shown");
    await page.waitForFunction(() => [...document.querySelectorAll(".Timeline_messageAvatar img")]
        .some(img => img.complete && img.naturalWidth > 0), null, {timeout: 30_000});
    log("Bob's avatar loaded (authenticated media thumbnail through Hydrogen's service worker)");

    // 4. Read history: scroll up until the first message (Hydrogen fills gaps with /messages).
    // (a message body also holds its time stamp, so compare the body's text without its <time>)
    const shown = body => page.evaluate(b => [...document.querySelectorAll(".Timeline_message .Timeline_messageBody")].some(el => {
        const copy = el.cloneNode(true);
        copy.querySelectorAll("time").forEach(t => t.remove());
        return copy.textContent.trim() === b;
    }), body);
    for (let i = 0; i < 60 && !(await shown("history message 1")); i++) {
        await page.evaluate(() => { const s = document.querySelector(".Timeline_scroller"); if (s) s.scrollTop = 0; });
        await page.waitForTimeout(500);
    }
    if (!(await shown("history message 1"))) throw new Error("history message 1 never appeared while scrolling up");
    for (let i = 2; i <= HISTORY; i++) {
        if (!(await shown(`history message ${i}`))) throw new Error(`history message ${i} is missing from the timeline`);
    }
    log(`scrolled back to history message 1; all ${HISTORY} history messages are in the timeline`);
    // Back to the bottom (the timeline renders only what is near the viewport), where new messages appear.
    for (let i = 0; i < 10; i++) {
        await page.evaluate(() => { const s = document.querySelector(".Timeline_scroller"); if (s) s.scrollTop = s.scrollHeight; });
        await page.waitForTimeout(100);
    }
    if (!(await shown(`history message ${HISTORY}`))) throw new Error("scrolling back down did not show the latest message");

    // 5. Send from the composer; Bob sees it through the API.
    const text = `hello from Hydrogen ${Date.now()}`;
    await page.fill(".MessageComposer_input textarea", text);
    await page.keyboard.press("Enter");
    await page.locator(".Timeline_message:not(.unsent)", {hasText: text}).waitFor();
    let seen = false;
    for (let i = 0; i < 50 && !seen; i++) {
        const r = await api("GET", c(`/rooms/${enc(roomId)}/messages?dir=b&limit=5`), bob.token);
        seen = r.chunk.some(e => e.sender === alice.userId && e.content?.body === text);
        if (!seen) await new Promise(r => setTimeout(r, 200));
    }
    if (!seen) throw new Error("Bob does not see the message sent from Hydrogen's composer");
    log("sent from the composer; Bob sees it");

    // 6. Bob replies through the API; it arrives live, under his display name.
    const reply = `reply from Bob ${Date.now()}`;
    await api("PUT", c(`/rooms/${enc(roomId)}/send/m.room.message/reply1`), bob.token, {msgtype: "m.text", body: reply});
    await messages.filter({hasText: reply}).waitFor({timeout: 30_000});
    const senderOfReply = await page.locator(".Timeline_message", {hasText: reply}).evaluate(li => {
        let el = li;
        while (el && !el.querySelector(".Timeline_messageSender")) el = el.previousElementSibling;
        return el ? el.querySelector(".Timeline_messageSender").textContent : null;
    });
    if (senderOfReply !== "Bob Builder") throw new Error(`the live reply is shown under ${senderOfReply}, not Bob Builder`);
    log("Bob's reply arrived live under 'Bob Builder'");

    // Alice's own display name is known to Hydrogen too (her message is shown under it).
    await page.locator(".Timeline_messageSender", {hasText: "Alice Liddell"}).first().waitFor();
    log("Alice's own message shows 'Alice Liddell'");

    // 7. Media: Alice sends a picture from the composer's attachment menu (upload, then Hydrogen shows it through
    //    authenticated media); Bob gets the same bytes through the API.
    const picture = png(300, [200, 40, 40]);
    const pictureFile = join(userDataDir, "red-square.png");
    writeFileSync(pictureFile, picture);
    await page.click(".MessageComposer_input .sendFile");
    const chooser = page.waitForEvent("filechooser");
    await page.locator(".menu button, .menu li", {hasText: "Send picture"}).first().click();
    await (await chooser).setFiles(pictureFile);
    let image = null;
    for (let i = 0; i < 50 && !image; i++) {
        const r = await api("GET", c(`/rooms/${enc(roomId)}/messages?dir=b&limit=5`), bob.token);
        image = r.chunk.find(e => e.sender === alice.userId && e.content?.msgtype === "m.image");
        if (!image) await new Promise(r => setTimeout(r, 200));
    }
    if (!image) throw new Error("Bob does not see the picture sent from Hydrogen");
    // The timeline renders only what is near the viewport: keep it scrolled to the bottom while waiting.
    await page.waitForFunction(() => {
        const scroller = document.querySelector(".Timeline_scroller");
        if (scroller) scroller.scrollTop = scroller.scrollHeight;
        return [...document.querySelectorAll(".Timeline_message:not(.unsent) .media img")].some(img => img.complete && img.naturalWidth > 0);
    }, null, {timeout: 30_000, polling: 250});
    const [mxcServer, mediaId] = image.content.url.slice("mxc://".length).split("/");
    const res = await fetch(`${hs}/_matrix/client/v1/media/download/${mxcServer}/${mediaId}`, {headers: {authorization: `Bearer ${bob.token}`}});
    const got = Buffer.from(await res.arrayBuffer());
    if (res.status !== 200 || !got.equals(picture)) throw new Error(`downloading the picture gave ${res.status}, ${got.length} bytes`);
    log(`picture sent from Hydrogen (${image.content.url}) is shown in the timeline and downloads intact`);
}

let ok = false;
try {
    await run();
    ok = true;
} catch (e) {
    console.error(`FAILED: ${e.stack || e}`);
    try {
        mkdirSync(artifacts, {recursive: true});
        if (page) {
            await page.screenshot({path: join(artifacts, "hydrogen-failure.png"), fullPage: true});
            writeFileSync(join(artifacts, "hydrogen-failure.html"), await page.content());
        }
        writeFileSync(join(artifacts, "hydrogen-console.log"), consoleLines.join("\n"));
        console.error(`artifacts written to ${artifacts}`);
    } catch (e2) {
        console.error(`could not save artifacts: ${e2}`);
    }
} finally {
    if (failedRequests.length) log(`Hearth answered these with errors (Hydrogen probes unstable endpoints):\n  ${failedRequests.join("\n  ")}`);
    if (!ok) console.error(consoleLines.slice(-40).join("\n"));
    await context?.close().catch(() => {});
    server?.close();
    if (userDataDir) rmSync(userDataDir, {recursive: true, force: true});
}
console.log(ok ? "1 passed, 0 failed" : "0 passed, 1 failed");
process.exit(ok ? 0 : 1);
