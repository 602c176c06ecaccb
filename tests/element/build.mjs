// Builds Element Web into tests/element/build/webapp from its npm package: riot-web@1.7.14, Element Web 1.7.14
// (November 2020) published under its old name, the last Element Web release on the npm registry (newer ones are
// only on GitHub, which CI does not reach). The package ships sources, not a built app: this does what its
// `yarn build` did, with the build tools pinned in package-lock.json (npm ci) and these adjustments for today's
// Node 20 and registry:
//  - babel.config.js, which the npm package left out (the presets and plugins its package.json lists);
//  - src/components/views/auth/VectorCustomServerDialog.js, named by the shipped component index but only shipped
//    compiled (lib/); the compiled file is used;
//  - no Jitsi download (calls are not tested): an empty jitsi_external_api.min.js;
//  - webpack 4 on Node 20: --openssl-legacy-provider, and no v8-compile-cache (it cannot load today's .mjs deps).
// Skips the work when build/webapp was built from the same lock file and this script.
import {execFileSync} from "node:child_process";
import {createHash} from "node:crypto";
import {closeSync, cpSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, symlinkSync, writeFileSync} from "node:fs";
import {dirname, join} from "node:path";
import {fileURLToPath} from "node:url";

const VERSION = "1.7.14";
const here = dirname(fileURLToPath(import.meta.url));
const build = join(here, "build");
const webapp = join(build, "webapp");
const stamp = join(webapp, ".hearth-built");
const want = createHash("sha256")
    .update(readFileSync(join(here, "package-lock.json")))
    .update(readFileSync(fileURLToPath(import.meta.url)))
    .digest("hex");
if (existsSync(stamp) && readFileSync(stamp, "utf8") === want) {
    console.log(`Element Web ${VERSION} already built in ${webapp}`);
    process.exit(0);
}
if (!existsSync(join(here, "node_modules/.bin/webpack"))) {
    console.error("tests/element/node_modules is missing: run `npm ci` in tests/element");
    process.exit(1);
}

rmSync(build, {recursive: true, force: true});
mkdirSync(build, {recursive: true});
execFileSync("npm", ["pack", `riot-web@${VERSION}`, "--pack-destination", build, "--loglevel=error"], {stdio: ["ignore", "ignore", "inherit"]});
execFileSync("tar", ["xzf", join(build, `riot-web-${VERSION}.tgz`), "-C", build, "--strip-components=1"]);
symlinkSync(join(here, "node_modules"), join(build, "node_modules"));
writeFileSync(join(build, "babel.config.js"), `module.exports = {
    presets: [
        ["@babel/preset-env", {targets: {chrome: "90"}}],
        ["@babel/preset-typescript", {allowDeclareFields: true}],
        "@babel/preset-flow",
        "@babel/preset-react",
    ],
    plugins: [
        ["@babel/plugin-proposal-decorators", {legacy: true}],
        "@babel/plugin-proposal-export-default-from",
        "@babel/plugin-proposal-numeric-separator",
        "@babel/plugin-proposal-class-properties",
        "@babel/plugin-proposal-object-rest-spread",
        "@babel/plugin-transform-flow-comments",
        "@babel/plugin-syntax-dynamic-import",
        "@babel/plugin-transform-runtime",
    ],
};
`);
const dialog = "components/views/auth/VectorCustomServerDialog.js";
cpSync(join(build, "lib", dialog), join(build, "src", dialog));

const env = {...process.env, DISABLE_V8_COMPILE_CACHE: "1", NODE_OPTIONS: "--openssl-legacy-provider --max-old-space-size=3072"};
execFileSync("node", ["scripts/copy-res.js"], {cwd: build, env, stdio: ["ignore", "ignore", "inherit"]});
mkdirSync(webapp, {recursive: true});
writeFileSync(join(webapp, "jitsi_external_api.min.js"), "");
const logPath = join(build, "webpack.log");
const log = openSync(logPath, "w");
try {
    execFileSync(join(here, "node_modules/.bin/webpack"), ["--mode", "development"], {cwd: build, env, stdio: ["ignore", log, log]});
} catch (e) {
    closeSync(log);
    const text = readFileSync(logPath, "utf8");
    console.error(text.split("\n").filter(l => /ERROR|Error/.test(l)).slice(0, 40).join("\n") || text.slice(-4000));
    console.error(`webpack failed (${e.status}); whole log in ${logPath}`);
    process.exit(1);
}
closeSync(log);
writeFileSync(stamp, want);
console.log(`built Element Web ${VERSION} into ${webapp}`);
