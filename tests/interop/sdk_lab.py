"""The Synapse side of the matrix-rust-sdk lazy-join test (tests/rust-sdk/tests/element_x.rs,
`element_x_lazily_joins_a_big_synapse_room`): starts the lab (a Hearth and a Synapse that federate), builds a
room on Synapse with many members (LAZY_SDK_MEMBERS, default 300) and a few messages, registers a Hearth user,
then answers the Rust test's questions, one per line on stdin, one answer line each on stdout:

  READY key=value ...        (printed once the lab and the room are ready)
  partial                 -> "partial true|false": whether Hearth's /sync still shows the room as being resynced
  has <text>              -> "has true|false": whether a message with this body reached Synapse (waits up to 60 s)
  members                 -> "members N": the room's joined member count on Synapse
  quit                    -> stops the lab

Synapse comes from target/synapse-venv (what .ci/run installs) or $SYNAPSE_PYTHON; Hearth is $HEARTHTEST_BIN.
"""
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from harness import Lab  # noqa: E402
from lab import bodies, hearth_register, q, req, send_text, synapse_register, wait_for  # noqa: E402

MEMBERS = int(os.environ.get("LAZY_SDK_MEMBERS", "300"))
LAZY = q(json.dumps({"room": {"state": {"lazy_load_members": True}, "timeline": {"limit": 1}}}))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def answer(line):
    print(line, flush=True)


def build_room(lab):
    S = lab.synapse.url
    tag = time.time_ns() % 10**6
    st, su = synapse_register(S, lab.synapse.secret, f"owner{tag}", admin=True)
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "name": f"big synapse room {MEMBERS}"},
               st)["room_id"]
    sn = lab.synapse.server_name

    def add(i):
        uid = f"@m{tag}_{i}:{sn}"
        req(S, "PUT", f"/_synapse/admin/v2/users/{q(uid)}", {}, st, ok=(200, 201))
        req(S, "POST", f"/_synapse/admin/v1/join/{q(room)}", {"user_id": uid}, st)
    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(add, range(MEMBERS - 1)))
    for i in range(3):
        send_text(S, st, room, f"before the join {i}")
    log(f"sdk_lab: built a {MEMBERS}-member Synapse room in {time.time() - t0:.1f}s")
    return st, room


def main():
    with Lab() as lab:
        S, H = lab.synapse.url, lab.hearth.url
        st, room = build_room(lab)
        name = f"lazy{time.time_ns() % 10**6}"
        ht, hu = hearth_register(H, name)
        answer(f"READY hearth={H} synapse_server={lab.synapse.server_name} room={room} user={name} password=pw "
               f"members={MEMBERS}")
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            try:
                if cmd == "partial":
                    js = req(H, "GET", f"/_matrix/client/v3/sync?timeout=0&filter={LAZY}", token=ht)
                    r = js["rooms"]["join"].get(room)
                    syncing = r is not None and r["summary"].get("org.matrix.msc2775.syncing", False)
                    answer(f"partial {str(bool(syncing)).lower()}")
                elif cmd == "has":
                    try:
                        wait_for(lambda: arg in bodies(S, st, room), timeout=60, what="the message on Synapse")
                        answer("has true")
                    except AssertionError:
                        answer("has false")
                elif cmd == "members":
                    js = req(S, "GET", f"/_matrix/client/v3/rooms/{q(room)}/joined_members", token=st)
                    answer(f"members {len(js['joined'])}")
                elif cmd == "quit":
                    break
                else:
                    answer(f"error unknown command {cmd}")
            except Exception as e:  # noqa: BLE001 - the Rust side reports it
                answer(f"error {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
