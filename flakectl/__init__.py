"""flakectl: in-database flaky-test detection for Codecov test analytics.

The entry points run on the caller's connection and import no driver (nor
SQLAlchemy or Alembic): flakectl.adapter recognizes the connection it is given.
"""

from flakectl.api import process_commit, process_uploads, replay
from flakectl.errors import (
    BadInput,
    ConcurrentConflict,
    ConnectionFailed,
    FlakectlError,
    InvalidArgument,
    LockNotAvailable,
    NotInstalled,
    NullArgument,
    PermissionDenied,
    WrongIsolationLevel,
)
from flakectl.model import ReplaySummary, Summary


__all__ = [
    "BadInput",
    "ConcurrentConflict",
    "ConnectionFailed",
    "FlakectlError",
    "InvalidArgument",
    "LockNotAvailable",
    "NotInstalled",
    "NullArgument",
    "PermissionDenied",
    "ReplaySummary",
    "Summary",
    "WrongIsolationLevel",
    "process_commit",
    "process_uploads",
    "replay",
]
