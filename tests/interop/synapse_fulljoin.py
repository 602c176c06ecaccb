"""Synapse with outbound partial-state joins turned off (the full-join baseline for benchmarks).

FederationClient.send_join is wrapped to always ask for the full state (omit_members=false).
"""
import synapse.federation.federation_client as federation_client

_send_join = federation_client.FederationClient.send_join


async def send_join_full_state(self, destinations, pdu, room_version, partial_state=True):
    return await _send_join(self, destinations, pdu, room_version, partial_state=False)


federation_client.FederationClient.send_join = send_join_full_state

from synapse.app import homeserver  # noqa: E402

homeserver.main()
