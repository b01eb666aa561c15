"""The CozyLabs client kit: connect to a relay, post, and read verified, decrypted history.

Everything a bot author needs is re-exported here: the bot kit (`Bot`, `Context`, `arg`), the
client, the errors (with the relay's `ErrorCode`s), and the builders of management changes a
person's client signs (`Client.manage(..., lambda view: add_member(view, member))`).
"""

from clientkit import _collab
from clientkit._agent import AgentCredentials as AgentCredentials
from clientkit._agent import CredentialsError as CredentialsError
from clientkit._bot_commands import arg as arg
from clientkit._bot_context import Author as Author
from clientkit._bot_context import BotRemoved as BotRemoved
from clientkit._bot_context import BotSetupError as BotSetupError
from clientkit._bot_context import Context as Context
from clientkit._client import Client as Client
from clientkit._client import History as History
from clientkit._client import connect as connect
from clientkit._collab import change_role as change_role
from clientkit._collab import describe as describe
from clientkit._collab import member_for as member_for
from clientkit._collab import set_caps as set_caps
from clientkit._connection import StaleBound as StaleBound
from clientkit._home import Home as Home
from clientkit._home import Profile as Profile
from clientkit._outbox import Sent as Sent
from clientkit._session import Attached as Attached
from clientkit._session import Identity as Identity
from clientkit._session import Keys as Keys
from clientkit._session import Session as Session
from clientkit.bot import Bot as Bot
from clientkit.errors import AccessRefused as AccessRefused
from clientkit.errors import AccountTakeoverDetected as AccountTakeoverDetected
from clientkit.errors import BadSetting as BadSetting
from clientkit.errors import ClientError as ClientError
from clientkit.errors import ConnectionLost as ConnectionLost
from clientkit.errors import EquivocationDetected as EquivocationDetected
from clientkit.errors import ForkDetected as ForkDetected
from clientkit.errors import IntegrityAlarm as IntegrityAlarm
from clientkit.errors import NoSuchAttachment as NoSuchAttachment
from clientkit.errors import NotAMember as NotAMember
from clientkit.errors import PostUnconfirmed as PostUnconfirmed
from clientkit.errors import ProtocolMismatch as ProtocolMismatch
from clientkit.errors import QuorumNotMet as QuorumNotMet
from clientkit.errors import ReceiptInvalid as ReceiptInvalid
from clientkit.errors import RelayIdentityChanged as RelayIdentityChanged
from clientkit.errors import RelayOverloaded as RelayOverloaded
from clientkit.errors import RelayRefused as RelayRefused
from clientkit.errors import RelayUnreachable as RelayUnreachable
from clientkit.errors import ReorderDetected as ReorderDetected
from clientkit.errors import ReplayDetected as ReplayDetected
from clientkit.errors import StaleView as StaleView
from clientkit.errors import TamperDetected as TamperDetected
from clientkit.errors import TooManyConnections as TooManyConnections
from clientkit.errors import WithholdingDetected as WithholdingDetected
from clientkit.errors import WitnessBadRequest as WitnessBadRequest
from clientkit.errors import WitnessConflict as WitnessConflict
from clientkit.errors import WitnessError as WitnessError
from clientkit.errors import WitnessProofRejected as WitnessProofRejected
from clientkit.errors import WitnessReplyInvalid as WitnessReplyInvalid
from clientkit.errors import WitnessUnavailable as WitnessUnavailable
from clientkit.errors import WitnessUnknownLog as WitnessUnknownLog
from clientkit.errors import WitnessUntrustedSignature as WitnessUntrustedSignature
from clientkit.errors import WrongAccountKind as WrongAccountKind
from model.epochs import NotARecipient as NotARecipient
from model.membership import Member as Member
from model.membership import MemberKind as MemberKind
from model.membership import Role as Role
from model.view import CollabView as CollabView
from model.view import Entry as Entry
from model.wire import ErrorCode as ErrorCode
from witness.submit import submit_checkpoint as submit_checkpoint

# Management changes, for `Client.manage(signing_key, box_key, collab_id, change)`: each builds
# the change against the caller's own verified view (only a person may sign one).
add_member = _collab.add
remove_member = _collab.remove
rotate_key = _collab.rotate
