"""`flakectl db ...`: Alembic on the command's own connection.

flakectl.dba.migrate takes a URL; the command also accepts key=value DSNs and
libpq's PG* variables, so here Alembic gets a SQLAlchemy connection wrapped
around the connection flakectl.dba.connection made (Alembic's cookbook
"sharing a connection", which migrations/env.py supports through
`config.attributes["connection"]`): psycopg 3 under SQLAlchemy 2, psycopg2
under SQLAlchemy 1.4, which has no psycopg 3 dialect (`migrate.driver()`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import sqlalchemy
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import pool

from flakectl.dba import migrate
from flakectl.dba import options as o
from flakectl.dba.connection import connect, connect_psycopg2
from flakectl.errors import FlakectlError, driver_error, from_driver


class MigrationFailed(FlakectlError):
    """The migration failed; nothing of it was applied."""


class UnknownRevision(FlakectlError):
    """No such revision."""


class NotAnUpgrade(FlakectlError):
    """`db sql` was asked for a downgrade (the CLI exits 2)."""


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
        found = driver_error(exc)
        if found is not None:
            message = str(from_driver(found)).removeprefix("flakectl: ")
            # the server's DETAIL and HINT: printed by the command from the driver error's diag
            raise MigrationFailed(f"migration failed, nothing was changed: {message}") from exc
        raise


@contextlib.contextmanager
def _connection(dsn: str | None) -> Iterator[sqlalchemy.Connection]:
    # Alembic runs each migration in one transaction
    driver = migrate.driver()
    raw = connect(dsn, autocommit=False) if driver == "psycopg" else connect_psycopg2(dsn)
    engine = sqlalchemy.create_engine(f"postgresql+{driver}://", creator=lambda: raw,
                                      poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()
        raw.close()


def _run(dsn: str | None, action, revision: str,  # noqa: ANN001
         drop_data: bool = False, codecov_schema: str | None = None) -> tuple[str | None, str | None]:
    with _alembic_errors(), _connection(dsn) as conn:
        # the revision before, read under the migration lock env.py takes (it
        # stacks), so a concurrent run's work is not reported as this one's
        conn.exec_driver_sql(f"select pg_advisory_xact_lock({migrate.MIGRATION_LOCK_KEY})")
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = migrate.config()
        cfg.attributes["connection"] = conn
        cfg.attributes["drop_data"] = drop_data
        if codecov_schema is not None:
            cfg.attributes["codecov_schema"] = codecov_schema
        action(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def upgrade(dsn: str | None, revision: str = "head", *,
            codecov_schema: str | None = None) -> tuple[str | None, str | None]:
    """Upgrade to `revision`; the revisions before and after (None: not installed).
    `codecov_schema`: the schema of Codecov's tables, recorded by the install
    (default `public`; once recorded, naming another one is refused)."""
    return _run(dsn, command.upgrade, revision, codecov_schema=codecov_schema)


def downgrade(dsn: str | None, revision: str, *,
              drop_data: bool = False) -> tuple[str | None, str | None]:
    """Downgrade to `revision` (`base` removes flakectl); the revisions before and after.

    A downgrade that would drop a table holding rows (the ledger below 0002,
    the flake archive below 0006, Codecov tables the install created) raises
    DataWouldBeLost and changes nothing, unless `drop_data`."""
    return _run(dsn, command.downgrade, revision, drop_data)


def current(dsn: str | None) -> str | None:
    """The installed revision, None when flakectl is not installed."""
    with _alembic_errors(), _connection(dsn) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def offline_sql(revision: str = "head", start: str | None = None) -> str:
    """The SQL `upgrade` would run, for applying by hand (`psql -f`)."""
    with _alembic_errors():
        try:
            return migrate.sql(revision, start)
        except migrate.NotAnUpgrade as exc:
            raise NotAnUpgrade(str(exc)) from exc


# --------------------------------------------------------------------------
# `flakectl db upgrade|downgrade|current|sql` (cli.py: "flakectl.dba.dbadmin:NAME")
# --------------------------------------------------------------------------


def add_upgrade_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl db upgrade                 # to the newest revision\n"
                      "  flakectl db upgrade 0002")
    parser.add_argument("revision", nargs="?", default="head", metavar="REV")
    o.dsn(parser)
    o.option(parser, "--codecov-schema", metavar="NAME",
             help="the schema holding Codecov's tables, recorded at install (default: public)")


def run_upgrade(args: argparse.Namespace) -> int:
    before, after = upgrade(args.dsn, args.revision, codecov_schema=args.codecov_schema)
    o.err(f"flakectl: upgraded from {before or 'nothing'} to {after}" if before != after
          else f"flakectl: already at {after}")
    return 0


def add_downgrade_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl db downgrade 0002\n\n"
                      "Refused while a table it would drop holds rows (the ledger below 0002: exactly-once\n"
                      "would be lost), naming the table and how to keep it; --drop-data drops them anyway.")
    parser.add_argument("revision", metavar="REV")
    o.dsn(parser)
    o.option(parser, "--drop-data", switch=True,
             help="drop tables that hold rows (the ledger, the flake archive) instead of refusing")


def run_downgrade(args: argparse.Namespace) -> int:
    before, after = downgrade(args.dsn, args.revision, drop_data=args.drop_data)
    o.err(f"flakectl: downgraded from {before or 'nothing'} to {after or 'nothing (flakectl removed)'}"
          if before != after else f"flakectl: already at {after or 'base'}")
    return 0


def add_current_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  FLAKECTL_DATABASE_URL=postgresql://postgres@localhost/codecov flakectl db current")
    o.dsn(parser)
    o.json_flag(parser)


def run_current(args: argparse.Namespace) -> int:
    revision = current(args.dsn)
    head = migrate.head()
    if args.json:
        o.print_json({"revision": revision, "head": head, "up_to_date": revision == head})
    elif revision is None:
        o.out(f"none (not installed; head is {head})")
    else:
        o.out(f"{revision} (head)" if revision == head else f"{revision} (head is {head})")
    return 0


def add_sql_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl db sql > flakectl.sql && psql -v ON_ERROR_STOP=1 -f flakectl.sql codecov\n"
                      "  flakectl db sql head --from 0002   # only what comes after 0002\n\n"
                      "The script refuses to run (psql -v ON_ERROR_STOP=1 stops, nothing changed) on a\n"
                      "database that is not at --from (without --from: where flakectl is installed).")
    parser.add_argument("revision", nargs="?", default="head", metavar="REV")
    o.option(parser, "--from", type=str, metavar="REV", dest="start",
             help="the revision the database is at (default: nothing installed)")


def run_sql(args: argparse.Namespace) -> int:
    try:
        script = offline_sql(args.revision, args.start)
    except NotAnUpgrade as exc:  # a wrong command line: one line, exit 2
        o.err(f"{o.PROG}: error: {exc}")
        return 2
    sys.stdout.write(script)
    return 0
