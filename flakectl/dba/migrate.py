"""Alembic, configured in code so an installed flakectl (no pyproject.toml
beside it) can upgrade a database: the migrations ship in the package."""

from __future__ import annotations

import io
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool


#: the transaction-scoped advisory lock every migration takes first (migrations/env.py)
MIGRATION_LOCK_KEY = 0x666C616B65637400


def sqlalchemy_url(url: str) -> str:
    """A plain libpq URL with SQLAlchemy's psycopg 3 driver named."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def engine(url: str):  # noqa: ANN201 - a SQLAlchemy Engine
    """An engine for a libpq URL or a key=value DSN (`host=... dbname=...`, which
    SQLAlchemy cannot parse: psycopg gets it whole)."""
    if "://" in url:
        return create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    import psycopg

    return create_engine("postgresql+psycopg://", poolclass=pool.NullPool,
                         creator=lambda: psycopg.connect(url))


def config(url: str | None = None, *, output_buffer: io.TextIOBase | None = None) -> Config:
    """Alembic's Config for the packaged migrations; `output_buffer` receives
    the SQL of offline (`sql=True`) runs instead of stdout."""
    cfg = Config(output_buffer=output_buffer)
    cfg.set_main_option("script_location", str(resources.files("flakectl.migrations")))
    if url:
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(config(url), revision)


def downgrade(url: str, revision: str, *, drop_data: bool = False) -> None:
    cfg = config(url)
    cfg.attributes["drop_data"] = drop_data
    command.downgrade(cfg, revision)


class NotAnUpgrade(ValueError):
    """`sql` prints upgrades only: the target lies below the start."""


def sql(revision: str = "head", start: str | None = None) -> str:
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
    command.upgrade(config(output_buffer=out), target, sql=True)
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
