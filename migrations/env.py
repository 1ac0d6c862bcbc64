"""Alembic environment for flakectl.

The database comes from, in order: a SQLAlchemy connection passed in
`config.attributes["connection"]` (flakectl's own commands and the tests), the
`sqlalchemy.url` option, or FLAKECTL_DATABASE_URL, a plain libpq URL
(`postgresql://user@host:port/db`) to which the driver is added (psycopg 3;
psycopg2 under SQLAlchemy 1.4: flakectl.dba.migrate.driver), or a
key=value DSN (`host=... dbname=...`).

Run by the `alembic` command (config.cmd_opts set), it logs each revision it
runs, as Alembic's own logging configuration would, and a server error is
Alembic's one `FAILED:` message with the server's DETAIL and HINT, not a traceback.

The Codecov schema (`-x codecov_schema=NAME`, `config.attributes
["codecov_schema"]`, default `public`; once installed, the one recorded in
flakectl.codecov_schema) is put first on the migration transaction's
search_path, so the released revisions that name Codecov's tables unqualified
(0002's index and checks) reach them there; Alembic's own version table stays
where the session's search_path finds or puts it, as before.
"""

from __future__ import annotations

import logging
import os

from alembic import context
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from flakectl.dba.migrate import MIGRATION_LOCK_KEY, requested_codecov_schema, sql_literal
from flakectl.dba.migrate import engine as make_engine
from flakectl.errors import DataWouldBeLost, FlakectlError
from flakectl.dba import migrate

config = context.config


def codecov_search_path() -> str:
    """A DO block: the Codecov schema first on this transaction's search_path;
    refuses (22023) an explicit schema other than the recorded one."""
    schema, explicit = requested_codecov_schema(context)
    return (
        "do $flakectl$\n"
        "declare\n"
        f"  v_asked text := {sql_literal(schema)};\n"
        "  v_schema text := v_asked;\n"
        "begin\n"
        "  if to_regclass('flakectl.codecov_schema') is not null then\n"
        "    select name into v_schema from flakectl.codecov_schema;\n"
        f"    if {'true' if explicit else 'false'} and v_schema is distinct from v_asked then\n"
        "      raise exception using errcode = '22023',\n"
        "        message = format('flakectl: installed for the Codecov schema %I, not %I; nothing was changed',"
        " v_schema, v_asked),\n"
        "        hint = 'Omit codecov_schema, or name the recorded one.';\n"
        "    end if;\n"
        "  end if;\n"
        "  perform set_config('search_path', format('%I, ', coalesce(v_schema, v_asked))"
        " || current_setting('search_path'), true);\n"
        "end\n"
        "$flakectl$"
    )


def version_table_schema(connection) -> str | None:  # noqa: ANN001
    """Where Alembic's version table is, or would be created, on the session's
    own search_path (before codecov_search_path changes it)."""
    return connection.exec_driver_sql(
        "select coalesce((select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where c.oid = to_regclass('alembic_version')), current_schema())"
    ).scalar()


def main_option(name: str) -> str | None:
    # Without an alembic.ini (configuration lives in pyproject.toml) there is
    # no [alembic] section and Alembic raises instead of returning None.
    try:
        return config.get_main_option(name)
    except CommandError:
        return None


def database_url() -> str:
    url = main_option("sqlalchemy.url") or os.environ.get("FLAKECTL_DATABASE_URL")
    if not url:
        raise SystemExit(
            "flakectl migrations: no database given; set FLAKECTL_DATABASE_URL, "
            "e.g. FLAKECTL_DATABASE_URL=postgresql://postgres@localhost:5432/codecov"
        )
    return migrate.sqlalchemy_url(url)  # psycopg 3, or psycopg2 under SQLAlchemy 1.4


# -- Before any step: the migration lock, then what a downgrade would drop -------
#
# Two `flakectl db upgrade` at once on an empty database both found nothing
# installed and raced to create the same functions (a raw pg_proc duplicate key
# error). The transaction-scoped advisory lock below is taken inside the
# migration transaction before Alembic reads alembic_version (run_migrations
# reads it afresh; READ COMMITTED gives that read a snapshot taken after the
# lock), so the second run waits, then finds the first one's revision and has
# nothing left to do. A single bigint key: its own lock space, apart from the
# (namespace, repo) pairs the functions lock (flakectl.dba.migrate.MIGRATION_LOCK_KEY).

# flakectl's own tables that a downgrade drops, by the revision that creates
# them, and what is lost with their rows.
DATA_TABLES = [
    ("0002", "flakectl.processed_upload",
     "the ledger of processed uploads: without it every upload is processed, and counted, "
     "again (exactly-once is lost)"),
    ("0006", "flakectl.flake_archive",
     "the flake rows replay archived: the only copy of the rows it replaced"),
]


