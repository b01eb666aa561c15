"""Errors the client kit raises. Integrity alarms are typed and carry their evidence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model import wire
from model.protocol import mismatch_message
from witness.errors import WitnessBadRequest as WitnessBadRequest
from witness.errors import WitnessConflict as WitnessConflict
from witness.errors import WitnessError as WitnessError
from witness.errors import WitnessProofRejected as WitnessProofRejected
from witness.errors import WitnessReplyInvalid as WitnessReplyInvalid
from witness.errors import WitnessUnavailable as WitnessUnavailable
from witness.errors import WitnessUnknownLog as WitnessUnknownLog
from witness.errors import WitnessUntrustedSignature as WitnessUntrustedSignature

if TYPE_CHECKING:
    from model.checkpoints import CheckpointProof
    from model.envelope import SignedEvent
    from model.equivocation import EquivocationProof


class ClientError(Exception):
    """Base of every client-kit error."""


class RelayRefused(ClientError):
    """The relay answered a request with a typed error frame."""

    def __init__(
        self,
        code: wire.ErrorCode,
        message: str,
        *,
        head_seq: int | None = None,
        advice: str = "",
    ) -> None:
        super().__init__(f"{code.value}: {message}" + (f"; {advice}" if advice else ""))
        self.code = code
        self.message = message  # the relay's own words
        self.head_seq = head_seq  # with code `stale`: the head to make the request against


class RelayOverloaded(RelayRefused):
    """The relay kept shedding appends with `overloaded` until the retry deadline passed.

    `Client.append_many` (and `append`) retry `overloaded` refusals with jittered exponential
    backoff on their own; this surfaces only when the relay stayed overloaded for the whole
    `retry_for`. `stored` of the call's events were acked (their acks were checked), `pending`
    were not stored. Sending the same signed events again later is safe: appends are idempotent,
    and one already stored is answered with its original seq.
    """

    def __init__(self, message: str, *, stored: int, pending: int) -> None:
        super().__init__(
            wire.ErrorCode.OVERLOADED,
            message,
            advice="retry the same signed events later, or with a longer retry_for",
        )
        self.stored = stored
        self.pending = pending


class TooManyConnections(RelayRefused):
    """`login`/`authenticate` refused: the account already holds the most connections the relay
    allows (`max_connections_per_account`). Retrying on its own does not free a slot; this is
    not retried by `Client` or the bot kit."""

    def __init__(self, message: str) -> None:
        super().__init__(
            wire.ErrorCode.TOO_MANY_CONNECTIONS,
            message,
            advice="close another connection of this account (a second copy of this bot, a"
            " `cozy tail -f` still running), or ask the relay's operator to raise"
            " max_connections_per_account",
        )


class WrongAccountKind(ClientError):
    """A change would seat an account as another kind than the relay's directory says it is
    (an agent's account as a person, who could then manage the collab, or the reverse)."""


class ConnectionLost(ClientError):
    """The connection to the relay closed; reconnect and resume from the last verified seq.

    `unacked`, when set, is the signed event a `Client.manage` or `Client.seal_and_append` call
    had sent without receiving its ack: it may be stored. Hand it back to the same call on the
    next connection (``resend=``) so that exactly it is sent again — a new sealing or a change
    made again could be stored beside it.
    """

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"connection to the relay closed ({code}: {reason or 'no reason given'})")
        self.code = code
        self.reason = reason
        self.unacked: SignedEvent | None = None


class AccessRefused(ClientError):
    """The relay, or Cloudflare Access in front of it, refused the WebSocket upgrade.

    `status` is the HTTP status: 403 when an Access token is missing or not accepted, 503
    while the relay cannot check tokens. `reason` is the answer's text, made printable.
    """

    def __init__(self, status: int, reason: str) -> None:
        hint = (
            "retry shortly"
            if status == 503
            else "if the relay is behind Cloudflare Access, set COZY_CF_ACCESS_TOKEN (from "
            "`cloudflared access token -app=URL`) or a service token's "
            "COZY_CF_ACCESS_CLIENT_ID and COZY_CF_ACCESS_CLIENT_SECRET"
        )
        super().__init__(f"the relay refused the connection (HTTP {status}: {reason}); {hint}")
        self.status = status
        self.reason = reason


class ProtocolMismatch(ClientError):
    """The relay speaks another version of the protocol than this client (docs/protocol.md
    "Versions", ADR-0021). Not retried: every reconnect gets the same answer. The message says
    who must upgrade; `relay_protocol` is what the relay announced (None: nothing readable)."""

    def __init__(self, relay_protocol: str | None) -> None:
        super().__init__(mismatch_message(relay_protocol))
        self.relay_protocol = relay_protocol


class RelayUnreachable(ClientError):
    """The relay cannot be reached: it did not answer in time, its TLS could not be set up, or
    (the bot kit, on its first connection) it is not running or the URL is wrong. The message
    says what to check."""


class RelayIdentityChanged(ClientError):
    """The relay presented a different signing key than the one pinned in COZY_HOME."""


class BadSetting(ClientError):
    """An environment variable the client kit reads holds a value it cannot use."""


