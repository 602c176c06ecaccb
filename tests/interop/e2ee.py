"""End-to-end encryption between a Hearth user and a Synapse user, with real clients: matrix-js-sdk 37 (Rust
crypto) for both (tests/browser/jssdk.test.mjs), Alice on Hearth, Bob on Synapse. Everything between them goes over
federation: the invite and join, /user/keys/query (device and cross-signing keys), /user/keys/claim (one-time
keys), to-device Olm messages (m.direct_to_device EDUs) both ways, device list updates. Bob's key backup lives on
Synapse. Run: python3 e2ee.py; exit status 0 = pass. Needs node and `npm ci` in tests/browser.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from harness import ROOT, Lab  # noqa: E402
from lab import req, synapse_register  # noqa: E402


def main():
    with Lab() as lab:
        token, user_id = synapse_register(lab.synapse.url, lab.synapse.secret, "bob", password="bob-pass")
        device_id = req(lab.synapse.url, "GET", "/_matrix/client/v3/account/whoami", token=token)["device_id"]
        session = json.dumps({"access_token": token, "user_id": user_id, "device_id": device_id})
        script = os.path.join(ROOT, "tests", "browser", "jssdk.test.mjs")
        r = subprocess.run(["node", script, lab.hearth.url, lab.synapse.url, session, "bob-pass"], cwd=os.path.dirname(script),
                           capture_output=True, text=True, timeout=300)
        for line in r.stdout.splitlines():
            if line.startswith("[js-sdk") or "passed" in line:
                print(line)
        if r.returncode != 0:
            print(r.stdout[-20000:], r.stderr[-20000:], sep="\n", file=sys.stderr)
            raise SystemExit("FAILED: js-sdk E2EE between Hearth and Synapse")
    print("e2ee with synapse: ok")


if __name__ == "__main__":
    main()
