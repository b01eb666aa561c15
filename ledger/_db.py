"""What every ledger module shares: translating driver errors into `ledger.errors`.

Its own module so that the `Ledger` class and the mixins it inherits (`ledger._accounts`, …) can
all use it without importing each other.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg
import psycopg.errors

from ledger.errors import (
    AlreadyExists,
    InvalidInput,
    LedgerUnavailable,
    SchemaNotReady,
    UnknownReference,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaNotReady("the ledger schema is missing: run `cozy relay migrate`") from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        raise UnknownReference("the account or collab this refers to does not exist") from exc
    except psycopg.errors.UniqueViolation as exc:
        raise AlreadyExists("a row with this identity already exists") from exc
    except psycopg.DataError as exc:
        # A value Postgres cannot store (a NUL character, an out-of-range number): the input's
        # fault, not the database's. Name the SQLSTATE only; the message may quote the value.
        raise InvalidInput(f"the database refused a value ({exc.sqlstate})") from exc
    except psycopg.OperationalError as exc:
        raise LedgerUnavailable(
            f"the database is unavailable: {exc.sqlstate or 'connection'}"
        ) from exc
