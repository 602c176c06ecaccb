"""Hearth <-> Synapse interop scenarios (issue #3). Run: python3 scenarios.py [name ...]; exit status 0 = all pass."""
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
from harness import Lab  # noqa: E402
from lab import bodies, hearth_register, q, req, send_text, synapse_register, wait_for  # noqa: E402


def users(lab, tag):
    n = f"{tag}{time.time_ns() % 10**9}"
    st, su = synapse_register(lab.synapse.url, lab.synapse.secret, "s" + n, admin=True)
    ht, hu = hearth_register(lab.hearth.url, "h" + n)
    return st, su, ht, hu


def state_map(base, token, room):
    ev = req(base, "GET", f"/_matrix/client/v3/rooms/{q(room)}/state", token=token)
    return {(e["type"], e["state_key"]): e["event_id"] for e in ev}


def joined(base, token, room):
    return sorted(req(base, "GET", f"/_matrix/client/v3/rooms/{q(room)}/joined_members", token=token)["joined"])


def hearth_joins_synapse_room(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "a")
    alias = f"pub{time.time_ns() % 10**9}"
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "name": "interop", "room_alias_name": alias}, st)["room_id"]
    send_text(S, st, room, "hello from synapse")
    # by alias
    got = req(H, "POST", f"/_matrix/client/v3/join/{q('#' + alias + ':' + lab.synapse.server_name)}", {}, ht)["room_id"]
    assert got == room, (got, room)
    send_text(H, ht, room, "hello from hearth")
    wait_for(lambda: "hello from hearth" in bodies(S, st, room), what="hearth message on synapse")
    send_text(S, st, room, "second from synapse")
    wait_for(lambda: "second from synapse" in bodies(H, ht, room), what="synapse message on hearth")
    wait_for(lambda: joined(H, ht, room) == joined(S, st, room) == sorted([su, hu]), what="same member lists")
    wait_for(lambda: state_map(H, ht, room) == state_map(S, st, room), what="same room state")
    # by id (a second Hearth user)
    ht2, hu2 = hearth_register(H, f"h2{time.time_ns() % 10**9}")
    room2 = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "name": "by id"}, st)["room_id"]
    req(H, "POST", f"/_matrix/client/v3/join/{q(room2)}?server_name={q(lab.synapse.server_name)}", {}, ht2)
    wait_for(lambda: hu2 in joined(S, st, room2), what="join by id seen on synapse")


def synapse_joins_hearth_room(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "b")
    alias = f"hr{time.time_ns() % 10**9}"
    room = req(H, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "name": "on hearth", "room_alias_name": alias}, ht)["room_id"]
    send_text(H, ht, room, "before join")
    req(S, "POST", f"/_matrix/client/v3/join/{q('#' + alias + ':' + lab.hearth.server_name)}", {}, st)
    send_text(S, st, room, "hello from synapse")
    wait_for(lambda: "hello from synapse" in bodies(H, ht, room), what="synapse message on hearth")
    send_text(H, ht, room, "hello from hearth")
    wait_for(lambda: "hello from hearth" in bodies(S, st, room), what="hearth message on synapse")
    wait_for(lambda: joined(S, st, room) == joined(H, ht, room) == sorted([su, hu]), what="same member lists")
    wait_for(lambda: state_map(H, ht, room) == state_map(S, st, room), what="same room state")
    # leave and rejoin, then kick, then ban
    req(S, "POST", f"/_matrix/client/v3/rooms/{q(room)}/leave", {}, st)
    wait_for(lambda: joined(H, ht, room) == [hu], what="leave seen on hearth")
    req(S, "POST", f"/_matrix/client/v3/join/{q(room)}?server_name={q(lab.hearth.server_name)}", {}, st)
    wait_for(lambda: su in joined(H, ht, room), what="rejoin seen on hearth")
    req(H, "POST", f"/_matrix/client/v3/rooms/{q(room)}/kick", {"user_id": su, "reason": "test"}, ht)
    wait_for(lambda: room not in req(S, "GET", "/_matrix/client/v3/joined_rooms", token=st)["joined_rooms"], what="kick seen on synapse")
    req(H, "POST", f"/_matrix/client/v3/rooms/{q(room)}/ban", {"user_id": su}, ht)
    wait_for(lambda: req(S, "GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.member/{q(su)}", token=st, ok=(200, 403, 404)).get("membership") == "ban"
             or req(H, "GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.member/{q(su)}", token=ht).get("membership") == "ban", what="ban")
    r = req(S, "POST", f"/_matrix/client/v3/join/{q(room)}?server_name={q(lab.hearth.server_name)}", {}, st, ok=(403,))
    assert r["errcode"] == "M_FORBIDDEN", r


