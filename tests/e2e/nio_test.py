#!/usr/bin/env python3
"""End-to-end test of Hearth with matrix-nio, a real client library.

Usage: python3 tests/e2e/nio_test.py BASE_URL   (e.g. http://127.0.0.1:8008; registration must be enabled)

Two users register, one creates a room and invites the other, who joins; they exchange messages, sync
incrementally with a lazy-loading filter, and a display name change shows up in the other user's view of the
member event. Exits 0 on success, 1 with a message on the first failed check.
"""

import asyncio
import sys
import uuid

from nio import (
    AsyncClient,
    InviteMemberEvent,
    JoinResponse,
    ProfileSetDisplayNameResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomInviteResponse,
    RoomMemberEvent,
    RoomMessageText,
    RoomMessagesResponse,
    RoomSendResponse,
    SyncResponse,
    WhoamiResponse,
)

PASSWORD = "nio-test-password"
LAZY_FILTER = {"room": {"state": {"lazy_load_members": True}, "timeline": {"limit": 20}}}


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)
    print(f"ok: {what}")


def expect(resp, cls, what):
    if not isinstance(resp, cls):
        raise Failed(f"{what}: expected {cls.__name__}, got {type(resp).__name__}: {resp}")
    print(f"ok: {what}")
    return resp


async def sync(client, what):
    resp = await client.sync(timeout=0, sync_filter=LAZY_FILTER)
    return expect(resp, SyncResponse, what)


async def wait_for(client, room_id, predicate, what, attempts=20):
    """Syncs (incrementally, lazy-loading filter, long-poll) until predicate(timeline_events) holds."""
    seen = []
    for _ in range(attempts):
        resp = await client.sync(timeout=2000, sync_filter=LAZY_FILTER)
        expect(resp, SyncResponse, f"{what}: incremental sync")
        room = resp.rooms.join.get(room_id)
        if room is not None:
            seen.extend(room.timeline.events)
            if predicate(seen):
                print(f"ok: {what}")
                return resp, seen
    raise Failed(f"{what}: not seen after {attempts} syncs; saw {seen}")


async def main(base_url):
    suffix = uuid.uuid4().hex[:8]
    alice = AsyncClient(base_url, f"alice{suffix}")
    bob = AsyncClient(base_url, f"bob{suffix}")
    try:
        # nio sends m.login.dummy in its very first /register request.
        r = expect(await alice.register(f"alice{suffix}", PASSWORD, "alice-laptop"), RegisterResponse, "alice registers")
        check(r.user_id.startswith(f"@alice{suffix}:"), "alice's user id")
        expect(await bob.register(f"bob{suffix}", PASSWORD, "bob-phone"), RegisterResponse, "bob registers")
        check(alice.access_token and bob.access_token, "both have access tokens")
        who = expect(await alice.whoami(), WhoamiResponse, "whoami")
        check(who.user_id == alice.user_id, "whoami names alice")

        # Initial syncs with the lazy-loading filter.
        await sync(alice, "alice initial sync")
        await sync(bob, "bob initial sync")

        created = expect(await alice.room_create(name="nio room", topic="end to end"), RoomCreateResponse, "alice creates a room")
        room_id = created.room_id
        expect(await alice.room_invite(room_id, bob.user_id), RoomInviteResponse, "alice invites bob")

        # Bob sees the invite in an incremental sync.
        invited = False
        for _ in range(20):
            resp = expect(await bob.sync(timeout=2000, sync_filter=LAZY_FILTER), SyncResponse, "bob syncs for the invite")
            info = resp.rooms.invite.get(room_id)
            if info is not None:
                invited = any(isinstance(e, InviteMemberEvent) and e.state_key == bob.user_id and e.membership == "invite"
                              for e in info.invite_state)
                break
        check(invited, "bob's sync has the invite with his invite member event")
        check(room_id in bob.invited_rooms, "nio lists the room as invited")

        expect(await bob.join(room_id), JoinResponse, "bob joins")
        _, events = await wait_for(bob, room_id,
                                   lambda evs: any(isinstance(e, RoomMemberEvent) and e.state_key == bob.user_id
                                                   and e.membership == "join" for e in evs),
                                   "bob sees his own join")
        check(room_id in bob.rooms, "nio lists the room as joined for bob")
        check(bob.rooms[room_id].name == "nio room", "bob knows the room name")

        # Messages both ways.
        sent = expect(await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hello bob"}),
                      RoomSendResponse, "alice sends a message")
        await wait_for(bob, room_id,
                       lambda evs: any(isinstance(e, RoomMessageText) and e.body == "hello bob"
                                       and e.sender == alice.user_id and e.event_id == sent.event_id for e in evs),
                       "bob receives alice's message")
        # With lazy loading, bob's client knows alice (the sender) by now.
        check(alice.user_id in bob.rooms[room_id].users, "bob's client has alice's member event (lazy-loaded)")

        expect(await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi alice"}),
               RoomSendResponse, "bob replies")
        await wait_for(alice, room_id,
                       lambda evs: any(isinstance(e, RoomMessageText) and e.body == "hi alice" and e.sender == bob.user_id
                                       for e in evs),
                       "alice receives bob's reply")
        check(bob.user_id in alice.rooms[room_id].users, "alice's client knows bob joined")

        # History through /messages and a single event.
        msgs = expect(await alice.room_messages(room_id, start=alice.next_batch, limit=10), RoomMessagesResponse,
                      "alice pages back through /messages")
        bodies = [e.body for e in msgs.chunk if isinstance(e, RoomMessageText)]
        check(bodies[:2] == ["hi alice", "hello bob"], f"/messages returns newest first: {bodies}")
        ev = expect(await bob.room_get_event(room_id, sent.event_id), RoomGetEventResponse, "bob fetches the event by id")
        check(isinstance(ev.event, RoomMessageText) and ev.event.body == "hello bob", "the fetched event is alice's message")

        # A display name change reaches the other user's member event.
        expect(await alice.set_displayname("Alice in Wonderland"), ProfileSetDisplayNameResponse, "alice sets a display name")
        await wait_for(bob, room_id,
                       lambda evs: any(isinstance(e, RoomMemberEvent) and e.state_key == alice.user_id
                                       and e.content.get("displayname") == "Alice in Wonderland" for e in evs),
                       "bob's sync has alice's new member event")
        check(bob.rooms[room_id].user_name(alice.user_id) == "Alice in Wonderland",
              "bob's client shows alice's new display name")
        return 0
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        await alice.close()
        await bob.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1])))
