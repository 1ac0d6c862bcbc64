"""One statement through whatever connection the caller has.

The wrapper's functions run a single `SELECT` and read its one row. The caller
keeps the driver and the transaction handling it already has; `call()` finds
what it was given and runs the statement with that connection's own means:

| caller passes | how the call runs |
|---|---|
| psycopg 3 `Connection` | `conn.transaction()` |
| psycopg2 `connection` | BEGIN/COMMIT of its own when idle, else `SAVEPOINT` |
| Django `connection`, `connections[alias]` (psycopg 3 or psycopg2 below) | `transaction.atomic(using=alias)` |
| SQLAlchemy `Connection` (1.4, 2.x), `Engine` | `conn.begin()` when idle, else `conn.begin_nested()` |
| SQLAlchemy `Session`, `scoped_session` (1.4, 2.x) | `session.begin()` when idle, else `session.begin_nested()` |

The rule is the same for all: when the caller has no transaction open, the
call is its own transaction, committed on return (rolled back on error); inside
the caller's transaction it is a savepoint, released on return, rolled back to
on error, so the caller's transaction stays usable and the caller commits or
rolls back. The row is read by column name into the row type (a dataclass),
and errors become flakectl exceptions with the same SQLSTATE whatever the
driver (`flakectl.errors.wrap_exceptions`).

No driver or framework is imported here: each kind of connection is
recognized by classes of modules already in `sys.modules` (a connection of a
module that is not loaded cannot exist), so `import flakectl` stays light.

Adding an entry point takes a few lines in flakectl/api.py, for example:

    def replay(conn, repo_id, upload_ids, *, expire_after=30, dry_run=True) -> ReplaySummary:
        return adapter.call(conn, _REPLAY_SQL, dict(repo_id=..., ...), ReplaySummary)

where `_REPLAY_SQL` names its parameters `%(name)s` (with a cast each) and
selects the columns of `ReplaySummary` by name.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from flakectl.errors import wrap_exceptions

T = TypeVar("T")

#: One column name per column, and the one row.
Fetched = tuple[Sequence[str], Sequence[Any]]

_SAVEPOINT = "flakectl_call"


def call(conn: Any, sql: str, params: Mapping[str, Any], row_type: type[T]) -> T:
    """Run `sql` (named `%(name)s` placeholders) through `conn`; its one row as a `row_type`.

    The transaction rule and the error mapping are in the module docstring.
    Raises TypeError for a connection of a kind flakectl does not know.
    """
    run = _runner(conn)
    with wrap_exceptions():
        columns, row = run(sql, dict(params))
    return _typed(row_type, columns, row)


def _typed(row_type: type[T], columns: Sequence[str], row: Sequence[Any] | Mapping[str, Any] | None) -> T:
    if row is None:
        raise RuntimeError("flakectl: the statement returned no row")
    values = row if isinstance(row, Mapping) else dict(zip(columns, row, strict=True))
    names = [f.name for f in dataclasses.fields(row_type)]  # type: ignore[arg-type]
    missing = [name for name in names if name not in values]
    if missing:
        raise RuntimeError(f"flakectl: the result has no column {', '.join(missing)}")
    return row_type(**{name: values[name] for name in names})


def _loaded(module: str, name: str) -> Any:
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def _is(conn: Any, module: str, name: str) -> bool:
    cls = _loaded(module, name)
    return cls is not None and isinstance(conn, cls)


def _runner(conn: Any) -> Callable[[str, dict], Fetched]:
    """The function that runs a statement on this kind of connection."""
    if _is(conn, "psycopg", "Connection"):
        return lambda sql, params: _psycopg(conn, sql, params)
    if _is(conn, "psycopg2.extensions", "connection"):
        return lambda sql, params: _psycopg2(conn, sql, params)
    if _is(conn, "django.utils.connection", "ConnectionProxy") or _is(
        conn, "django.db.backends.base.base", "BaseDatabaseWrapper"
    ):
        return lambda sql, params: _django(conn, sql, params)
    if _is(conn, "sqlalchemy.orm", "scoped_session"):
        session = conn()  # the registry's Session for this thread or scope
        return lambda sql, params: _sqlalchemy_session(session, sql, params)
    if _is(conn, "sqlalchemy.orm", "Session"):
        return lambda sql, params: _sqlalchemy_session(conn, sql, params)
    if _is(conn, "sqlalchemy.engine", "Connection"):
        return lambda sql, params: _sqlalchemy_connection(conn, sql, params)
    if _is(conn, "sqlalchemy.engine", "Engine"):
        return lambda sql, params: _sqlalchemy_engine(conn, sql, params)
    raise TypeError(
        f"flakectl cannot call through a {type(conn).__module__}.{type(conn).__qualname__}: pass a "
        "psycopg 3 Connection, a psycopg2 connection, a Django connection "
        "(django.db.connection or connections[alias]), or an SQLAlchemy Connection, Engine or Session"
    )


def _names(description: Sequence[Any] | None) -> list[str]:
    return [column[0] for column in description or ()]


# --- psycopg 3 ----------------------------------------------------------------


def _psycopg(conn: Any, sql: str, params: dict) -> Fetched:
    from psycopg.rows import tuple_row  # psycopg is loaded: conn is one of its connections

    # transaction(): BEGIN/COMMIT when idle (autocommit or not), a savepoint inside one.
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(sql, params)
        return _names(cur.description), cur.fetchone()


# --- psycopg2 -----------------------------------------------------------------


def _psycopg2(conn: Any, sql: str, params: dict) -> Fetched:
    from psycopg2 import extensions  # loaded: conn is one of its connections

    def run(cur: Any) -> Fetched:
        cur.execute(sql, params)
        return _names(cur.description), cur.fetchone()

    # A plain cursor: the connection's cursor_factory may be a dict or namedtuple one.
    with conn.cursor(cursor_factory=extensions.cursor) as cur:
        if conn.get_transaction_status() != extensions.TRANSACTION_STATUS_IDLE:
            return _in_savepoint(cur, run)
        if conn.autocommit:
            # Each statement would commit on its own: make the call one transaction.
            cur.execute("begin")
            try:
                fetched = run(cur)
            except BaseException:
                _quietly(cur, "rollback")
                raise
            cur.execute("commit")
            return fetched
        try:  # psycopg2 opens the transaction with the statement
            fetched = run(cur)
        except BaseException:
            _quietly_call(conn.rollback)
            raise
        conn.commit()
        return fetched


def _in_savepoint(cur: Any, run: Callable[[Any], Fetched]) -> Fetched:
    """`run(cur)` inside a savepoint of the caller's transaction (DB-API cursors)."""
    cur.execute(f"savepoint {_SAVEPOINT}")
    try:
        fetched = run(cur)
    except BaseException:
        # Back to before the call; the caller's transaction goes on. If the
        # connection itself is gone, the original error is the one to report.
        _quietly(cur, f"rollback to savepoint {_SAVEPOINT}")
        _quietly(cur, f"release savepoint {_SAVEPOINT}")
        raise
    cur.execute(f"release savepoint {_SAVEPOINT}")
    return fetched