def invites_both_ways(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "c")
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "private_chat", "name": "s-inv", "invite": [hu]}, st)["room_id"]

    def hearth_invited():
        js = req(H, "GET", "/_matrix/client/v3/sync?timeout=0", token=ht)
        return js["rooms"]["invite"].get(room)
    inv = wait_for(hearth_invited, what="invite on hearth")
    types = {e["type"] for e in inv["invite_state"]["events"]}
    assert {"m.room.create", "m.room.member", "m.room.name"} <= types, types
    req(H, "POST", f"/_matrix/client/v3/join/{q(room)}", {}, ht)
    wait_for(lambda: hu in joined(S, st, room), what="accepted invite on synapse")
    room2 = req(H, "POST", "/_matrix/client/v3/createRoom", {"preset": "private_chat", "name": "h-inv"}, ht)["room_id"]
    req(H, "POST", f"/_matrix/client/v3/rooms/{q(room2)}/invite", {"user_id": su}, ht)
    wait_for(lambda: room2 in req(S, "GET", "/_matrix/client/v3/sync?timeout=0", token=st)["rooms"]["invite"], what="invite on synapse")
    req(S, "POST", f"/_matrix/client/v3/join/{q(room2)}", {}, st)
    send_text(S, st, room2, "joined via invite")
    wait_for(lambda: "joined via invite" in bodies(H, ht, room2), what="message after invite")
    # a rejected remote invite
    room3 = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "private_chat", "invite": [hu]}, st)["room_id"]
    wait_for(lambda: room3 in req(H, "GET", "/_matrix/client/v3/sync?timeout=0", token=ht)["rooms"]["invite"], what="second invite")
    req(H, "POST", f"/_matrix/client/v3/rooms/{q(room3)}/leave", {}, ht)
    wait_for(lambda: req(S, "GET", f"/_matrix/client/v3/rooms/{q(room3)}/state/m.room.member/{q(hu)}", token=st)["membership"] == "leave", what="rejection on synapse")


def backfill_history(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "d")
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat"}, st)["room_id"]
    for i in range(30):
        send_text(S, st, room, f"old {i}")
    req(H, "POST", f"/_matrix/client/v3/join/{q(room)}?server_name={q(lab.synapse.server_name)}", {}, ht)
    got = []
    frm = None
    for _ in range(10):
        path = f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=b&limit=10" + (f"&from={frm}" if frm else "")
        js = req(H, "GET", path, token=ht)
        got += [e["content"].get("body") for e in js["chunk"] if e["type"] == "m.room.message"]
        frm = js.get("end")
        if not frm:
            break
    assert [f"old {i}" for i in range(29, -1, -1)] == got, got


