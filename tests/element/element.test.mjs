// Element Web (built by build.mjs) in headless Chromium, served by the same reverse proxy (Caddy) that fronts
// Hearth, as a deployment does. Usage: node element.test.mjs PUBLIC_URL ARTIFACTS_DIR
//
// Bob (through the API) makes a room with some history and invites Alice; Alice signs in with Element's login form,
// Element follows the login answer's well_known (the proxy), sets up her keys (cross-signing through the
// `unstable` prefix, which Element 1.7 uses), opens the room, reads the history, sends a message from the composer
// (Bob reads it through the API), sees Bob's reply arrive live, sees Bob's edit ("(edited)") and reaction, and after a
// reload is still signed in and sees all of it (edit and reaction from the server's aggregations); then searches.
// On failure a screenshot, the page HTML and the browser console are written to ARTIFACTS_DIR.
import {chromium} from "../browser/node_modules/playwright-core/index.mjs";
import {mkdirSync, writeFileSync} from "node:fs";
import {join} from "node:path";

const [base, artifacts] = process.argv.slice(2);
if (!base || !artifacts) {
    console.error("usage: node element.test.mjs PUBLIC_URL ARTIFACTS_DIR");
    process.exit(2);
}
const log = (...a) => console.log(`[element ${new Date().toISOString().slice(11, 23)}]`, ...a);

