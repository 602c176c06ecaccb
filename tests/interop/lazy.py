"""Lazy joins against the real Synapse with 500-member rooms (issue #4). Prints the measured timings."""
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from harness import Lab  # noqa: E402
from lab import bodies, hearth_register, q, req, send_text, synapse_register, wait_for  # noqa: E402

MEMBERS = int(os.environ.get("LAZY_MEMBERS", "500"))


def joined(base, token, room, timeout=300):
    return sorted(req(base, "GET", f"/_matrix/client/v3/rooms/{q(room)}/joined_members", token=token, timeout=timeout)["joined"])


LAZY = q(json.dumps({"room": {"state": {"lazy_load_members": True}, "timeline": {"limit": 5}}}))


def syncing(base, token, room):
    js = req(base, "GET", f"/_matrix/client/v3/sync?timeout=0&filter={LAZY}", token=token)
    r = js["rooms"]["join"].get(room)
    return r is not None and r["summary"].get("org.matrix.msc2775.syncing", False)


def hearth_lazily_joins_big_synapse_room(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su = synapse_register(S, lab.synapse.secret, f"owner{time.time_ns() % 10**8}", admin=True)
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "name": f"big {MEMBERS}"}, st)["room_id"]
    sn = lab.synapse.server_name
    tag = time.time_ns() % 10**6

    def add(i):
        uid = f"@m{tag}_{i}:{sn}"
        req(S, "PUT", f"/_synapse/admin/v2/users/{q(uid)}", {}, st, ok=(200, 201))
        req(S, "POST", f"/_synapse/admin/v1/join/{q(room)}", {"user_id": uid}, st)
    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(add, range(MEMBERS - 1)))
    print(f"  built a {MEMBERS}-member Synapse room in {time.time() - t0:.1f}s", flush=True)
    ht, hu = hearth_register(H, f"lazy{tag}")
    t0 = time.time()
    req(H, "POST", f"/_matrix/client/v3/join/{q(room)}?server_name={q(sn)}", {}, ht)
    join_s = time.time() - t0
    was_partial = syncing(H, ht, room)
    t1 = time.time()
    send_text(H, ht, room, "sent right after the lazy join")
    wait_for(lambda: "sent right after the lazy join" in bodies(S, st, room), what="message on synapse")
    msg_s = time.time() - t1
    # /joined_members blocks until the resync is done (and moves it to the front of the queue).
    hj = joined(H, ht, room)
    resync_s = time.time() - t0
    sj = joined(S, st, room)
    assert hj == sj, (len(hj), len(sj))
    assert len(hj) == MEMBERS + 1, len(hj)
    assert not syncing(H, ht, room)
    print(f"  hearth lazy join of {MEMBERS} members: /join {join_s * 1000:.0f} ms, partial right after join: {was_partial}, "
          f"message at synapse {msg_s * 1000:.0f} ms after send, full member list after {resync_s:.2f} s", flush=True)
    assert was_partial, "the join should have been partial (Synapse serves omit_members)"


def synapse_lazily_joins_big_hearth_room(lab):
    S, H = lab.synapse.url, lab.hearth.url
    tag = time.time_ns() % 10**6
    ht, hu = hearth_register(H, f"owner{tag}")
    alias = f"bigh{tag}"
    room = req(H, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "room_alias_name": alias}, ht)["room_id"]

    def add(i):
        js = req(H, "POST", "/_matrix/client/v3/register", {"username": f"m{tag}_{i}", "auth": {"type": "m.login.dummy"}})
        req(H, "POST", f"/_matrix/client/v3/join/{q(room)}", {}, js["access_token"])
    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(add, range(MEMBERS - 1)))
    print(f"  built a {MEMBERS}-member Hearth room in {time.time() - t0:.1f}s", flush=True)
    st, su = synapse_register(S, lab.synapse.secret, f"joiner{tag}", admin=True)
    t0 = time.time()
    req(S, "POST", f"/_matrix/client/v3/join/{q('#' + alias + ':' + lab.hearth.server_name)}", {}, st)
    join_s = time.time() - t0
    send_text(S, st, room, "synapse after lazy join")
    wait_for(lambda: "synapse after lazy join" in bodies(H, ht, room), what="message on hearth")
    sj = joined(S, st, room)  # blocks until Synapse's resync against us is done
    resync_s = time.time() - t0
    hj = joined(H, ht, room)
    assert sj == hj, (len(sj), len(hj))
    assert len(hj) == MEMBERS + 1
    print(f"  synapse lazy join of our {MEMBERS}-member room: /join {join_s * 1000:.0f} ms, member lists equal after {resync_s:.2f} s", flush=True)


SCENARIOS = [hearth_lazily_joins_big_synapse_room, synapse_lazily_joins_big_hearth_room]


def main(names):
    chosen = [s for s in SCENARIOS if not names or s.__name__ in names]
    failed = []
    with Lab() as lab:
        for sc in chosen:
            t0 = time.time()
            try:
                sc(lab)
                print(f"PASS {sc.__name__} ({time.time() - t0:.1f}s)", flush=True)
            except Exception:  # noqa: BLE001
                failed.append(sc.__name__)
                print(f"FAIL {sc.__name__} ({time.time() - t0:.1f}s)", flush=True)
                traceback.print_exc()
        if failed:
            os.environ["KEEP_LAB"] = "1"
    print(f"{len(chosen) - len(failed)}/{len(chosen)} scenarios passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