def state_resolution_converges(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "e")
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "power_level_content_override": {"users": {hu: 100}}}, st)["room_id"]
    req(H, "POST", f"/_matrix/client/v3/join/{q(room)}?server_name={q(lab.synapse.server_name)}", {}, ht)
    wait_for(lambda: hu in joined(S, st, room), what="join")
    for round_ in range(3):
        def set_topic(base, tok, text):
            req(base, "PUT", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.topic", {"topic": text}, tok)
        a = threading.Thread(target=set_topic, args=(S, st, f"synapse {round_}"))
        b = threading.Thread(target=set_topic, args=(H, ht, f"hearth {round_}"))
        a.start(); b.start(); a.join(); b.join()
    send_text(S, st, room, "sync point s")
    send_text(H, ht, room, "sync point h")

    def same():
        ts = req(S, "GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.topic", token=st)
        th = req(H, "GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.topic", token=ht)
        return ts == th and state_map(S, st, room) == state_map(H, ht, room)
    wait_for(same, timeout=60, what="converged state")


def outage_and_restart(lab):
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "f")
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat"}, st)["room_id"]
    req(H, "POST", f"/_matrix/client/v3/join/{q(room)}?server_name={q(lab.synapse.server_name)}", {}, ht)
    wait_for(lambda: hu in joined(S, st, room), what="join")
    lab.synapse.stop()
    send_text(H, ht, room, "while synapse was down")
    time.sleep(1)
    # Hearth dies too with the message still queued; the durable outbox must survive.
    lab.hearth.kill9()
    lab.hearth.start()
    lab.synapse.start()
    ht = req(H, "POST", "/_matrix/client/v3/login", {"type": "m.login.password", "user": hu, "password": "pw"})["access_token"]
    wait_for(lambda: "while synapse was down" in bodies(S, st, room), timeout=90, what="queued message delivered after outage")
    send_text(S, st, room, "after outage")
    wait_for(lambda: "after outage" in bodies(H, ht, room), what="synapse message after outage")


def peek_falls_back_to_a_summary(lab):
    """Issue #23: Synapse has no federation peek API (MSC2444), so a Hearth user's peek (MSC2753) into a Synapse room
    answers the room's summary from federation /hierarchy, marked summary_only, and records no peek."""
    S, H = lab.synapse.url, lab.hearth.url
    st, su, ht, hu = users(lab, "p")
    room = req(S, "POST", "/_matrix/client/v3/createRoom", {
        "preset": "public_chat", "name": "peek me", "topic": "a preview",
        "initial_state": [{"type": "m.room.history_visibility", "state_key": "",
                           "content": {"history_visibility": "world_readable"}}],
    }, st)["room_id"]
    send_text(S, st, room, "hello from synapse")
    r = req(H, "POST", f"/_matrix/client/unstable/org.matrix.msc2753/peek/{q(room)}?server_name={q(lab.synapse.server_name)}", {}, ht)
    assert r.get("summary_only") is True, r
    summary = r["summary"]
    assert summary["room_id"] == room, r
    assert summary.get("name") == "peek me" and summary.get("topic") == "a preview", r
    assert summary.get("num_joined_members") == 1, r
    assert summary.get("join_rule") == "public" and summary.get("world_readable") is True, r
    # Not a peek: nothing to sync, and the room is not followed.
    sync = req(H, "GET", "/_matrix/client/v3/sync?timeout=0", token=ht)
    assert room not in sync.get("rooms", {}).get("peek", {}), sync.get("rooms")
    req(H, "GET", f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=b", token=ht, ok=(403, 404))


SCENARIOS = [hearth_joins_synapse_room, synapse_joins_hearth_room, invites_both_ways, backfill_history,
             state_resolution_converges, outage_and_restart, peek_falls_back_to_a_summary]


def main(names):
    chosen = [s for s in SCENARIOS if not names or s.__name__ in names]
    failed = []
    with Lab() as lab:
        for sc in chosen:
            t0 = time.time()
            try:
                sc(lab)
                print(f"PASS {sc.__name__} ({time.time() - t0:.1f}s)", flush=True)
            except Exception:  # noqa: BLE001 - report and continue with the next scenario
                failed.append(sc.__name__)
                print(f"FAIL {sc.__name__} ({time.time() - t0:.1f}s)", flush=True)
                traceback.print_exc()
        if failed:
            os.environ["KEEP_LAB"] = "1"
    print(f"{len(chosen) - len(failed)}/{len(chosen)} scenarios passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
