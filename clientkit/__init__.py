"""The CozyLabs client kit: connect to a relay, post, and read verified, decrypted history.

Everything a bot author needs is re-exported here.
"""

from clientkit._client import Client as Client
from clientkit._client import History as History
from clientkit._client import connect as connect
from clientkit._collab import describe as describe
from clientkit._home import Home as Home
from clientkit._home import Profile as Profile
from clientkit.errors import AccessRefused as AccessRefused
from clientkit.errors import AccountTakeoverDetected as AccountTakeoverDetected
from clientkit.errors import ClientError as ClientError
from clientkit.errors import ConnectionLost as ConnectionLost
from clientkit.errors import EquivocationDetected as EquivocationDetected
from clientkit.errors import ForkDetected as ForkDetected
from clientkit.errors import IntegrityAlarm as IntegrityAlarm
from clientkit.errors import ReceiptInvalid as ReceiptInvalid
from clientkit.errors import RelayIdentityChanged as RelayIdentityChanged
from clientkit.errors import RelayOverloaded as RelayOverloaded
from clientkit.errors import RelayRefused as RelayRefused
from clientkit.errors import ReorderDetected as ReorderDetected
from clientkit.errors import ReplayDetected as ReplayDetected
from clientkit.errors import TamperDetected as TamperDetected
from clientkit.errors import TooManyConnections as TooManyConnections
from clientkit.errors import WithholdingDetected as WithholdingDetected
from clientkit.errors import WrongAccountKind as WrongAccountKind
from model.view import CollabView as CollabView
from model.view import Entry as Entry
