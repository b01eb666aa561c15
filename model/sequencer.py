"""The sequencer's pure core: given a head and a batch of verified event ids, assign positions.

The relay's sequencer actor does only I/O around this: it drains its inbox, verifies, looks up
which ids the ledger already holds, calls `assign`, writes, acks. Keeping the rules here lets a
stateful property test drive them without sockets or a database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from model.chain import Head, next_head

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


class Assignment(msgspec.Struct, frozen=True):
    """Where one submitted event ended up. `duplicate` means it was already sequenced."""

    seq: int
    event_id: bytes
    chain: bytes
    duplicate: bool


def assign(
    head: Head,
    event_ids: Sequence[bytes],
    already_sequenced: Mapping[bytes, tuple[int, bytes]],
) -> tuple[Head, list[Assignment]]:
    """Give every new id the next contiguous seq; give every known id its original position.

    `already_sequenced` maps ids found in the ledger to their ``(seq, chain)``. An id repeated
    within the batch is sequenced once; later copies are reported as duplicates of the first.
    Returns the new head and one assignment per input id, in input order.
    """
    seen: dict[bytes, Assignment] = {}
    out: list[Assignment] = []
    for eid in event_ids:
        known = already_sequenced.get(eid)
        if known is not None:
            out.append(Assignment(seq=known[0], event_id=eid, chain=known[1], duplicate=True))
            continue
        first = seen.get(eid)
        if first is not None:
            out.append(Assignment(seq=first.seq, event_id=eid, chain=first.chain, duplicate=True))
            continue
        chain = next_head(head.chain, eid)
        head = Head(seq=head.seq + 1, chain=chain)
        assignment = Assignment(seq=head.seq, event_id=eid, chain=chain, duplicate=False)
        seen[eid] = assignment
        out.append(assignment)
    return head, out
