"""How the flakectl command reaches PostgreSQL.

The database is `--dsn`, else $FLAKECTL_DATABASE_URL, else libpq's own
variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, ...): an empty
conninfo lets libpq fill in everything. Both URLs
(`postgresql://user@host/db`) and key=value strings (`host=... dbname=...`)
are accepted. Connections are READ COMMITTED whatever the server's default
(SPEC rule 8: the functions refuse snapshot isolation levels).

psycopg 3 is the command's driver, an extra (`flakectl[cli]`): a worker's
environment has psycopg2 only, and `flakectl db` then migrates through it
(connect_psycopg2), so nothing here imports psycopg 3 before it is needed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flakectl.errors import ConnectionFailed

if TYPE_CHECKING:
    import psycopg

ENV_URL = "FLAKECTL_DATABASE_URL"


def conninfo(dsn: str | None) -> str:
    """The conninfo to use: `dsn`, else $FLAKECTL_DATABASE_URL, else '' (libpq's PG* variables)."""
    if dsn:
        return dsn
    return os.environ.get(ENV_URL, "")


def describe(info: str) -> str:
    """Where a connection was aimed, for messages (the password hidden)."""
    if not info:
        return "libpq defaults (PGHOST, PGPORT, PGDATABASE, ...)"
    try:
        params = _parse(info)
    except Exception:  # noqa: BLE001 - either driver's parse error
        return "(an unreadable DSN)"
    host = params.get("host", "(default host)")
    port = params.get("port")
    where = f"{host}:{port}" if port else str(host)
    return f"{where}, database {params.get('dbname', '(default)')}"


def _parse(info: str) -> dict:
    """libpq's reading of a URL or key=value DSN, by whichever driver is installed."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        from psycopg2.extensions import parse_dsn

        return parse_dsn(info)
    return conninfo_to_dict(info)


def _failed(info: str, exc: Exception) -> ConnectionFailed:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return ConnectionFailed(
        f"cannot connect to PostgreSQL at {describe(info)}: {reason}; "
        f"check --dsn, ${ENV_URL} or the PG* variables"
    )


def connect(dsn: str | None, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection to the flakectl database; ConnectionFailed (one line) if there is none."""
    import psycopg  # ModuleNotFoundError without the cli extra: the command says so

    from flakectl.dba.snapshot import register_timestamps

    info = conninfo(dsn)
    try:
        conn = psycopg.connect(info, autocommit=autocommit)
    except psycopg.Error as exc:
        raise _failed(info, exc) from exc
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    register_timestamps(conn)  # infinity and years past 9999 (flakectl.model.OutOfRange)
    return conn


def connect_psycopg2(dsn: str | None):  # noqa: ANN201 - psycopg2 is not imported at module level
    """The same connection through psycopg2 (not autocommit), for Alembic under
    SQLAlchemy 1.4, which has no psycopg 3 dialect (flakectl.dba.migrate.driver)."""
    import psycopg2
    import psycopg2.extensions

    info = conninfo(dsn)
    try:
        conn = psycopg2.connect(info)
    except psycopg2.Error as exc:
        raise _failed(info, exc) from exc
    conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED
    return conn
