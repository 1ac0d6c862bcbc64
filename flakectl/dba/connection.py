"""How the flakectl command reaches PostgreSQL.

The database is `--dsn`, else $FLAKECTL_DATABASE_URL, else libpq's own
variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, ...): an empty
conninfo lets libpq fill in everything. Both URLs
(`postgresql://user@host/db`) and key=value strings (`host=... dbname=...`)
are accepted. Connections are READ COMMITTED whatever the server's default
(SPEC rule 8: the functions refuse snapshot isolation levels).
"""

from __future__ import annotations

import os

import psycopg
from psycopg import IsolationLevel

from flakectl.dba.snapshot import register_timestamps
from flakectl.errors import ConnectionFailed

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
        params = psycopg.conninfo.conninfo_to_dict(info)
    except psycopg.Error:
        return "(an unreadable DSN)"
    host = params.get("host", "(default host)")
    port = params.get("port")
    where = f"{host}:{port}" if port else str(host)
    return f"{where}, database {params.get('dbname', '(default)')}"


def _failed(info: str, exc: Exception) -> ConnectionFailed:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return ConnectionFailed(
        f"cannot connect to PostgreSQL at {describe(info)}: {reason}; "
        f"check --dsn, ${ENV_URL} or the PG* variables"
    )


def connect(dsn: str | None, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection to the flakectl database; ConnectionFailed (one line) if there is none."""
    info = conninfo(dsn)
    try:
        conn = psycopg.connect(info, autocommit=autocommit)
    except psycopg.Error as exc:
        raise _failed(info, exc) from exc
    conn.isolation_level = IsolationLevel.READ_COMMITTED
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
