"""Alembic, configured in code so an installed flakectl (no pyproject.toml
beside it) can upgrade a database: the migrations ship in the package."""

from __future__ import annotations

import importlib
import importlib.util
import io
from importlib import resources

import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from flakectl import sqlfiles
from flakectl.errors import FlakectlError

#: SQLAlchemy 2.0 brought the psycopg 3 dialect; 1.4 (the worker's) has psycopg2's only.
SQLALCHEMY_2 = int(sqlalchemy.__version__.split(".")[0]) >= 2


class NoMigrationDriver(FlakectlError):
    """SQLAlchemy has no driver for flakectl's migrations here."""


def driver() -> str:
    """The DB-API driver Alembic's connections use: psycopg 3 under SQLAlchemy 2
    (flakectl's own driver), psycopg2 under SQLAlchemy 1.4, which has no psycopg 3
    dialect (a worker environment pinning sqlalchemy<2 has psycopg2)."""
    if SQLALCHEMY_2 and importlib.util.find_spec("psycopg") is not None:
        return "psycopg"
    if importlib.util.find_spec("psycopg2") is not None:
        return "psycopg2"
    if SQLALCHEMY_2:
        raise NoMigrationDriver("no PostgreSQL driver is installed: pip install 'flakectl[cli]'"
                                " (psycopg 3), or psycopg2-binary")
    raise NoMigrationDriver(
        f"SQLAlchemy {sqlalchemy.__version__} has no psycopg 3 dialect (it arrived in 2.0) and "
        "psycopg2 is not installed: install psycopg2-binary, or SQLAlchemy>=2"
    )


def offline_url() -> str:
    """A URL naming the dialect for offline SQL (`db sql`): no driver is loaded."""
    return "postgresql+psycopg://" if SQLALCHEMY_2 else "postgresql+psycopg2://"


#: the transaction-scoped advisory lock every migration takes first (migrations/env.py)
MIGRATION_LOCK_KEY = 0x666C616B65637400


