"""Issue 10, hardening, items 2 and 3 and the privileges: the Codecov schema
recorded and used by name (migrations 0001, as fixed in place, and 0005),
nothing planted on a caller's search_path runs or is read inside a call, and
a worker role can do exactly what `flakectl db grant` gives it.
"""

from __future__ import annotations

import itertools
import os

import psycopg
import pytest
import sqlalchemy.exc

import flakectl
from flakectl import reference
from flakectl.cli import main
from flakectl.dba import migrate

from builders import Repo, at
from dbdata import assert_state
from sessions import whole_snapshot

R = 1
CODECOV_TABLES = ("commits", "reports_commitreport", "reports_upload", "ta_timeseries_testrun",
                  "test_analytics_flake")
_roles = itertools.count()


def tables_in(url: str, schema: str) -> set[str]:
    with psycopg.connect(url) as c:
        return {n for (n,) in c.execute(
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = %s and c.relkind in ('r', 'p', 'f')", (schema,))}


def recorded(url: str) -> tuple[str, list[tuple[str, str]]]:
    with psycopg.connect(url) as c:
        (schema,) = c.execute("select name from flakectl.codecov_schema").fetchone()
        created = c.execute(
            "select t.name, n.nspname || '.' || c.relname from flakectl.created_table t"
            " join pg_class c on c.oid = t.relid::oid join pg_namespace n on n.oid = c.relnamespace"
            " order by t.name").fetchall()
    return schema, created


def migration_error(call) -> psycopg.Error:  # noqa: ANN001
    with pytest.raises(sqlalchemy.exc.DBAPIError) as info:
        call()
    return info.value.orig


@pytest.fixture
def make_role(server):
    made: list[tuple[str, list[str]]] = []

    def make(*urls: str) -> str:
        name = f"role_{os.getpid()}_{next(_roles)}"
        with psycopg.connect(server.url, autocommit=True) as c:
            c.execute(f'create role "{name}" login')
        made.append((name, list(urls)))
        return name

    yield make
    for name, urls in made:
        for url in urls:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute(f'drop owned by "{name}" cascade')
        with psycopg.connect(server.url, autocommit=True) as c:
            c.execute(f'drop role "{name}"')


def as_role(url: str, role: str) -> str:
    return url.replace("postgres@", f"{role}@", 1)


# --- 2. the schema: chosen at install, recorded, used by name ------------------------------


def test_a_user_schema_on_the_installers_path_gets_nothing(empty_db_url):
    """Released 0001 created the tables in the installer's `$user` schema; now
    they go to the recorded schema, and the downgrade drops exactly those."""
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        (user,) = c.execute("select current_user").fetchone()
        c.execute(f'create schema "{user}"')
    migrate.upgrade(empty_db_url)
    assert set(CODECOV_TABLES) <= tables_in(empty_db_url, "public")
    # (Alembic keeps its version table where the session's path puts it, as before)
    assert tables_in(empty_db_url, user) <= {"alembic_version"}
    assert recorded(empty_db_url) == ("public", sorted((t, f"public.{t}") for t in CODECOV_TABLES))

    with psycopg.connect(empty_db_url) as c:
        c.execute("insert into commits (commitid, repoid) values ('x', 1)")
    failure = migration_error(lambda: migrate.downgrade(empty_db_url, "base"))
    assert failure.sqlstate == "55000"
    assert failure.diag.message_primary == ("flakectl: refusing to drop public.commits: created by flakectl's"
                                            " install, but it holds rows; nothing was changed")
    assert migrate.current(empty_db_url) == migrate.head()
    migrate.downgrade(empty_db_url, "base", drop_data=True)
    assert tables_in(empty_db_url, "public") == set()


def test_tables_named_like_codecovs_in_a_user_schema_are_never_touched(empty_db_url):
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        (user,) = c.execute("select current_user").fetchone()
        c.execute(f'create schema "{user}"')
        for table in CODECOV_TABLES:
            c.execute(f'create table "{user}".{table} (keep text)')
            c.execute(f"insert into \"{user}\".{table} values ('mine')")
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    with psycopg.connect(empty_db_url) as c:
        for table in CODECOV_TABLES:
            assert c.execute(f'select keep from "{user}".{table}').fetchall() == [("mine",)]
    assert tables_in(empty_db_url, "public") == set()


def test_another_schema_is_used_by_name_whatever_the_callers_path(empty_db_url, capsys):
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        c.execute("create schema codecov")
    migrate.upgrade(empty_db_url, codecov_schema="codecov")
    assert set(CODECOV_TABLES) <= tables_in(empty_db_url, "codecov")
    assert tables_in(empty_db_url, "public") == {"alembic_version"}
    assert recorded(empty_db_url)[0] == "codecov"
    with psycopg.connect(empty_db_url) as c:
        c.execute("set search_path = codecov")
        repo = Repo(c, R)
        up = repo.upload("sha1")
        repo.runs(up, ("a", "failure", at(1)))
        c.commit()
        c.execute("set search_path = public")
        assert flakectl.process_commit(c, R, "sha1").testruns_marked == 1
        c.commit()
    # status recognises head's bodies, rendered for the recorded schema
    assert main(["status", "--dsn", empty_db_url]) == 0
    assert "modified" not in capsys.readouterr().out
    # naming another schema once installed is refused
    failure = migration_error(lambda: migrate.upgrade(empty_db_url, codecov_schema="public"))
    assert (failure.sqlstate, failure.diag.message_primary) == (
        "22023", "flakectl: installed for the Codecov schema codecov, not public; nothing was changed")
    migrate.downgrade(empty_db_url, "base", drop_data=True)
    assert tables_in(empty_db_url, "codecov") == set()


def test_a_schema_that_does_not_exist_is_refused(empty_db_url):
    failure = migration_error(lambda: migrate.upgrade(empty_db_url, codecov_schema="nowhere"))
    assert failure.sqlstate == "22023"
    assert failure.diag.message_primary.startswith("flakectl: schema nowhere (the Codecov schema asked for)"
                                                   " does not exist")
    assert migrate.current(empty_db_url) is None


def _as_released_0001_left_it(url: str, schema: str) -> None:
    """An install made by 0001 as released, in `schema`: no schema record, the
    created tables by name only, the tables (and 0002's index) there."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("drop table flakectl.codecov_schema")
        c.execute("alter table flakectl.created_table drop column relid")
        if schema != "public":
            c.execute(f'create schema "{schema}"')
            for table in CODECOV_TABLES:
                c.execute(f'alter table public.{table} set schema "{schema}"')


def test_0005_records_the_schema_of_an_install_made_by_released_0001(empty_db_url):
    migrate.upgrade(empty_db_url, "0004")
    with psycopg.connect(empty_db_url) as c:
        (user,) = c.execute("select current_user").fetchone()
    _as_released_0001_left_it(empty_db_url, user)
    # the downgrade of a database without the oid record refuses
    failure = migration_error(lambda: migrate.downgrade(empty_db_url, "base"))
    assert failure.sqlstate == "55000" and "predates the record of created tables" in failure.diag.message_primary

    migrate.upgrade(empty_db_url)
    assert recorded(empty_db_url) == (user, sorted((t, f"{user}.{t}") for t in CODECOV_TABLES))
    with psycopg.connect(empty_db_url) as c:
        c.execute(f'set search_path = "{user}"')
        repo = Repo(c, R)
        repo.runs(repo.upload("sha1"), ("a", "failure", at(1)))
        c.commit()
        c.execute("set search_path = public")
        assert flakectl.process_commit(c, R, "sha1").flakes_created == 1
        c.commit()
    migrate.downgrade(empty_db_url, "base", drop_data=True)
    assert tables_in(empty_db_url, user) == set()


def test_0005_refuses_when_it_cannot_tell_the_schema(empty_db_url):
    migrate.upgrade(empty_db_url, "0004")
    _as_released_0001_left_it(empty_db_url, "elsewhere")
    with psycopg.connect(empty_db_url, autocommit=True) as c:  # a second flakectl-indexed flake table
        c.execute("create table public.test_analytics_flake (like elsewhere.test_analytics_flake including all)")
        c.execute("create unique index flakectl_flake_one_open on public.test_analytics_flake (repoid, test_id)"
                  " where end_date is null")
    failure = migration_error(lambda: migrate.upgrade(empty_db_url))
    assert failure.sqlstate == "55000"
    assert failure.diag.message_primary == (
        "flakectl: cannot tell which schema holds the Codecov tables flakectl was installed for"
        " (flakectl_flake_one_open found on the test_analytics_flake of elsewhere, public); nothing was changed")
    assert migrate.current(empty_db_url) == "0004"
    failure = migration_error(lambda: migrate.upgrade(empty_db_url, codecov_schema="public"))
    assert failure.sqlstate == "55000" and failure.diag.message_primary.startswith("flakectl: schema public lacks")
    migrate.upgrade(empty_db_url, codecov_schema="elsewhere")
    assert recorded(empty_db_url)[0] == "elsewhere"


FOREIGN = """
create extension if not exists postgres_fdw;
create server nowhere foreign data wrapper postgres_fdw options (dbname 'nowhere');
create foreign table {schema}test_analytics_flake (id bigint, repoid integer, test_id bytea) server nowhere;
"""


def test_a_foreign_flake_table_is_refused_at_install(empty_db_url):
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        if c.execute("select from pg_available_extensions where name = 'postgres_fdw'").fetchone() is None:
            pytest.skip("postgres_fdw is not available on the test server")
        c.execute(FOREIGN.format(schema="public."))
    failure = migration_error(lambda: migrate.upgrade(empty_db_url))
    assert failure.sqlstate == "0A000"
    assert failure.diag.message_primary.startswith("flakectl: public.test_analytics_flake is a foreign table;"
                                                   " flakectl installs only where the flakes are a local table")
    assert "split layout" in failure.diag.message_primary
    assert migrate.current(empty_db_url) is None
    assert tables_in(empty_db_url, "public") == {"test_analytics_flake"}


def test_a_foreign_flake_table_is_refused_by_0005(empty_db_url):
    migrate.upgrade(empty_db_url, "0004")
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        if c.execute("select from pg_available_extensions where name = 'postgres_fdw'").fetchone() is None:
            pytest.skip("postgres_fdw is not available on the test server")
        c.execute("alter table test_analytics_flake rename to test_analytics_flake_pre_split")
        c.execute(FOREIGN.format(schema="public."))
    failure = migration_error(lambda: migrate.upgrade(empty_db_url))
    assert failure.sqlstate == "0A000"
    assert migrate.current(empty_db_url) == "0004"


# --- 3. nothing planted on the caller's path runs or is read inside a call ------------------

PLANT = """
create table public.side_effect (what text);
grant insert, select on public.side_effect to public;
create function public.unnest(bigint[]) returns setof bigint language sql as $f$
  insert into public.side_effect values ('unnest(bigint[])');
  select x from pg_catalog.unnest($1) as x $f$;
create function public.cardinality(bigint[]) returns integer language sql as $f$
  insert into public.side_effect values ('cardinality(bigint[])');
  select pg_catalog.cardinality($1) $f$;
create function public.agg_step(bigint[], bigint) returns bigint[] language sql as $f$
  insert into public.side_effect values ('array_agg(bigint)');
  select pg_catalog.array_append($1, $2) $f$;
create aggregate public.array_agg(bigint) (sfunc = public.agg_step, stype = bigint[]);
create function public.count() returns bigint language sql as $f$
  insert into public.side_effect values ('count()');
  select 0::bigint $f$;
create function public.format(text, text) returns text language sql as $f$
  insert into public.side_effect values ('format(text, text)');
  select $1 $f$;
create function public.now() returns timestamptz language sql as $f$
  insert into public.side_effect values ('now()');
  select pg_catalog.now() $f$;
create function public.int_eq_big(integer, bigint) returns boolean language sql as $f$
  insert into public.side_effect values ('=(integer, bigint)');
  select $1::bigint operator(pg_catalog.=) $2 $f$;
create operator public.= (leftarg = integer, rightarg = bigint, function = public.int_eq_big);
create function public.bytea_eq(bytea, bytea) returns boolean language sql as $f$
  insert into public.side_effect values ('=(bytea, bytea)');
  select $1 operator(pg_catalog.=) $2 $f$;
create operator public.= (leftarg = bytea, rightarg = bytea, function = public.bytea_eq);
"""


def _scene(conn: psycopg.Connection) -> None:
    repo = Repo(conn, R)
    repo.flake("a", rpc=1, count=3, fail_count=2, start=at(-100))
    repo.flake("k", rpc=0, count=1, fail_count=1, start=at(-90))
    up1, up2 = repo.upload("sha1"), repo.upload("sha1")
    repo.runs(up1, ("a", "failure", at(1)), ("b", "error", at(1)), ("k", "pass", at(1)))
    repo.runs(up2, ("a", "pass", at(2)), ("b", "pass", at(2)), ("b", "failure", at(3)))
    conn.commit()


def test_planted_functions_operators_and_tables_take_no_part(db_url, make_role):
    planter, worker = make_role(db_url), make_role(db_url)
    with psycopg.connect(db_url) as c:
        _scene(c)
        snapshot = whole_snapshot(c, [R])
        want = reference.process_commit(snapshot, R, "sha1")
        c.execute(f'grant create on schema public to "{planter}"')
        c.execute(f'create schema "{worker}" authorization "{worker}"')
        c.commit()
    assert main(["db", "grant", worker, "--dsn", db_url]) == 0
    with psycopg.connect(as_role(db_url, planter), autocommit=True) as p:
        p.execute(PLANT)
    # the worker's own schema, first on its path: tables named like Codecov's, holding a
    # commit sha1 whose upload has failing runs of other tests
    with psycopg.connect(db_url, autocommit=True) as w:
        for table in CODECOV_TABLES:
            w.execute(f'create table "{worker}".{table} (like public.{table} including all)')
        w.execute(f'grant select, insert, update, delete on all tables in schema "{worker}" to "{worker}"')
        w.execute(f'set search_path = "{worker}"')
        decoy = Repo(w, R)
        decoy.runs(decoy.upload("sha1", upload_id=31337), ("decoy", "failure", at(1)))
    for caller in (worker, "postgres"):  # the worker, and the owner itself (SECURITY DEFINER or not)
        with psycopg.connect(as_role(db_url, caller)) as conn:
            conn.execute(f'set search_path = "{worker}", public, pg_catalog')  # pg_catalog last: planted win
            got = flakectl.process_commit(conn, R, "sha1", dry_run=True)
            assert got == want.summary, caller
            conn.execute(f'set search_path = "{worker}", public, pg_catalog')
            conn.execute("select * from flakectl.process_commit(%s, 'sha1', dry_run => true)", (R,))
            scans = conn.execute(
                "select relname, seq_scan + coalesce(idx_scan, 0) from pg_stat_xact_user_tables"
                " where schemaname = %s and seq_scan + coalesce(idx_scan, 0) > 0", (worker,)).fetchall()
            assert scans == [], caller
            conn.rollback()
            assert conn.execute("select * from public.side_effect").fetchall() == [], caller
    with psycopg.connect(as_role(db_url, worker)) as conn:
        conn.execute(f'set search_path = "{worker}", public, pg_catalog')
        assert flakectl.process_commit(conn, R, "sha1") == want.summary
        conn.commit()
        assert conn.execute("select * from public.side_effect").fetchall() == []
    with psycopg.connect(db_url) as c:
        assert_state(c, reference.apply(snapshot, want), {f.id for f in snapshot.flakes})


# --- privileges ------------------------------------------------------------------------------

INTERNAL = ["flakectl.guard(1, '1 day', 30, false, true)",
            "flakectl.process_upload_set(1, '{1}', '1 day', 30, false, null)",
            "flakectl.state_machine(1, '{1}', '-infinity', 30, false, true)",
            "flakectl.window_start('1 day')",
            "flakectl.prune_ledger('30 days')"]
TABLES = [*CODECOV_TABLES, "flakectl.processed_upload"]


def test_no_flakectl_function_is_executable_by_public(conn):
    rows = conn.execute(
        "select p.proname, p.proacl is null or exists (select from aclexplode(p.proacl) a"
        "                                               where a.grantee = 0)"
        "  from pg_proc p where p.pronamespace = 'flakectl'::regnamespace order by 1").fetchall()
    assert rows and [name for name, public in rows if public] == []


def _denied(url: str, sql: str) -> None:
    with psycopg.connect(url) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(sql)


def test_a_workers_privileges_are_exactly_the_grant(db_url, make_role, capsys, monkeypatch):
    worker = make_role(db_url)
    url = as_role(db_url, worker)
    with psycopg.connect(db_url) as c:
        _scene(c)
    # without the grant: 42501, PostgreSQL's message; the wrapper and the CLI say what to grant
    with psycopg.connect(url) as c:
        with pytest.raises(flakectl.PermissionDenied) as info:
            flakectl.process_commit(c, R, "sha1", dry_run=True)
        assert info.value.sqlstate == "42501"
        assert str(info.value) == "permission denied for schema flakectl"  # PostgreSQL's own
        assert "flakectl db grant ROLE" in info.value.remedy and info.value.remedy in info.value.__notes__
    monkeypatch.delenv("FLAKECTL_DATABASE_URL", raising=False)
    assert main(["process", "--dsn", url, "--repo", "1", "--commit", "sha1", "--dry-run"]) == 1
    assert capsys.readouterr().err == (
        "flakectl: error: permission denied for schema flakectl; the role needs `flakectl db grant"
        " ROLE` (USAGE on schema flakectl, EXECUTE on flakectl.process_commit and flakectl.process_uploads;"
        " docs/security.md)\n")

    assert main(["db", "grant", worker, "--dsn", db_url]) == 0
    assert capsys.readouterr().err == (
        f"flakectl: granted to {worker}: USAGE on schema flakectl, EXECUTE on flakectl.process_commit and"
        " flakectl.process_uploads (and nothing on the tables)\n")
    with psycopg.connect(url) as c:
        assert flakectl.process_commit(c, R, "sha1", dry_run=True).uploads_processed == 2
        assert flakectl.process_uploads(c, R, [999], dry_run=True).uploads_processed == 1
        assert flakectl.process_commit(c, R, "sha1").testruns_marked == 3
    for table in TABLES:
        _denied(url, f"select * from {table}")
        _denied(url, f"delete from {table}")
    _denied(url, "update test_analytics_flake set count = 0")
    _denied(url, "insert into flakectl.processed_upload (upload_id, repo_id) values (1, 1)")
    for call in INTERNAL:
        _denied(url, f"select {call}")

    assert main(["db", "grant", "--revoke", worker, "--dsn", db_url]) == 0
    for call in ("flakectl.process_commit(1, 'sha1', dry_run => true)", "flakectl.process_uploads(1, '{1}')",
                 *INTERNAL):
        _denied(url, f"select * from {call}")
