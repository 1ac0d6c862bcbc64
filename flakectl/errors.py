"""flakectl's exceptions, and the one place psycopg errors are mapped to them.

Each class's docstring is its user-facing meaning; the SQLSTATE it stands for
is the one the SQL functions raise (SPEC rule 10, rule 8, `wait => false`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # psycopg is imported where it is used: `flakectl --help` does without it
    import psycopg


class FlakectlError(Exception):
    """flakectl failed."""

    sqlstate: str | None = None

    def __init__(self, message: str | None = None, *, sqlstate: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())
        if sqlstate is not None:
            self.sqlstate = sqlstate


class BadInput(FlakectlError):
    """An argument is NULL or out of range."""


class NullArgument(BadInput):
    """An argument is NULL."""

    sqlstate = "22004"


class InvalidArgument(BadInput):
    """An argument is out of range (negative lookback, expire_after < 1)."""

    sqlstate = "22023"


class LockNotAvailable(FlakectlError):
    """Another call holds this repository's lock (called with wait => false)."""

    sqlstate = "55P03"


class WrongIsolationLevel(FlakectlError):
    """flakectl needs READ COMMITTED: a REPEATABLE READ or SERIALIZABLE snapshot predates the repository lock."""

    sqlstate = "0A000"


class ConcurrentConflict(FlakectlError):
    """A concurrent call for another repository processed an upload of this call: retry, the upload is then skipped."""

    sqlstate = "40001"


class NotInstalled(FlakectlError):
    """flakectl is not installed in this database: run `flakectl db upgrade` (or `alembic upgrade head`)"""

    @classmethod
    def because(cls, reason: str) -> NotInstalled:
        """The message with the server's reason between the finding and the remedy."""
        finding, remedy = (cls.__doc__ or "").strip().split(": ", 1)
        return cls(f"{finding}: {reason.strip().rstrip('.')}; {remedy}")


class DataWouldBeLost(FlakectlError):
    """A downgrade would drop a table that holds rows; nothing was changed (give drop_data to drop them)."""


class ConnectionFailed(FlakectlError):
    """Could not connect to PostgreSQL."""


_BY_SQLSTATE: dict[str, type[FlakectlError]] = {
    cls.sqlstate: cls
    for cls in (NullArgument, InvalidArgument, LockNotAvailable, WrongIsolationLevel, ConcurrentConflict)
}

# undefined_function, undefined_table, invalid_schema_name
_NOT_INSTALLED = {"42883", "42P01", "3F000"}


def from_psycopg(exc: psycopg.Error) -> FlakectlError:
    """The flakectl exception for a psycopg error (the server's message kept)."""
    import psycopg

    if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
        return ConnectionFailed(f"could not connect to PostgreSQL: {str(exc).strip()}")
    state = exc.sqlstate or ""
    primary = exc.diag.message_primary if exc.diag else None
    message = primary or str(exc).strip()
    if state in _BY_SQLSTATE:
        return _BY_SQLSTATE[state](message)
    if state in _NOT_INSTALLED and "flakectl" in message:
        return NotInstalled.because(message)
    return FlakectlError(message, sqlstate=state or None)


@contextlib.contextmanager
def wrap_exceptions() -> Iterator[None]:
    """Re-raise psycopg errors as flakectl exceptions, chained to the original."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise from_psycopg(exc) from exc


__all__ = [
    "BadInput",
    "ConcurrentConflict",
    "ConnectionFailed",
    "DataWouldBeLost",
    "FlakectlError",
    "InvalidArgument",
    "LockNotAvailable",
    "NotInstalled",
    "NullArgument",
    "WrongIsolationLevel",
    "from_psycopg",
    "wrap_exceptions",
]
