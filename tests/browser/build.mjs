// Builds the Hydrogen app into tests/browser/dist: the entry bundled with esbuild, plus Hydrogen's assets
// (worker, download sandbox, service worker, theme) and olm's wasm.
import {build} from "esbuild";
import {cpSync, mkdirSync, rmSync} from "node:fs";
import {dirname, join} from "node:path";
import {fileURLToPath} from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist");
const sdk = join(here, "node_modules/hydrogen-view-sdk");
const olm = join(here, "node_modules/@matrix-org/olm");

rmSync(out, {recursive: true, force: true});
mkdirSync(join(out, "olm"), {recursive: true});
await build({
    entryPoints: [join(here, "app/main.js")],
    bundle: true,
    format: "esm",
    outfile: join(out, "main.bundle.js"),
    // olm.js has Node-only branches (require of crypto/fs/path) that never run in a browser.
    external: ["crypto", "fs", "path"],
    logLevel: "warning",
});
cpSync(join(here, "app/index.html"), join(out, "index.html"));
cpSync(join(sdk, "asset-build/assets"), join(out, "assets"), {recursive: true});
cpSync(join(sdk, "lib-build/sw.js"), join(out, "sw.js"));
for (const f of ["olm.wasm", "olm.js", "olm_legacy.js"]) {
    cpSync(join(olm, f), join(out, "olm", f));
}
console.log(`built Hydrogen into ${out}`);
