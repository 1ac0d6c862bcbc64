"""flakectl: in-database flaky-test detection for Codecov test analytics."""

from flakectl.errors import (
    BadInput,
    ConcurrentConflict,
    ConnectionFailed,
    FlakectlError,
    InvalidArgument,
    LockNotAvailable,
    NotInstalled,
    NullArgument,
    WrongIsolationLevel,
)
from flakectl.model import Summary

# The entry points import psycopg: loaded on first use, so that the flakectl
# command starts fast (`flakectl --help` needs no driver) and `import flakectl`
# never imports SQLAlchemy or Alembic.
_LAZY = {"process_commit": "flakectl.api", "process_uploads": "flakectl.api"}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flakectl' has no attribute {name!r}")

__all__ = [
    "BadInput",
    "ConcurrentConflict",
    "ConnectionFailed",
    "FlakectlError",
    "InvalidArgument",
    "LockNotAvailable",
    "NotInstalled",
    "NullArgument",
    "Summary",
    "WrongIsolationLevel",
    "process_commit",
    "process_uploads",
]
