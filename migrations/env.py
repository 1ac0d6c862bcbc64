"""Alembic environment for flakectl.

The database comes from, in order: a SQLAlchemy connection passed in
`config.attributes["connection"]` (flakectl's own commands and the tests), the
`sqlalchemy.url` option, or FLAKECTL_DATABASE_URL, a plain libpq URL
(`postgresql://user@host:port/db`) to which the psycopg driver is added.
"""

from __future__ import annotations

import os

from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine, pool

config = context.config


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
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def run_offline() -> None:
    # The script is for psql, not a driver: with psycopg's pyformat paramstyle
    # every `%` of a function body would come out doubled (format('%s') as
    # format('%%s')); the named style leaves the text as it is.
    context.configure(
        url=main_option("sqlalchemy.url") or "postgresql+psycopg://",
        dialect_name="postgresql",
        dialect_opts={"paramstyle": "named"},
        literal_binds=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, transactional_ddl=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