def _quietly(cur: Any, statement: str) -> None:
    _quietly_call(lambda: cur.execute(statement))


def _quietly_call(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - cleanup after an error that is being raised
        pass


# --- Django -------------------------------------------------------------------


def _django(conn: Any, sql: str, params: dict) -> Fetched:
    from django.db import connections, transaction

    # django.db.connection is a proxy of connections["default"]; attribute
    # access goes through it, so .alias names the real connection either way.
    alias = conn.alias
    wrapper = connections[alias]
    if wrapper.vendor != "postgresql":
        raise TypeError(f"flakectl needs PostgreSQL; Django's connection {alias!r} is {wrapper.vendor}")
    # atomic(): BEGIN/COMMIT in Django's autocommit mode, a savepoint inside an
    # atomic block or a transaction the caller manages (set_autocommit(False)),
    # rolled back on error, with Django's own bookkeeping kept right.
    with transaction.atomic(using=alias), wrapper.cursor() as cur:
        cur.execute(sql, params)
        return _names(cur.description), cur.fetchone()


# --- SQLAlchemy 1.4 and 2.x ---------------------------------------------------


def _fetch(result: Any) -> Fetched:
    row = result.fetchone()
    return list(result.keys()), tuple(row) if row is not None else row


def _sqlalchemy_connection(conn: Any, sql: str, params: dict) -> Fetched:
    # 2.x (and 1.4 future) connections begin on first use: in_transaction() is
    # then True and the call is a savepoint of that transaction.
    scope = conn.begin_nested() if conn.in_transaction() else conn.begin()
    with scope:
        return _fetch(conn.exec_driver_sql(sql, params))


def _sqlalchemy_engine(engine: Any, sql: str, params: dict) -> Fetched:
    with engine.begin() as conn:
        return _fetch(conn.exec_driver_sql(sql, params))


def _sqlalchemy_session(session: Any, sql: str, params: dict) -> Fetched:
    scope = session.begin_nested() if session.in_transaction() else session.begin()
    with scope:
        return _fetch(session.connection().exec_driver_sql(sql, params))
