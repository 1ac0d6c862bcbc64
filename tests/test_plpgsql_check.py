"""plpgsql_check lints every PL/pgSQL function in schema flakectl: errors,
warnings, extra, security and performance warnings (hidden casts, for one).
It must report nothing.

Needs the plpgsql_check extension on the test server (scripts/bootstrap
installs Debian's postgresql-<major>-plpgsql-check as root, through
scripts/plpgsql-check); skipped where it is missing.
"""

from __future__ import annotations

from importlib import resources

import psycopg
import pytest

from conftest import TEMPLATE, create_database, drop_database

FUNCTIONS = sorted(
    path.name for path in resources.files("flakectl.plpgsql").iterdir()
    if path.is_dir() and not path.name.startswith("__")
)


@pytest.fixture(scope="module")
def lint(server, template_url):
    """A connection to a migrated database with plpgsql_check created."""
    name = "plpgsql_check"
    url = create_database(server, name, TEMPLATE)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            if conn.execute("select 1 from pg_available_extensions where name = 'plpgsql_check'").fetchone() is None:
                pytest.skip(
                    f"plpgsql_check is not installed for the test server (PostgreSQL {server.version} "
                    f"in {server.bin_dir}), so flakectl's functions are not linted: install it (Debian: "
                    f"apt-get install postgresql-{server.version}-plpgsql-check; scripts/bootstrap does that as "
                    f"root for Debian's server)"
                )
            conn.execute("create extension plpgsql_check")
            yield conn
    finally:
        drop_database(server, name)


def findings(conn: psycopg.Connection, function: str) -> list[tuple]:
    rows = conn.execute(
        """
        select t.lineno, t.sqlstate, t.message, t.detail, t.level, t.statement, t.hint, t.context
          from pg_proc p
          join pg_namespace n on n.oid = p.pronamespace
          cross join lateral plpgsql_check_function_tb(
            p.oid, fatal_errors => false, other_warnings => true, extra_warnings => true,
            performance_warnings => true, security_warnings => true) t
         where n.nspname = 'flakectl' and p.proname = %s
         order by t.lineno, t.message
        """,
        (function,),
    ).fetchall()
    return rows


def test_every_flakectl_function_is_linted(lint):
    live = [name for (name,) in lint.execute(
        "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " join pg_language l on l.oid = p.prolang where n.nspname = 'flakectl' and l.lanname = 'plpgsql'"
        " order by 1")]
    assert live == FUNCTIONS


@pytest.mark.parametrize("function", FUNCTIONS)
def test_plpgsql_check_reports_nothing(lint, function):
    found = findings(lint, function)
    assert found == [], "\n".join(map(str, found))
