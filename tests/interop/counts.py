"""Unread notification counts, Hearth against Synapse (the reference): the same scenario run on each server alone
(a room, a second user sending plain messages, a mention, thread replies, an edit; then read receipts on the main
timeline, in a thread, private and unthreaded) and the counts in `/sync` compared after every step, summed and
per thread (`unread_thread_notifications`). Run: python3 counts.py; exit status 0 = pass.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from harness import Lab  # noqa: E402
from lab import hearth_register, q, req, synapse_register  # noqa: E402

THREADS = {"room": {"timeline": {"limit": 1, "unread_thread_notifications": True}}}
SUMMED = {"room": {"timeline": {"limit": 1}}}

# Differences from Synapse accepted on purpose (step name -> why); every other step must match.
ACCEPTED = {
    # The spec ("Receiving notifications"): "When the user updates their read receipt (either by using the API or by
    # sending an event), notifications prior to and including that event MUST be marked as read." Hearth does so for
    # the thread the event is in; Synapse has no implicit receipt (matrix-org/synapse#14837, matrix-spec#1410).
    "the reader sends a message": "implicit read receipt (spec MUST; Synapse does not)",
}


class Server:
    def __init__(self, name, base, reader, sender):
        self.name, self.base = name, base
        self.reader_tok, self.reader = reader
        self.sender_tok, self.sender = sender
        self.txn = 0

    def send(self, content, event_type="m.room.message", reader=False):
        self.txn += 1
        path = f"/_matrix/client/v3/rooms/{q(self.room)}/send/{event_type}/t{self.txn}-{time.time_ns()}"
        return req(self.base, "PUT", path, content, self.reader_tok if reader else self.sender_tok)["event_id"]

    def receipt(self, kind, event_id, thread_id=None):
        body = {} if thread_id is None else {"thread_id": thread_id}
        req(self.base, "POST", f"/_matrix/client/v3/rooms/{q(self.room)}/receipt/{kind}/{q(event_id)}", body,
            self.reader_tok)

    def counts(self):
        """(summed counts, main-timeline counts, {thread root: counts}) as the reader's /sync shows them."""
        out = []
        for f in (SUMMED, THREADS):
            # A type never sent, new each time: Synapse answers a repeated sync request from a short-lived cache.
            f = json.dumps({"room": {"timeline": {**f["room"]["timeline"], "not_types": [f"x.{time.time_ns()}"]}}})
            js = req(self.base, "GET", f"/_matrix/client/v3/sync?filter={q(f)}", token=self.reader_tok)
            room = js["rooms"]["join"][self.room]
            out.append(room)
        pair = lambda u: (u.get("notification_count", 0), u.get("highlight_count", 0))  # noqa: E731
        threads = {k: pair(v) for k, v in out[1].get("unread_thread_notifications", {}).items() if pair(v) != (0, 0)}
        return pair(out[0]["unread_notifications"]), pair(out[1]["unread_notifications"]), threads


def setup(server):
    room = req(server.base, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat"}, server.sender_tok)
    server.room = room["room_id"]
    req(server.base, "POST", f"/_matrix/client/v3/join/{q(server.room)}", {}, server.reader_tok)


def steps(s):
    """The scenario, as (step name, action) pairs; ids are kept on the server object for later steps."""
    def mention():
        s.mention = s.send({"msgtype": "m.text", "body": "hey reader, look",
                            "m.mentions": {"user_ids": [s.reader]}})

    def thread(body):
        return s.send({"msgtype": "m.text", "body": body,
                       "m.relates_to": {"rel_type": "m.thread", "event_id": s.root, "is_falling_back": True,
                                        "m.in_reply_to": {"event_id": s.root}}})

    return [
        ("joined", lambda: None),
        ("two plain messages", lambda: (setattr(s, "root", s.send({"msgtype": "m.text", "body": "plain one"})),
                                        setattr(s, "plain2", s.send({"msgtype": "m.text", "body": "plain two"})))),
        ("a mention", mention),
        ("a thread reply", lambda: setattr(s, "reply1", thread("in the thread"))),
        ("an edit", lambda: s.send({"msgtype": "m.text", "body": "* plain 2",
                                    "m.new_content": {"msgtype": "m.text", "body": "plain 2"},
                                    "m.relates_to": {"rel_type": "m.replace", "event_id": s.plain2}})),
        ("a second thread reply", lambda: setattr(s, "reply2", thread("more in the thread"))),
        ("a receipt on the main timeline (thread_id main)", lambda: s.receipt("m.read", s.mention, "main")),
        ("one more plain message", lambda: setattr(s, "last_main", s.send({"msgtype": "m.text", "body": "three"}))),
        ("a private receipt in the thread", lambda: s.receipt("m.read.private", s.reply1, s.root)),
        ("a public receipt in the thread", lambda: s.receipt("m.read", s.reply2, s.root)),
        ("a thread reply after it", lambda: thread("and a last one")),
        ("an unthreaded receipt on the main timeline", lambda: s.receipt("m.read", s.last_main)),
        ("an edit in the thread", lambda: s.send({"msgtype": "m.text", "body": "* edited",
                                                   "m.new_content": {"msgtype": "m.text", "body": "edited"},
                                                   "m.relates_to": {"rel_type": "m.replace", "event_id": s.reply2}})),
        ("a notice and a reaction", lambda: (s.send({"msgtype": "m.notice", "body": "a bot"}),
                                             s.send({"m.relates_to": {"rel_type": "m.annotation",
                                                                      "event_id": s.reply1, "key": "+1"}},
                                                    "m.reaction"))),
        ("a room mention (the sender created the room: it may notify the room)",
         lambda: s.send({"msgtype": "m.text", "body": "@room hi", "m.mentions": {"room": True}})),
        ("the reader sends a message", lambda: s.send({"msgtype": "m.text", "body": "mine"}, reader=True)),
    ]


def settled(server, want=None, timeout=10):
    """The counts once they stop moving (Synapse) or once they equal `want` (Hearth; its evaluator runs just after
    the event is stored), else what they were at the timeout."""
    end = time.time() + timeout
    last = server.counts()
    while time.time() < end:
        time.sleep(0.2)
        cur = server.counts()
        if (want is None and cur == last) or (want is not None and normalise(server, cur) == want):
            return cur
        last = cur
    return last


def normalise(server, counts):
    """Thread roots named by step, not by event id (which differ between servers)."""
    summed, main, threads = counts
    return summed, main, {("root" if k == server.root else k): v for k, v in threads.items()}


def main():
    with Lab() as lab:
        H, S = lab.hearth.url, lab.synapse.url
        syn = Server("synapse", S, synapse_register(S, lab.synapse.secret, "reader"),
                     synapse_register(S, lab.synapse.secret, "sender"))
        hea = Server("hearth", H, hearth_register(H, "reader"), hearth_register(H, "sender"))
        for server in (syn, hea):
            setup(server)
            server.root = None
        differences = []
        for (name, act_s), (_, act_h) in zip(steps(syn), steps(hea)):
            act_s()
            act_h()
            want = normalise(syn, settled(syn))
            got = normalise(hea, settled(hea, want))
            print(f"{name}: synapse {want} hearth {got}")
            if got != want and name not in ACCEPTED:
                differences.append(f"{name}: synapse {want}, hearth {got}")
            elif got != want:
                print(f"  accepted difference: {ACCEPTED[name]}")
        if differences:
            print("DIFFERENCES:", *differences, sep="\n  ")
            sys.exit(1)
        print("counts match Synapse on every step")


if __name__ == "__main__":
    main()
