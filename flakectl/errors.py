"""flakectl's exceptions, and the one place driver errors are mapped to them.

Each class's docstring is its user-facing meaning; the SQLSTATE it stands for
is the one the SQL functions raise (SPEC rule 10, rule 8, `wait => false`).
The mapping is the same whatever the driver: psycopg 3 (`sqlstate`),
psycopg2 (`pgcode`), either of them wrapped by Django (`django.db.utils.*`,
the driver's error as `__cause__`) or by SQLAlchemy (`DBAPIError.orig`). No
driver is imported here: a driver's classes are looked up in `sys.modules`,
since an error can only come from a driver that is already loaded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


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


class PermissionDenied(FlakectlError):
    """This role may not call flakectl's functions: grant it with `flakectl db grant ROLE` (docs/security.md)."""

    sqlstate = "42501"
    #: what to grant; the message stays PostgreSQL's own
    remedy = ("the role needs `flakectl db grant ROLE` (USAGE on schema flakectl, EXECUTE on"
              " flakectl.process_commit and flakectl.process_uploads; docs/security.md)")

    def __init__(self, message: str | None = None, *, sqlstate: str | None = None):
        super().__init__(message, sqlstate=sqlstate)
        self.add_note(self.remedy)


class ConnectionFailed(FlakectlError):
    """Could not connect to PostgreSQL."""


_BY_SQLSTATE: dict[str, type[FlakectlError]] = {
    cls.sqlstate: cls
    for cls in (NullArgument, InvalidArgument, LockNotAvailable, WrongIsolationLevel, ConcurrentConflict)
}

# undefined_function, undefined_table, invalid_schema_name
_NOT_INSTALLED = {"42883", "42P01", "3F000"}


def _loaded(module: str, name: str) -> type | None:
    """A driver's or framework's class, if that module is loaded (never imports it)."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def driver_error(exc: BaseException) -> BaseException | None:
    """The psycopg 3 or psycopg2 error under `exc`, or None when `exc` is no database error.

    Django raises `django.db.utils.<Error>` from the driver's error (its
    `__cause__`); SQLAlchemy raises `DBAPIError` holding it as `.orig`.
    """
    for _ in range(4):  # a wrapper of a wrapper at most, in practice
        for module in ("psycopg", "psycopg2"):
            error = _loaded(module, "Error")
            if error is not None and isinstance(exc, error):
                return exc
        dbapi_error = _loaded("sqlalchemy.exc", "DBAPIError")
        django_error = _loaded("django.db.utils", "Error")
        if dbapi_error is not None and isinstance(exc, dbapi_error):
            nested = exc.orig
        elif django_error is not None and isinstance(exc, django_error):
            nested = exc.__cause__
        else:
            return None
        if not isinstance(nested, BaseException):
            return None
        exc = nested
    return None


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error: psycopg 3's `sqlstate`, psycopg2's `pgcode`."""
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return state if isinstance(state, str) and state else None


def from_driver(exc: BaseException) -> FlakectlError:
    """The flakectl exception for a driver error (the server's message kept)."""
    state = sqlstate_of(exc)
    operational = (_loaded("psycopg", "OperationalError"), _loaded("psycopg2", "OperationalError"))
    if state is None and any(cls is not None and isinstance(exc, cls) for cls in operational):
        return ConnectionFailed(f"could not connect to PostgreSQL: {str(exc).strip()}")
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    message = primary or str(exc).strip()
    if state in _BY_SQLSTATE:
        return _BY_SQLSTATE[state](message)
    if state == "22003" and message.startswith("flakectl: argument "):
        return InvalidArgument(message, sqlstate=state)
    if state == PermissionDenied.sqlstate and any(
            name in message for name in ("flakectl", "process_commit", "process_uploads")):
        return PermissionDenied(message)
    if state in _NOT_INSTALLED and "flakectl" in message:
        return NotInstalled.because(message)
    return FlakectlError(message, sqlstate=state)


#: The name the DBA tools know; any driver's error is accepted.
from_psycopg = from_driver


@contextlib.contextmanager
def wrap_exceptions() -> Iterator[None]:
    """Re-raise database errors (any driver, also wrapped by Django or SQLAlchemy)
    as flakectl exceptions, chained to the original."""
    try:
        yield
    except Exception as exc:
        found = driver_error(exc)
        if found is None:
            raise
        raise from_driver(found) from exc


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
    "PermissionDenied",
    "WrongIsolationLevel",
    "driver_error",
    "from_driver",
    "from_psycopg",
    "sqlstate_of",
    "wrap_exceptions",
]
