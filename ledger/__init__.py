"""The append-only Postgres event ledger (blocking API; call it from worker threads)."""

from ledger._accounts import AccountRow as AccountRow
from ledger._accounts import AgentRow as AgentRow
from ledger._accounts import KeystoreRow as KeystoreRow
from ledger._artifacts import ArtifactRow as ArtifactRow
from ledger._artifacts import SweepReport as SweepReport
from ledger._events import AppendRequest as AppendRequest
from ledger._events import FramePage as FramePage
from ledger._events import Page as Page
from ledger._events import StoredAt as StoredAt
from ledger._integrity import LedgerReport as LedgerReport
from ledger._store import Ledger as Ledger
from ledger._store import migrate as migrate
from ledger._throttle import LockoutRow as LockoutRow
from ledger._throttle import LoginPolicy as LoginPolicy
from ledger.errors import AlreadyExists as AlreadyExists
from ledger.errors import HandleTaken as HandleTaken
from ledger.errors import InvalidInput as InvalidInput
from ledger.errors import KeysChanged as KeysChanged
from ledger.errors import LedgerError as LedgerError
from ledger.errors import LedgerUnavailable as LedgerUnavailable
from ledger.errors import QuotaExceeded as QuotaExceeded
from ledger.errors import SchemaNotReady as SchemaNotReady
from ledger.errors import SchemaTooNew as SchemaTooNew
from ledger.errors import SequencingConflict as SequencingConflict
from ledger.errors import StaleVersion as StaleVersion
from ledger.errors import UnknownReference as UnknownReference