def sqlalchemy_url(url: str) -> str:
    """A plain libpq URL with SQLAlchemy's driver for this environment named (`driver()`)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return f"postgresql+{driver()}://" + url[len(prefix):]
    return url


def engine(url: str):  # noqa: ANN201 - a SQLAlchemy Engine
    """An engine for a libpq URL or a key=value DSN (`host=... dbname=...`, which
    SQLAlchemy cannot parse: psycopg gets it whole)."""
    if "://" in url:
        return create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    name = driver()
    module = importlib.import_module(name)  # psycopg, or psycopg2 under SQLAlchemy 1.4
    return create_engine(f"postgresql+{name}://", poolclass=pool.NullPool,
                         creator=lambda: module.connect(url))


def config(url: str | None = None, *, output_buffer: io.TextIOBase | None = None,
           codecov_schema: str | None = None, drop_data: bool = False) -> Config:
    """Alembic's Config for the packaged migrations; `output_buffer` receives
    the SQL of offline (`sql=True`) runs instead of stdout; `codecov_schema`
    names the schema of Codecov's tables at install (default `public`);
    `drop_data` lets a downgrade drop recorded tables that hold rows."""
    cfg = Config(output_buffer=output_buffer)
    if codecov_schema is not None:
        cfg.attributes["codecov_schema"] = codecov_schema
    if drop_data:
        cfg.attributes["drop_data"] = True
    cfg.set_main_option("script_location", str(resources.files("flakectl.migrations")))
    if url:
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", *, codecov_schema: str | None = None) -> None:
    command.upgrade(config(url, codecov_schema=codecov_schema), revision)


def downgrade(url: str, revision: str, *, drop_data: bool = False) -> None:
    command.downgrade(config(url, drop_data=drop_data), revision)


class NotAnUpgrade(ValueError):
    """`sql` prints upgrades only: the target lies below the start."""


def sql(revision: str = "head", start: str | None = None, *, codecov_schema: str | None = None) -> str:
    """The SQL an upgrade to `revision` would run (Alembic's offline mode).

    The script refuses to run (psql with ON_ERROR_STOP stops at its first
    statement, nothing changed) on a database that is not at `start` (without
    `start`: one where flakectl is installed). NotAnUpgrade when `revision`
    lies below `start`."""
    if start is not None:
        script = ScriptDirectory.from_config(config())
        target, origin = script.get_revision(revision), script.get_revision(start)
        if origin is not None and (target is None or target.revision != origin.revision) and (
                target is None or origin.revision not in
                {r.revision for r in script.iterate_revisions(target.revision, "base")}):
            raise NotAnUpgrade(
                f"{revision} lies below --from {start}: `db sql` prints upgrades only; to downgrade,"
                f" run `flakectl db downgrade {revision}` against the database")
    out = io.StringIO()
    target = f"{start}:{revision}" if start else revision
    command.upgrade(config(output_buffer=out, codecov_schema=codecov_schema), target, sql=True)
    return out.getvalue()


def current(url: str) -> str | None:
    """The revision the database is at, None when flakectl is not installed."""
    db = engine(url)
    try:
        with db.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        db.dispose()


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


# --- options of the migrations (-x NAME=VALUE or config.attributes[NAME]) -------


def _option(context, name: str) -> object | None:  # noqa: ANN001 - alembic.context
    attributes = context.config.attributes
    if name in attributes and attributes[name] is not None:
        return attributes[name]
    return context.get_x_argument(as_dictionary=True).get(name)


def requested_codecov_schema(context) -> tuple[str, bool]:  # noqa: ANN001 - alembic.context
    """The Codecov schema the installer asked for, and whether it was asked
    explicitly (`-x codecov_schema=NAME`, `config.attributes["codecov_schema"]`);
    `public` when not."""
    value = _option(context, "codecov_schema")
    if value is None or str(value) == "":
        return sqlfiles.DEFAULT_SCHEMA, False
    return str(value), True


def drop_data(context) -> bool:  # noqa: ANN001 - alembic.context
    """Whether the DBA allowed a downgrade to drop tables holding rows
    (`-x drop_data=true`, `config.attributes["drop_data"] = True`)."""
    value = _option(context, "drop_data")
    if isinstance(value, bool):
        return value
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def sql_literal(text: str) -> str:
    """`text` as a SQL string literal (standard_conforming_strings)."""
    if "\x00" in text:
        raise ValueError("a NUL character cannot be part of a PostgreSQL name")
    return "'" + text.replace("'", "''") + "'"


def foreign_flake_check() -> str:
    """A DO block refusing (0A000, changing nothing) when the recorded
    schema's test_analytics_flake is a foreign table: flakectl installs where
    the flakes are a local table (SPEC "Deployments", the split layout)."""
    return (
        "do $flakectl$\n"
        "declare\n"
        "  v_schema text := (select name from flakectl.codecov_schema);\n"
        "begin\n"
        "  if exists (select from pg_class c join pg_namespace n on n.oid = c.relnamespace\n"
        "              where n.nspname = v_schema and c.relname = 'test_analytics_flake' and c.relkind = 'f') then\n"
        "    raise exception using errcode = '0A000',\n"
        "      message = format('flakectl: %I.test_analytics_flake is a foreign table; flakectl installs only where '\n"
        "                       'the flakes are a local table: one database, or in Codecov''s split layout the runs '\n"
        "                       'database, where commits and reports_* are the foreign tables (SPEC \"Deployments\"); '\n"
        "                       'nothing was changed', v_schema),\n"
        "      hint = 'Install flakectl in the runs database (flakectl split sets that layout up).';\n"
        "  end if;\n"
        "end\n"
        "$flakectl$"
    )


def codecov_schema(conn) -> str:  # noqa: ANN001 - psycopg or SQLAlchemy connection
    """The Codecov schema the install recorded (flakectl.codecov_schema), or
    `public` when the install predates the record (revisions 0001-0004 as
    released; revision 0005 records it). Takes a psycopg connection or a
    SQLAlchemy one."""
    run = conn.exec_driver_sql if hasattr(conn, "exec_driver_sql") else conn.execute
    present = run("select to_regclass('flakectl.codecov_schema') is not null").fetchone()[0]
    row = run("select name from flakectl.codecov_schema").fetchone() if present else None
    return row[0] if row else sqlfiles.DEFAULT_SCHEMA
