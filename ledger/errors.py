"""Ledger errors, translated from driver errors so callers never depend on psycopg's."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every ledger error."""


class LedgerUnavailable(LedgerError):
    """The database cannot be reached or failed mid-operation. Nothing was half-written."""


class SchemaTooNew(LedgerError):
    """The database was migrated by a newer relay. Run that version (never downgrade)."""


class SchemaNotReady(LedgerError):
    """The database has not been migrated yet. Run `cozy relay migrate`."""


class HandleTaken(LedgerError):
    """Another account already has this handle."""


class SequencingConflict(LedgerError):
    """Another writer appended to these collabs: the single-writer assumption was broken."""

    def __init__(self, message: str, collab_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.collab_ids = collab_ids or []


class UnknownReference(LedgerError):
    """The row refers to an account or collab the ledger does not have. Nothing was written."""


class AlreadyExists(LedgerError):
    """A row with this identity exists already. Nothing was written."""


class StaleVersion(LedgerError):
    """A versioned write did not name the next version. `current` is the stored one."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the stored version is {current}; write version {current + 1}")
        self.current = current


class KeysChanged(LedgerError):
    """A key rotation named other current keys than the account's stored ones (another
    rotation got there first). Nothing was written."""


class InvalidInput(LedgerError):
    """Postgres refused a value (e.g. a NUL character in text). Nothing was written."""


class QuotaExceeded(LedgerError):
    """Storing this would take an account past its storage quota. Nothing was written."""

    def __init__(self, used: int, quota: int) -> None:
        super().__init__(f"the account stores {used} bytes; its quota is {quota}")
        self.used = used
        self.quota = quota
