"""SO-3 against a relay whose account directory lies: clients verify with fold-pinned keys.

The relay serves `get_account`, and a hostile one answers it with keys of its own — or never
answers it. Neither may matter to attribution: the real client kit verifies every event against
the keys its own fold of the signed membership proofs pinned, so an honest event verifies even
though the directory disagrees, and an event signed with the directory's key is refused.
"""

from __future__ import annotations

import nacl.signing
import pytest
import trio

from clientkit import TamperDetected, connect
from model import content as contentmod
from model import wire
from model.envelope import seal_event
from tests.collab_sim import Sim
from tests.evil_relay import EvilRelay
from tests.helpers import TS0, Person


def _collab_with_a_forgery() -> tuple[Sim, Person, Person, nacl.signing.SigningKey, int]:
    """Alice (owner) and Bob in a collab; Alice posts honestly; then the relay appends a post
    in Alice's name signed with the key its directory hands out for her, sealed under the real
    collab key (as if a member had leaked it) so that only the signature can give it away."""
    alice, bob = Person(), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    honest = sim.post(alice, "the honest one")
    directory_key = nacl.signing.SigningKey.generate()
    sim.force(
        seal_event(
            signing_key=directory_key,
            collab_key=sim.keys[0],
            collab_id=sim.collab_id,
            actor_id=alice.id,
            kind="msg",
            ts=TS0 + 99,
            content=contentmod.encode_content(contentmod.Message("pay mallory")),
        )
    )
    return sim, alice, bob, directory_key, honest


@pytest.mark.objective("SO-3")
@pytest.mark.parametrize("directory", ["lying", "silent"])
async def test_clients_verify_with_fold_pinned_keys_whatever_the_directory_says(
    directory: str,
) -> None:
    sim, alice, bob, directory_key, honest = _collab_with_a_forgery()
    forged = sim.head.seq
    lie = wire.AccountInfo(
        rid=0,
        account_id=alice.id,
        handle="alice",
        sign_pk=bytes(directory_key.verify_key),
        box_pk=bytes(alice.box.public_key),
    )
    evil = EvilRelay(
        sim.collab_id,
        sim.events,
        directory={alice.id: lie, "alice": lie},
        silent_directory=directory == "silent",
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(evil.serve)
        async with connect(url) as client:
            await client.authenticate(bob.id)
            if directory == "lying":
                # The directory really does claim the attacker's key is Alice's.
                assert (await client.account(alice.id)).sign_pk == bytes(directory_key.verify_key)
            asked = evil.directory_requests
            seen: list[int] = []
            # A silent directory must not stall verification: it is never consulted.
            with trio.fail_after(10), pytest.raises(TamperDetected) as alarm:
                async with client.history(sim.collab_id, bob.box) as events:
                    async for entry in events:
                        seen.append(entry.seq)
                        if entry.seq == honest:
                            # Verified under the key Alice's genesis pinned, not the directory's.
                            assert isinstance(entry.content, contentmod.Message)
                            assert entry.content.text == "the honest one"
            assert evil.directory_requests == asked, "verification consulted the directory"
        nursery.cancel_scope.cancel()
    assert alarm.value.seq == forged
    assert seen == list(range(1, forged)), "everything before the forgery verified"
