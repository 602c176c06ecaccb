"""Hearth's pushes through a real Sygnal (the reference push gateway) to a push service on loopback.

Sygnal runs with one test app of its `webpush` pushkin: the pusher's `data.endpoint` names where Sygnal sends the
(encrypted) push, so a fake push service on loopback receives it (Sygnal's FCM and APNs pushkins have Google's and
Apple's addresses built in). Sygnal comes from $SYGNAL_PYTHON or target/sygnal-venv/bin/python (see tests/README.md:
it is not on the package index this project's CI reaches, so CI skips this test). The push service
decrypts each push with the subscription's keys and checks what Sygnal made of Hearth's notification: a message in a
DM, then a mention with the badge count, never the user's own message. Run: python3 sygnal.py; exit status 0 = pass.
"""
import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from harness import ROOT, Hearth, free_port, wait_http  # noqa: E402
from lab import hearth_register, q, req, send_text, wait_for  # noqa: E402


def sygnal_python():
    for cand in [os.environ.get("SYGNAL_PYTHON"), os.path.join(ROOT, "target", "sygnal-venv", "bin", "python")]:
        if cand and os.path.exists(cand):
            return cand
    return None


def b64(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class PushService(http.server.BaseHTTPRequestHandler):
    """A Web Push service: keeps each POSTed body (encrypted, aes128gcm) and answers 201."""
    got = []
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - http.server's name
        try:
            self.receive()
        except Exception as e:  # noqa: BLE001 - shown in the failure output
            print(f"push service: {e!r} {dict(self.headers)}", file=sys.stderr)
            raise

    def receive(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # Twisted's client sends chunks
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    break
                body += chunk
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        PushService.got.append((dict(self.headers), body))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    py = sygnal_python()
    if py is None:
        # Asked to run without Sygnal: fail, so that a missing gateway is never counted as a pass.
        sys.exit("no Sygnal: set SYGNAL_PYTHON or install it into target/sygnal-venv (tests/README.md says how)")
    # The subscription's keys, made with the `cryptography` Sygnal's own environment has (via pywebpush).
    keys = subprocess.run([py, "-c", """
import base64, os, json
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
k = ec.generate_private_key(ec.SECP256R1())
pub = k.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
e = lambda b: base64.urlsafe_b64encode(b).decode().rstrip('=')
n = k.private_numbers().private_value.to_bytes(32, 'big')
print(json.dumps({"p256dh": e(pub), "auth": e(os.urandom(16)), "private": e(n)}))
"""], check=True, capture_output=True, text=True)
    sub = json.loads(keys.stdout)
    work = tempfile.mkdtemp(prefix="hearth-sygnal-")
    push_port, sygnal_port = free_port(), free_port()
    service = http.server.ThreadingHTTPServer(("127.0.0.1", push_port), PushService)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    vapid = os.path.join(work, "vapid.pem")
    subprocess.run([py, "-c", f"""
from py_vapid import Vapid
v = Vapid(); v.generate_keys(); v.save_key({vapid!r})
"""], check=True, capture_output=True)
    with open(os.path.join(work, "sygnal.yaml"), "w") as f:
        f.write(f"""log:
  setup:
    version: 1
    handlers: {{file: {{class: logging.FileHandler, filename: {work}/sygnal.log}}}}
    root: {{handlers: [file], level: INFO}}
    disable_existing_loggers: false
  access: {{x_forwarded_for: false}}
http:
  bind_addresses: ['127.0.0.1']
  port: {sygnal_port}
metrics: {{prometheus: {{enabled: false}}, opentracing: {{enabled: false}}, sentry: {{enabled: false}}}}
apps:
  org.example.webpush:
    type: webpush
    vapid_private_key: {vapid}
    vapid_contact_email: test@example.org
    allowed_endpoints: ["127.0.0.1:{push_port}"]
""")
    sygnal = subprocess.Popen([py, "-m", "sygnal.sygnal"], cwd=work, env={**os.environ, "SYGNAL_CONF": f"{work}/sygnal.yaml",
                                                         # the matrix-org snapshot stops unless told to run
                                                         "RUN_DESPITE_UNSUPPORTED": "Y"},
                              stdout=open(os.path.join(work, "sygnal.out"), "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    hearth = Hearth(work, "[push]\nallow_private_gateways = true\nretry_base_ms = 100\n")
    ok = False
    try:
        wait_for(lambda: sygnal.poll() is None and port_open(sygnal_port), 60, "sygnal up")
        hearth.start()
        H = hearth.url
        alice_tok, alice = hearth_register(H, "alice")
        bob_tok, _ = hearth_register(H, "bob")
        room = req(H, "POST", "/_matrix/client/v3/createRoom", {"is_direct": True, "invite": [alice]}, bob_tok)["room_id"]
        req(H, "POST", f"/_matrix/client/v3/join/{q(room)}", {}, alice_tok)
        wait_for(lambda: req(H, "GET", "/_matrix/client/v3/notifications", token=alice_tok)["notifications"], 10,
                 "the invite evaluated")
        req(H, "POST", "/_matrix/client/v3/pushers/set", {
            "kind": "http", "app_id": "org.example.webpush", "pushkey": sub["p256dh"], "app_display_name": "Web",
            "device_display_name": "Browser", "lang": "en",
            "data": {"url": f"http://127.0.0.1:{sygnal_port}/_matrix/push/v1/notify",
                     "endpoint": f"http://127.0.0.1:{push_port}/push/alice", "auth": sub["auth"]}}, alice_tok)
        send_text(H, alice_tok, room, "my own message")
        hello = send_text(H, bob_tok, room, "hello through sygnal")
        pushes = wait_for(lambda: [decrypt(py, sub, b) for _, b in PushService.got] or None, 20, "a push")
        first = pushes[0]
        assert first["event_id"] == hello, first
        assert first["content"]["body"] == "hello through sygnal", first
        assert first["sender"] and first["room_id"] == room, first
        mention = send_text(H, bob_tok, room, "alice: look")
        later = wait_for(lambda: [p for p in (decrypt(py, sub, b) for _, b in PushService.got)
                                  if p.get("event_id") == mention] or None, 20, "the mention's push")
        assert later[0]["unread"] == 1, later[0]  # the badge: one room with unread notifications
        bodies = [decrypt(py, sub, b).get("content", {}).get("body") for _, b in PushService.got]
        assert "my own message" not in bodies, bodies
        print(f"{len(PushService.got)} pushes through Sygnal, decrypted and checked: {bodies}")
        ok = True
    finally:
        hearth.stop()
        if sygnal.poll() is None:
            os.killpg(sygnal.pid, 15)
            sygnal.wait(20)
        service.shutdown()
        if ok and not os.environ.get("KEEP_LAB"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"lab kept at {work}", file=sys.stderr)
            for name in ["sygnal.log", "sygnal.out", "hearth/log"]:
                path = os.path.join(work, name)
                if os.path.exists(path):
                    print(f"---- tail of {name}", *open(path, errors="replace").read().splitlines()[-30:],
                          sep="\n", file=sys.stderr)


def port_open(port):
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def decrypt(py, sub, body):
    """The push's JSON: aes128gcm (RFC 8291) decrypted with the subscription's private key, in Sygnal's Python."""
    out = subprocess.run([py, "-c", """
import base64, json, sys, http_ece
from cryptography.hazmat.primitives.asymmetric import ec
d = lambda s: base64.urlsafe_b64decode(s + '=' * (-len(s) % 4))
sub = json.loads(sys.argv[1])
key = ec.derive_private_key(int.from_bytes(d(sub['private']), 'big'), ec.SECP256R1())
print(http_ece.decrypt(sys.stdin.buffer.read(), private_key=key, auth_secret=d(sub['auth']),
                       version='aes128gcm').decode())
""", json.dumps(sub)], input=body, check=True, capture_output=True)
    return json.loads(out.stdout)


if __name__ == "__main__":
    main()