class StaleView(ClientError):
    """Not an integrity alarm: while following, no signed checkpoint of the collab dated within
    the client's staleness bound arrived (`Client.stale_after`: the relay's heartbeat interval
    plus a grace, ADR-0020). The relay stopped its heartbeats, or keeps signing an old date: the
    view may be frozen. Raised once per stale spell by the follow iterator, which can be
    iterated on; a fresher checkpoint re-arms it. `age` is in seconds, measured against this
    device's clock from the newest signed timestamp received (or from subscribing, if none)."""

    def __init__(self, collab_id: str, *, age: float, bound: float) -> None:
        super().__init__(
            f"StaleView in {collab_id}: the newest signed checkpoint of it this device has is"
            f" {age:.0f} s old (bound {bound:g} s): the relay may be freezing this view; compare"
            " heads with another member (`cozy verify`) or try again later"
        )
        self.collab_id = collab_id
        self.age = age
        self.bound = bound


class IntegrityAlarm(ClientError):
    """The relay delivered something that fails verification. Do not trust the stream."""

    def __init__(self, message: str, *, collab_id: str, seq: int | None) -> None:
        super().__init__(f"{type(self).__name__} in {collab_id} at seq {seq}: {message}")
        self.collab_id = collab_id
        self.seq = seq


class TamperDetected(IntegrityAlarm):
    """A signature, chain hash or ciphertext did not verify."""


class WithholdingDetected(IntegrityAlarm):
    """The relay skipped a seq (a gap in the history)."""


class ReorderDetected(IntegrityAlarm):
    """The relay delivered a seq out of order or again."""


class ForkDetected(IntegrityAlarm):
    """The relay's history does not pass through a head this device verified before (it was
    rolled back, or this device is being shown a different history than before)."""


class ReplayDetected(IntegrityAlarm):
    """An event this history already held was delivered again at a new position."""


class EquivocationDetected(IntegrityAlarm):
    """The relay contradicted its own signed receipt or checkpoint. `proof` is transferable
    evidence: export it with `model.equivocation.encode` (a receipt) or
    `model.checkpoints.encode` (two checkpoints) and anyone can check it with the relay key
    (`cozy evidence check`)."""

    def __init__(
        self,
        message: str,
        *,
        collab_id: str,
        seq: int | None,
        proof: EquivocationProof | CheckpointProof,
    ) -> None:
        super().__init__(message, collab_id=collab_id, seq=seq)
        self.proof = proof


class AccountTakeoverDetected(IntegrityAlarm):
    """This account's keys were re-pinned in the collab, by a proof signed with its own
    previous key, to keys this device does not hold (ADR-0017): someone who has the old key
    took the account over there. Ask an owner to remove the account from the collab."""


class ReceiptInvalid(IntegrityAlarm):
    """An ack names another event, or its receipt (checkpoint and inclusion proof) is missing,
    not signed by the relay, or does not place the event at the ack's seq."""


class QuorumNotMet(ClientError):
    """A checkpoint of a collab whose owners set a witness policy (k of these witnesses) came
    without k valid cosignatures from them: this device cannot confirm that anyone else was
    shown the same history, so it does not accept the new head (it keeps the one it holds).

    Not an integrity alarm on its own: an honest relay whose witnesses are slow or down looks
    the same. A relay showing this device a split view looks like this too (no honest witness
    cosigns both branches), so it is never silently ignored either. Retry later; if it lasts,
    ask the collab's owners to check the witnesses (`cozy witness status`)."""

    def __init__(self, message: str, *, collab_id: str, size: int) -> None:
        super().__init__(
            f"collab {collab_id}: the relay's head of {size} events is not cosigned by the"
            f" collab's witness quorum ({message}); retry in a few seconds, and if it lasts ask"
            " an owner to check the witnesses"
        )
        self.collab_id = collab_id
        self.size = size


class PostUnconfirmed(QuorumNotMet):
    """The relay stored (acked) this device's event in a collab with a witness policy, but no
    head the witness quorum cosigned includes it within the grace: other members may never be
    shown it, and this device is the only one that knows (docs/ordering.md). Not an integrity
    alarm (the witnesses may be slow or down). The event is stored: posting it again would post
    it twice."""

    def __init__(self, why: str, *, collab_id: str, seq: int, size: int) -> None:
        ClientError.__init__(
            self,
            f"collab {collab_id}: the relay stored your event at seq {seq}, but {why}, so other"
            f" members may not see it; do not post it again: run `cozy verify {collab_id}` in a"
            " minute, and if it lasts ask an owner to check the witnesses",
        )
        self.collab_id = collab_id
        self.size = size
        self.seq = seq


class NotAMember(ClientError):
    """The account named is not a member of the collab as this device's verified view folds it
    (a direct message — `Session.dm`, a bot's `ctx.dm` — to someone outside it, or removed)."""

    def __init__(self, message: str, *, collab_id: str = "", account_id: str = "") -> None:
        super().__init__(message)
        self.collab_id = collab_id
        self.account_id = account_id


class NoSuchAttachment(ClientError):
    """No attachment this account can read in the collab has the ref asked for."""

    def __init__(self, message: str, *, collab_id: str, ref: str) -> None:
        super().__init__(message)
        self.collab_id = collab_id
        self.ref = ref