def drop_data() -> bool:
    value = config.attributes.get("drop_data")
    if value is None:
        value = context.get_x_argument(as_dictionary=True).get("drop_data", "")
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def before_steps(connection) -> None:  # noqa: ANN001 - a SQLAlchemy Connection
    connection.exec_driver_sql(f"select pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
    # The steps the command will run, as run_migrations will compute them from
    # the version read now (under the lock). Only for a downgrade: the work
    # function of other commands (`current`) prints as it runs.
    migration = context.get_context()
    work = migration._migrations_fn  # noqa: SLF001 - Alembic keeps the command's steps nowhere else
    if getattr(work, "__name__", None) != "downgrade" or drop_data():
        return
    steps = work(migration.get_current_heads(), migration)
    target = context.get_revision_argument() or "base"
    undone = {step.revision.revision for step in steps
              if not step.is_upgrade and hasattr(step, "revision")}
    for revision, table, meaning in DATA_TABLES:
        if revision not in undone:
            continue
        exists = connection.exec_driver_sql(f"select to_regclass('{table}') is not null").scalar()
        rows = exists and connection.exec_driver_sql(f"select count(*) from {table}").scalar()
        if rows:
            raise DataWouldBeLost(
                f"downgrading below {revision} drops {table}, which holds {rows} row(s): {meaning}."
                f" Nothing was changed. To keep them, export the table first (psql: \\copy {table}"
                f" to '{table.split('.')[1]}.csv' csv header) or stay at {revision} or later; to"
                f" drop them anyway: flakectl db downgrade {target} --drop-data (alembic: -x drop_data=true"
                f" downgrade {target})"
            )


def run_offline() -> None:
    # The script is for psql, not a driver: with psycopg's pyformat paramstyle
    # every `%` of a function body would come out doubled (format('%s') as
    # format('%%s')); the named style leaves the text as it is.
    context.configure(
        url=main_option("sqlalchemy.url") or migrate.offline_url(),
        dialect_name="postgresql",
        dialect_opts={"paramstyle": "named"},
        literal_binds=True,
        transactional_ddl=True,
    )
    # no `RETURNING version_num` after the INSERT: psql would print a stray result row
    context.get_context().dialect.insert_returning = False
    with context.begin_transaction():
        context.execute(offline_start_check())
        context.execute(codecov_search_path())
        context.run_migrations()


def offline_start_check() -> str:
    """The offline script's first statements, run by psql inside its
    transaction: the migration lock, then a refusal (so `psql -v
    ON_ERROR_STOP=1` stops with nothing changed) when the database is not at
    the revision the script starts from, or, for a script that installs from
    nothing, when flakectl is already installed."""
    try:
        start = context.get_starting_revision_argument()
    except CommandError:
        start = None
    if isinstance(start, tuple):
        start = start[0] if start else None
    expected = f"'{start}'" if start else "null"
    told = f"upgrades from {start}" if start else "installs flakectl from nothing"
    remedy = ("print the script for the database's revision: flakectl db sql REV --from <the revision"
              " `flakectl db current` shows>")
    return f"""do $flakectl$
declare
  v_at text;
begin
  perform pg_advisory_xact_lock({MIGRATION_LOCK_KEY});  -- in the block: psql prints no result row
  if to_regclass('alembic_version') is not null then
    select string_agg(version_num, ', ') into v_at from alembic_version;
  end if;
  if v_at is distinct from {expected} then
    raise exception using errcode = '55000',
      message = format('flakectl: this script {told}, but the database is at %s;'
                       ' nothing was changed', coalesce(v_at, 'nothing (flakectl not installed)')),
      hint = '{remedy.replace("'", "''")}';
  end if;
end
$flakectl$"""


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, transactional_ddl=True,
                          version_table_schema=version_table_schema(connection))
        with context.begin_transaction():
            before_steps(connection)
            context.execute(codecov_search_path())
            context.run_migrations()
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as conn:
            with conn.begin():  # ended before Alembic begins the migration's own transaction
                schema = version_table_schema(conn)  # (conn.rollback() is SQLAlchemy 2's only)
            context.configure(connection=conn, transactional_ddl=True, version_table_schema=schema)
            with context.begin_transaction():
                before_steps(conn)
                context.execute(codecov_search_path())
                context.run_migrations()
    finally:
        engine.dispose()


def alembic_command_error(exc: Exception) -> CommandError:
    """For the alembic command: the error's message, then the server's DETAIL and HINT."""
    diag = getattr(getattr(exc, "orig", None), "diag", None)
    lines = [" ".join(str(diag.message_primary if diag and diag.message_primary else exc).split())]
    for label, text in (("DETAIL", diag and diag.message_detail), ("HINT", diag and diag.message_hint)):
        if text:
            lines.append(f"{label}: {' '.join(text.split())}")
    return CommandError("\n".join(lines))


if config.cmd_opts is not None and not logging.getLogger().handlers:  # the alembic command
    logging.basicConfig(format="%(levelname)-5.5s [%(name)s] %(message)s", level=logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.INFO)

if context.is_offline_mode():
    run_offline()
elif config.cmd_opts is None:  # flakectl's commands, the tests: errors as they are
    run_online()
else:
    try:
        run_online()
    except (DBAPIError, FlakectlError) as exc:
        raise alembic_command_error(exc) from None
