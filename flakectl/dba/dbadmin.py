"""`flakectl db ...`: Alembic on the command's own connection.

flakectl.dba.migrate takes a URL; the command also accepts key=value DSNs and
libpq's PG* variables, so here Alembic gets a SQLAlchemy connection wrapped
around the psycopg connection flakectl.dba.connection made (Alembic's cookbook
"sharing a connection", which migrations/env.py supports through
`config.attributes["connection"]`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import sqlalchemy
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import pool

from flakectl.dba import migrate
from flakectl.dba.connection import connect
from flakectl.errors import FlakectlError, from_psycopg


class MigrationFailed(FlakectlError):
    """The migration failed; nothing of it was applied."""


class UnknownRevision(FlakectlError):
    """No such revision."""


def revisions() -> list[str]:
    """Every revision id, oldest first."""
    script = ScriptDirectory.from_config(migrate.config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


@contextlib.contextmanager
def _alembic_errors() -> Iterator[None]:
    try:
        yield
    except CommandError as exc:
        raise UnknownRevision(
            f"{exc}; known revisions: {', '.join(revisions())}, or head / base"
        ) from exc
    except sqlalchemy.exc.DBAPIError as exc:
        if isinstance(exc.orig, psycopg.Error):
            error = from_psycopg(exc.orig)
            hint = exc.orig.diag.message_hint if exc.orig.diag else None
            message = str(error).removeprefix("flakectl: ") + (f" ({hint})" if hint else "")
            raise MigrationFailed(f"migration failed, nothing was changed: {message}") from exc
        raise


@contextlib.contextmanager
def _connection(dsn: str | None) -> Iterator[sqlalchemy.Connection]:
    raw = connect(dsn, autocommit=False)  # Alembic runs each migration in one transaction
    engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=lambda: raw,
                                      poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()
        raw.close()


def _run(dsn: str | None, action, revision: str) -> tuple[str | None, str | None]:  # noqa: ANN001
    with _alembic_errors(), _connection(dsn) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = migrate.config()
        cfg.attributes["connection"] = conn
        action(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def upgrade(dsn: str | None, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to `revision`; the revisions before and after (None: not installed)."""
    return _run(dsn, command.upgrade, revision)


def downgrade(dsn: str | None, revision: str) -> tuple[str | None, str | None]:
    """Downgrade to `revision` (`base` removes flakectl); the revisions before and after."""
    return _run(dsn, command.downgrade, revision)


def current(dsn: str | None) -> str | None:
    """The installed revision, None when flakectl is not installed."""
    with _alembic_errors(), _connection(dsn) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def offline_sql(revision: str = "head", start: str | None = None) -> str:
    """The SQL `upgrade` would run, for applying by hand (`psql -f`)."""
    with _alembic_errors():
        return migrate.sql(revision, start)
