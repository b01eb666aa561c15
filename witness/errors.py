"""What asking a tlog witness to cosign can end in (witness/submit.py), one type per answer.

Here, not in the client kit, because both sides ask witnesses: the relay gathers cosignatures
for its collabs (relay/_witnessing.py) and the client kit re-exports these for any other log.
"""

from __future__ import annotations


class WitnessError(Exception):
    """A tlog witness did not cosign a checkpoint. The subclass says why; `url` is the witness,
    `status` its HTTP status (None when there was no answer)."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(f"witness {url}: {message}")
        self.url = url
        self.status = status


class WitnessConflict(WitnessError):
    """409: the witness's last cosigned size for this origin is `size`, not the request's old
    size (or it is the same size with another root: a fork, if the log signed both). Resubmit
    with a consistency proof from `size`; never from a checkpoint the log did not sign."""

    def __init__(self, message: str, *, url: str, size: int) -> None:
        super().__init__(message, url=url, status=409)
        self.size = size


class WitnessProofRejected(WitnessError):
    """422: the consistency proof does not lead from the witness's last cosigned checkpoint to
    this one. Either the proof was built wrong or the log forked; the witness will not cosign."""


class WitnessUnknownLog(WitnessError):
    """404: the witness does not witness this origin. Ask its operator to add the log."""


class WitnessUntrustedSignature(WitnessError):
    """403: no signature on the checkpoint verifies under a key the witness trusts for its
    origin. Check the log key the witness was configured with."""


class WitnessBadRequest(WitnessError):
    """400 (or 413): the witness found the request malformed; its own words are in the message."""


class WitnessUnavailable(WitnessError):
    """The witness could not be reached, timed out, or answered with a server error. Retry."""


class WitnessReplyInvalid(WitnessError):
    """The witness answered 200 with something that is not a valid cosignature by its key
    over this checkpoint. Do not count it toward a quorum; tell the witness's operator."""
