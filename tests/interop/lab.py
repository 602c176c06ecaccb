"""Stdlib helpers for Hearth <-> Synapse interop tests on loopback."""
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request


def q(s):
    return urllib.parse.quote(s, safe="")


def req(base, method, path, body=None, token=None, ok=(200,), timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(base + path, data=data, method=method)
    r.add_header("Content-Type", "application/json")
    if token:
        r.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    js = json.loads(raw) if raw else {}
    if status not in ok:
        raise RuntimeError(f"{method} {path} -> {status} {js}")
    return js


def synapse_register(base, secret, user, password="pw", admin=False):
    nonce = req(base, "GET", "/_synapse/admin/v1/register")["nonce"]
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), user.encode(), password.encode(), b"admin" if admin else b"notadmin"]))
    js = req(base, "POST", "/_synapse/admin/v1/register",
             {"nonce": nonce, "username": user, "password": password, "admin": admin, "mac": mac.hexdigest()})
    return js["access_token"], js["user_id"]


def hearth_register(base, user, password="pw"):
    js = req(base, "POST", "/_matrix/client/v3/register",
             {"username": user, "password": password, "auth": {"type": "m.login.dummy"}})
    return js["access_token"], js["user_id"]


def wait_for(fn, timeout=30, what="condition"):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until timeout
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def send_text(base, token, room, body):
    txn = str(time.time_ns())
    return req(base, "PUT", f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/{txn}",
               {"msgtype": "m.text", "body": body}, token)["event_id"]


def messages(base, token, room, limit=50):
    js = req(base, "GET", f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=b&limit={limit}", token=token)
    return js["chunk"]


def bodies(base, token, room):
    return [e["content"].get("body") for e in messages(base, token, room) if e["type"] == "m.room.message"]