async function api(method, path, token, body) {
    const headers = {"content-type": "application/json"};
    if (token) headers.authorization = `Bearer ${token}`;
    const res = await fetch(`${base}${path}`, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    const json = await res.json().catch(() => null);
    if (!res.ok) throw new Error(`${method} ${path} -> ${res.status} ${JSON.stringify(json)}`);
    return json;
}
const c = p => `/_matrix/client/v3${p}`;
const enc = encodeURIComponent;
async function register(username, password) {
    const r = await api("POST", c("/register"), null, {username, password, auth: {type: "m.login.dummy"}});
    return {token: r.access_token, userId: r.user_id};
}

const bob = await register("bob", "bob-element-pass");
const alice = await register("alice", "alice-element-pass");
const room = (await api("POST", c("/createRoom"), bob.token, {name: "Porch", preset: "private_chat", invite: [alice.userId]})).room_id;
await api("POST", c(`/join/${enc(room)}`), alice.token, {});
for (let i = 0; i < 5; i++) {
    await api("PUT", c(`/rooms/${enc(room)}/send/m.room.message/h${i}`), bob.token, {msgtype: "m.text", body: `history ${i}`});
}
log("room", room);

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({viewport: {width: 1280, height: 800}});
const consoleLines = [];
page.on("console", m => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on("pageerror", e => consoleLines.push(`pageerror: ${e.message}`));
const failures = [];
page.on("response", r => {
    // Element asks for things no server of today has (groups, its own version file): only the API's 5xx count.
    if (r.status() >= 500) failures.push(`${r.status()} ${r.request().method()} ${r.url()}`);
});
let ok = false;
try {
    await page.goto(`${base}/#/login`);
    await page.waitForSelector("form input[type=password]", {timeout: 60000});
    await page.fill("form input[type=text]", "alice");
    await page.fill("form input[type=password]", "alice-element-pass");
    await page.click("form input[type=submit]");
    log("signed in through the login form");
    await page.waitForSelector(".mx_RoomTile >> text=Porch", {timeout: 60000});
    const hs = await page.evaluate(() => localStorage.getItem("mx_hs_url"));
    if (hs !== base) throw new Error(`Element stores homeserver ${hs}, not the proxy ${base}`);
    log("room list shown; Element uses", hs);
    await page.click(".mx_RoomTile >> text=Porch");
    await page.waitForSelector("text=history 4", {timeout: 30000});
    await page.waitForSelector("text=history 0", {timeout: 30000});
    log("history shown");
    const composer = ".mx_BasicMessageComposer_input";
    await page.click(composer);
    await page.keyboard.type("hello from Element", {delay: 10});
    await page.press(composer, "Enter");
    let seen = false;
    for (let i = 0; i < 60 && !seen; i++) {
        const m = await api("GET", c(`/rooms/${enc(room)}/messages?dir=b&limit=10`), bob.token);
        seen = m.chunk.some(e => e.sender === alice.userId && e.content?.body === "hello from Element");
        if (!seen) await new Promise(r => setTimeout(r, 500));
    }
    if (!seen) throw new Error("Bob never received Alice's message from Element's composer");
    log("Bob received Alice's message");
    await api("PUT", c(`/rooms/${enc(room)}/send/m.room.message/r1`), bob.token, {msgtype: "m.text", body: "reply from Bob"});
    await page.waitForSelector("text=reply from Bob", {timeout: 30000});
    log("Bob's reply arrived live");
    // An edit (m.replace) and a reaction (m.annotation) from Bob, shown as Element shows them: the new text marked
    // "(edited)", and a reaction pill counting one.
    const typo = (await api("PUT", c(`/rooms/${enc(room)}/send/m.room.message/t1`), bob.token, {msgtype: "m.text", body: "a mesage with a typo"})).event_id;
    await page.waitForSelector("text=a mesage with a typo", {timeout: 30000});
    await api("PUT", c(`/rooms/${enc(room)}/send/m.room.message/e1`), bob.token, {
        msgtype: "m.text", body: "* a message, fixed", "m.new_content": {msgtype: "m.text", body: "a message, fixed"},
        "m.relates_to": {rel_type: "m.replace", event_id: typo},
    });
    await page.waitForSelector("text=a message, fixed", {timeout: 30000});
    await page.waitForSelector(".mx_EventTile_edited", {timeout: 30000});
    log("Bob's edit shown as edited");
    const mine = (await api("GET", c(`/rooms/${enc(room)}/messages?dir=b&limit=20`), bob.token)).chunk
        .find(e => e.sender === alice.userId && e.content?.body === "hello from Element").event_id;
    await api("PUT", c(`/rooms/${enc(room)}/send/m.reaction/k1`), bob.token, {"m.relates_to": {rel_type: "m.annotation", event_id: mine, key: "👍"}});
    await page.waitForSelector(".mx_ReactionsRowButton >> text=👍", {timeout: 30000});
    log("Bob's reaction shown");
    await page.reload();
    await page.waitForSelector("text=reply from Bob", {timeout: 60000});
    await page.waitForSelector("text=hello from Element", {timeout: 30000});
    // After a reload the edit and the reaction come from the server's answers (bundled aggregations, relations).
    await page.waitForSelector("text=a message, fixed", {timeout: 30000});
    await page.waitForSelector(".mx_ReactionsRowButton >> text=👍", {timeout: 30000});
    if (await page.$("text=a mesage with a typo")) throw new Error("the edited message shows its old text after a reload");
    log("still signed in after a reload, edit and reaction kept");
    // Server-side search from the room header.
    await page.click(".mx_RoomHeader_searchButton");
    await page.fill(".mx_SearchBar_input input", "history");
    await page.press(".mx_SearchBar_input input", "Enter");
    await page.waitForSelector(".mx_RoomView_searchResultsPanel >> text=hello from Element", {timeout: 30000});
    await page.waitForSelector(".mx_RoomHeader_searchStatus >> text=results", {timeout: 30000});
    log("search found Bob's history");
    const setupFailed = await page.$("text=Unable to set up keys");
    if (setupFailed) throw new Error("Element says: Unable to set up keys");
    if (failures.length) throw new Error(`server errors: ${failures.join(", ")}`);
    ok = true;
} catch (e) {
    log("FAILED:", e.message);
    mkdirSync(artifacts, {recursive: true});
    await page.screenshot({path: join(artifacts, "element.png")}).catch(() => {});
    writeFileSync(join(artifacts, "element.html"), await page.content().catch(() => ""));
    writeFileSync(join(artifacts, "element-console.txt"), consoleLines.join("\n"));
}
await browser.close();
if (ok) log("Element Web passed");
process.exit(ok ? 0 : 1);
