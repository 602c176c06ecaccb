// The whole Hydrogen web app from hydrogen-view-sdk (what hydrogen-web's own platform/web/main.js does).
import {Platform, createNavigation, createRouter, RootViewModel, RootView, FeatureSet} from "hydrogen-view-sdk";

const assetPaths = {
    downloadSandbox: "assets/download-sandbox.html",
    worker: "assets/main.js",
    serviceWorker: "sw.js",
    olm: {wasm: "olm/olm.wasm", legacyBundle: "olm/olm_legacy.js", wasmBundle: "olm/olm.js"},
};

async function main() {
    const container = document.getElementById("app");
    const config = {defaultHomeServer: new URLSearchParams(location.search).get("hs") || location.origin};
    const platform = new Platform({container, assetPaths, config, options: {development: true}});
    await platform.init();
    const navigation = createNavigation();
    platform.setNavigation(navigation);
    const urlRouter = createRouter({navigation, history: platform.history});
    urlRouter.attach();
    const features = await FeatureSet.load(platform.settingsStorage);
    const vm = new RootViewModel({platform, urlRouter, navigation, features});
    await vm.load();
    container.appendChild(new RootView(vm).mount());
    window.__hydrogenReady = true;
}

main().catch(err => { window.__hydrogenError = `${err.message}\n${err.stack}`; console.error(err); });
