"""`flakectl split` on two throwaway PostgreSQL servers (SPEC "Deployments").

One pair of servers for the module (M: the main database's server, R: the runs
database's), a fresh database on each for every test. M starts as a
one-database deployment (flakectl installed, so its ledger moves with the
flakes) unless a test makes a Codecov main database without flakectl. Both
servers log every statement, so the password test can read the logs.
"""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import replace

import psycopg
import pytest
from hypothesis import given, settings

import flakectl
from flakectl import reference
from flakectl.cli import main
from flakectl.dba import migrate, split
from flakectl.dba.connection import describe
from flakectl.dba.status import read_status
from flakectl.dba.split import SplitFailed, SplitRefused
from flakectl.lab.pgserver import ThrowawayServer

from builders import Repo, at
from dbdata import assert_state, insert
from test_differential import _materialize, histories
from conftest import create_database, drop_database
from sessions import InThread, wait_until

PASSWORD = "s3cret-Link-pw"
_names = itertools.count()
FLAKE_COLUMNS = ("id, repoid, test_id, flags_id, recent_passes_count, count, fail_count,"
                 " start_date, end_date")


@pytest.fixture(scope="module")
def pair():
    settings = {"log_statement": "all"}
    with ThrowawayServer(settings=settings) as m, ThrowawayServer(settings=settings) as r:
        migrate.upgrade(create_database(m, "one_db_template"))
        codecov = create_database(m, "codecov_template")
        migrate.upgrade(codecov, "0001")  # Codecov's tables, no flakectl
        with psycopg.connect(codecov, autocommit=True) as c:
            c.execute("drop table flakectl.created_table, flakectl.codecov_schema, alembic_version; drop schema flakectl")
        yield m, r


class Dbs:
    def __init__(self, pair, template: str):
        self.m_server, self.r_server = pair
        n = f"{os.getpid()}_{next(_names)}"
        self.m_name, self.r_name = f"m{n}", f"r{n}"
        self.m = create_database(self.m_server, self.m_name, template)
        self.r = create_database(self.r_server, self.r_name)
        # the DSNs given to split carry a password (trust auth ignores it): it must
        # reach the user mappings and nothing else
        self.m_dsn = self.m.replace("postgres@", f"postgres:{PASSWORD}@")
        self.r_dsn = self.r.replace("postgres@", f"postgres:{PASSWORD}@")

    def split(self, **kwargs) -> tuple[int, list[str]]:
        lines: list[str] = []
        code = split.split(self.m_dsn, self.r_dsn, out=lines.append, **kwargs)
        return code, lines

    def undo(self) -> tuple[int, list[str]]:
        return self.split(undo=True)

    def drop(self) -> None:
        drop_database(self.m_server, self.m_name)
        drop_database(self.r_server, self.r_name)


@pytest.fixture
def dbs(pair):
    d = Dbs(pair, "one_db_template")
    yield d
    d.drop()


@pytest.fixture
def codecov_dbs(pair):
    d = Dbs(pair, "codecov_template")
    yield d
    d.drop()


def q(url: str, query: str, params=None) -> list[tuple]:  # noqa: ANN001
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("set timezone = 'UTC'")
        cur = c.execute(query, params)
        return cur.fetchall() if cur.description else []


def flakes(url: str, table: str = "test_analytics_flake") -> list[tuple]:
    return q(url, f"select {FLAKE_COLUMNS} from {table} order by id")


def catalog(url: str) -> tuple:
    """What split may create or change in a database: relations and their kinds and
    rows, servers, user mappings, extensions, comments, triggers."""
    rels = q(url, "select n.nspname, c.relname, c.relkind::text, obj_description(c.oid, 'pg_class')"
                  "  from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                  " where c.relkind in ('r', 'f', 'p', 'v') and n.nspname not in ('pg_catalog', 'information_schema')"
                  " order by 1, 2")
    rows = {f"{s}.{t}": q(url, f'select count(*) from "{s}"."{t}"')[0][0] for s, t, k, _ in rels if k != "f"}
    return (rels, rows,
            q(url, "select srvname, srvoptions from pg_foreign_server order by 1"),
            q(url, "select srvname, usename, umoptions from pg_user_mappings order by 1, 2"),
            q(url, "select extname from pg_extension order by 1"),
            q(url, "select tgname from pg_trigger where not tgisinternal order by 1"),
            q(url, "select nspname from pg_namespace order by 1"))


def seed(url: str) -> dict:
    """M's history: repository 1 with open and expired flakes, an upload in the ledger,
    and commit `sha2` with a processed upload to process after the split."""
    with psycopg.connect(url) as c:
        repo = Repo(c, 1)
        ids = [repo.flake("a", count=3, fail_count=2, rpc=1), repo.flake("b", end=at(-1), flags_id=b"fl"),
               repo.flake("c", count=2, fail_count=2)]
        Repo(c, 2).flake("a")
        done = repo.upload("sha1")
        c.execute("insert into flakectl.processed_upload (upload_id, repo_id, commit_sha) values (%s, 1, 'sha1')",
                  (done,))
        up = repo.upload("sha2")
        c.commit()
    return {"flake_ids": ids, "done": done, "upload": up}


def add_runs(url: str, upload: int, *runs: tuple[str, str, int]) -> None:
    with psycopg.connect(url) as c:
        Repo(c, 1).runs(upload, *[(t, o, at(m)) for t, o, m in runs])


# --------------------------------------------------------------------------
# split, process, undo, split again
# --------------------------------------------------------------------------


def test_split_moves_flakes_and_ledger_and_undo_brings_them_back(dbs):
    s = seed(dbs.m)
    before = flakes(dbs.m)
    ledger_before = q(dbs.m, "select * from flakectl.processed_upload order by 1")

    code, lines = dbs.split()
    assert code == 0
    assert [line.split(" ", 1)[0] for line in lines] == [f"[{n}/9]" for n in range(1, 10)] + ["split"]
    # (and, from revision 0006 on, ", 0 flake_archive")
    assert lines[5].startswith("[6/9] main: writers of test_analytics_flake stopped (readers go on); copied 4"
                               " flake(s) with their ids and 1 processed_upload")
    assert lines[5].endswith(" row(s) to the runs database")
    assert lines[8].startswith("[9/9] verified: 4 flake(s), md5 ")

    # M: the old table renamed, a read-only foreign table in its place, same rows
    kinds = dict((t, k) for _, t, k, _ in catalog(dbs.m)[0] if t.startswith("test_analytics_flake"))
    assert kinds == {"test_analytics_flake": "f", "test_analytics_flake_pre_split": "r"}
    assert flakes(dbs.m) == before == flakes(dbs.r) == flakes(dbs.m, "test_analytics_flake_pre_split")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="does not allow updates"):
        q(dbs.m, "update test_analytics_flake set count = 0")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="does not allow truncates"):
        q(dbs.m, "truncate test_analytics_flake")
    # R: the ledger moved, the reports are read-only foreign tables, the sequence past the ids
    assert q(dbs.r, "select * from flakectl.processed_upload order by 1") == ledger_before
    assert q(dbs.r, "select c.relname, c.relkind::text from pg_class c where relname in"
                    " ('commits', 'reports_commitreport', 'reports_upload', 'ta_timeseries_testrun') order by 1") == [
        ("commits", "f"), ("reports_commitreport", "f"), ("reports_upload", "f"), ("ta_timeseries_testrun", "r")]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="does not allow inserts"):
        q(dbs.r, "insert into commits (commitid, repoid) values ('x', 1)")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="does not allow truncates"):
        q(dbs.r, "truncate reports_upload")
    assert q(dbs.r, "select nextval(pg_get_serial_sequence('test_analytics_flake', 'id'))")[0][0] > max(
        f[0] for f in before)

    # processing happens in R: process_commit reads M's reports across the link
    add_runs(dbs.r, s["upload"], ("a", "failure", 10), ("c", "pass", 10), ("d", "failure", 10))
    with psycopg.connect(dbs.r) as c:
        summary = flakectl.process_commit(c, 1, "sha2")
        assert (summary.uploads_processed, summary.flakes_created, summary.flakes_updated) == (1, 1, 2)
        assert flakectl.process_commit(c, 1, "sha1").uploads_skipped == 1  # the moved ledger
    after = flakes(dbs.r)
    assert flakes(dbs.m) == after and len(after) == 5  # M reads what R wrote

    code, lines = dbs.undo()
    assert code == 0
    assert [line.split(" ", 1)[0] for line in lines] == [f"[{n}/5]" for n in range(1, 6)] + ["undone:"]
    assert lines[1].startswith("[2/5] main: copied 5 flake(s) with their ids back from the runs database, and 1"
                               " processed_upload")
    assert lines[1].endswith(" row(s) not there yet")
    kinds = dict((t, k) for _, t, k, _ in catalog(dbs.m)[0] if t.startswith("test_analytics_flake"))
    assert kinds == {"test_analytics_flake": "r"}
    assert flakes(dbs.m) == after
    assert q(dbs.m, "select upload_id from flakectl.processed_upload order by 1") == [
        (s["done"],), (s["upload"],)]
    assert q(dbs.m, "select srvname from pg_foreign_server") == []
    # the next id in M follows the ids written in R
    assert q(dbs.m, "select nextval(pg_get_serial_sequence('test_analytics_flake', 'id'))")[0][0] > max(
        f[0] for f in after)
    # a call in R fails clearly until the next split, and changes nothing
    r_state = (flakes(dbs.r), q(dbs.r, "select * from flakectl.processed_upload order by 1"))
    with psycopg.connect(dbs.r) as c, pytest.raises(flakectl.FlakectlError,
                                                    match="moved back to the main database by `flakectl split --undo`"):
        flakectl.process_uploads(c, 1, [77])
    assert (flakes(dbs.r), q(dbs.r, "select * from flakectl.processed_upload order by 1")) == r_state

    # and a later split works again, with what M wrote meanwhile
    with psycopg.connect(dbs.m) as c:
        Repo(c, 3).flake("z")
    code, lines = dbs.split()
    assert code == 0, lines
    assert flakes(dbs.m) == flakes(dbs.r) == flakes(dbs.m, "test_analytics_flake_pre_split")
    assert len(flakes(dbs.r)) == 6
    with psycopg.connect(dbs.r) as c:
        assert flakectl.process_uploads(c, 1, [77]).uploads_processed == 1


def test_split_again_changes_nothing_and_says_so(dbs):
    seed(dbs.m)
    assert dbs.split()[0] == 0
    before = catalog(dbs.m), catalog(dbs.r)
    code, lines = dbs.split()
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith("already split: the main database reads its 4 flake(s) from the"
                                                   " runs database") and lines[0].endswith("; nothing changed")
    assert (catalog(dbs.m), catalog(dbs.r)) == before
    code, lines = dbs.undo()
    code, lines = dbs.undo()
    assert lines == ["not split: the main database's test_analytics_flake is a regular table; nothing changed"]


def test_dry_run_prints_the_plan_and_changes_nothing(dbs):
    seed(dbs.m)
    before = catalog(dbs.m), catalog(dbs.r)
    code, lines = dbs.split(dry_run=True)
    assert code == 0
    assert len(lines) == 10 and lines[-1] == "dry run: nothing was changed"
    assert lines[5].startswith("[6/9] main: lock test_analytics_flake against writers (readers go on), copy its 4"
                               " row(s) with their ids and flakectl.processed_upload")
    assert (catalog(dbs.m), catalog(dbs.r)) == before


def test_codecov_main_database_without_flakectl(codecov_dbs):
    """Codecov's own main database: no flakectl there; the runs database gets it."""
    d = codecov_dbs
    with psycopg.connect(d.m) as c:
        c.execute("create role codecov_reader")
        c.execute("grant select, insert, update on test_analytics_flake to codecov_reader")
        fid = Repo(c, 1).flake("a")
    code, lines = d.split()
    assert code == 0, lines
    assert "(select granted to codecov_reader)" in lines[7]
    assert q(d.m, "select has_table_privilege('codecov_reader', 'test_analytics_flake', 'select'),"
                  " has_table_privilege('codecov_reader', 'test_analytics_flake', 'insert')") == [(True, False)]
    assert [f[0] for f in flakes(d.m)] == [fid]
    assert q(d.r, "select version_num from alembic_version") == [(migrate.head(),)]


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


SPLIT_VARIABLES = ("FLAKECTL_MAIN_DSN", "FLAKECTL_RUNS_DSN", "FLAKECTL_UNDO", "FLAKECTL_DRY_RUN",
                   "FLAKECTL_CODECOV_SCHEMA", "FLAKECTL_MAIN_LINK_DSN", "FLAKECTL_RUNS_LINK_DSN")


def test_the_command(capsys, monkeypatch, dbs):
    for name in SPLIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        return (code, *capsys.readouterr())

    seed(dbs.m)
    code, out, err = cli("split", "--main-dsn", dbs.m_dsn, "--runs-dsn", dbs.r_dsn)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("split done: process in the runs database (127.0.0.1:")
    assert PASSWORD not in out
    code, out, err = cli("split", "--main-dsn", dbs.m_dsn, "--runs-dsn", dbs.r_dsn)
    assert (code, err, out.count("\n")) == (0, "", 1)
    code, out, err = cli("split", "--main-dsn", dbs.m_dsn, "--runs-dsn", dbs.m_dsn)
    assert (code, out) == (1, "")
    assert err == (f"flakectl: error: split refused, nothing was changed: --main-dsn and --runs-dsn name the"
                   f" same database ({describe(dbs.m_dsn)}); the split layout needs two databases\n")
    # status says which side it looks at and whether the link answers
    m_where, r_where = (f"127.0.0.1:{s.port}/{n}" for s, n in ((dbs.m_server, dbs.m_name),
                                                               (dbs.r_server, dbs.r_name)))
    code, out, err = cli("status", "--dsn", dbs.r)
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [
        f"layout     runs side of a split: the reports are read from the main database {m_where}"
        " (server flakectl_main, read-only)",
        "link       answers"]
    code, out, err = cli("status", "--dsn", dbs.m)
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [
        f"layout     main side of a split: the flakes are read from the runs database {r_where}"
        " (server flakectl_runs, read-only); process there",
        "link       answers"]
    assert out.splitlines()[4].endswith(" (as it was at the split: the runs database's ledger counts)")
    code, out, err = cli("split", "--main-dsn", dbs.m_dsn, "--runs-dsn", dbs.r_dsn, "--undo")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("undone: process in the main database again")
    assert cli("status", "--dsn", dbs.m)[1].splitlines()[0] == "layout     one database"
    assert cli("status", "--dsn", dbs.r)[1].splitlines()[0].endswith(
        "; calls stopped: the flakes were moved back by `flakectl split --undo`")


def test_status_of_a_main_database_without_flakectl(capsys, codecov_dbs):
    d = codecov_dbs
    with psycopg.connect(d.m) as c:
        Repo(c, 1).flake("a")
    assert d.split()[0] == 0
    capsys.readouterr()
    assert main(["status", "--dsn", d.m]) == 1
    assert capsys.readouterr().err == (
        "flakectl: error: flakectl is not installed in this database, the main side of a split: it runs in"
        f" the runs database 127.0.0.1:{d.r_server.port}/{d.r_name} (link answers); run `flakectl status`"
        " there\n")


# --------------------------------------------------------------------------
# Credentials of the link
# --------------------------------------------------------------------------


def test_password_reaches_the_user_mappings_only(dbs, pair):
    seed(dbs.m)
    code, lines = dbs.split()
    assert code == 0
    assert q(dbs.r, "select srvname, umoptions from pg_user_mappings") == [
        ("flakectl_main", ["user=postgres", f"password={PASSWORD}"])]
    assert q(dbs.m, "select srvname, umoptions from pg_user_mappings") == [
        ("flakectl_runs", ["user=postgres", f"password={PASSWORD}"])]
    assert not any(PASSWORD in line for line in lines)
    logs = [p for server in pair for p in glob.glob(os.path.join(server.base_dir, "*.log"))]
    assert logs
    for path in logs:
        with open(path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        assert PASSWORD not in text, path
        assert "postgres_fdw" in text  # the servers do log statements


# --------------------------------------------------------------------------
# Refusals: one line, nothing changed
# --------------------------------------------------------------------------


def _refused(d: Dbs, match: str, **kwargs) -> str:
    before = catalog(d.m), catalog(d.r)
    with pytest.raises(SplitRefused) as info:
        d.split(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("split refused, nothing was changed: ")
    assert match in message, message
    assert (catalog(d.m), catalog(d.r)) == before
    return message


def test_refuses_the_same_database(dbs):
    before = catalog(dbs.m)
    with pytest.raises(SplitRefused, match="--main-dsn and --runs-dsn name the same database"):
        split.split(dbs.m, dbs.m_dsn, out=lambda line: None)
    assert catalog(dbs.m) == before


def test_refuses_while_another_split_runs(dbs):
    seed(dbs.m)
    with psycopg.connect(dbs.r, autocommit=True) as other:
        other.execute("select pg_advisory_lock(%s, 0)", (split.LOCK_KEY,))
        _refused(dbs, "another flakectl split is running on the runs database")


def _without_fdw() -> str:
    """PostgreSQL 16.2 from the pgserver wheel, which ships no postgres_fdw
    (.ci/pg-versions installs it before the suite runs)."""
    root = "/opt/flakectl-pg" if os.geteuid() == 0 else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flakectl-pg")
    return os.path.join(root, "pgserver-0.1.4", "pgserver", "pginstall", "bin")


@pytest.mark.skipif(not os.path.isfile(os.path.join(_without_fdw(), "postgres")),
                    reason="the pgserver 0.1.4 wheel's server (.ci/pg-versions) is not installed")
def test_refuses_a_server_without_postgres_fdw(dbs):
    seed(dbs.m)
    with ThrowawayServer(bin_dir=_without_fdw()) as bare:
        dbs.r = dbs.r_dsn = bare.url
        message = _refused(dbs, "postgres_fdw is not available in the runs database")
    assert message.endswith("postgres_fdw is a contrib module: install it on that database's server"
                            " (Debian/Ubuntu: the postgresql-NN package ships it; RHEL and others:"
                            " postgresqlNN-contrib or postgresql-contrib)")


def test_refuses_a_main_database_without_flakes(dbs):
    q(dbs.m, "drop table test_analytics_flake")
    _refused(dbs, "has no public.test_analytics_flake and no split of its own in progress; nothing to split")


def test_refuses_runs_database_holding_other_flakes(dbs):
    seed(dbs.m)
    migrate.upgrade(dbs.r)
    with psycopg.connect(dbs.r) as c:
        Repo(c, 9).flake("other")
    _refused(dbs, "already holds 1 flake(s) and 0 ledger row(s) that did not come from this main database")


def test_refuses_runs_database_with_local_reports(dbs):
    seed(dbs.m)
    migrate.upgrade(dbs.r)  # flakectl installed first: 0001 made local reports tables
    _refused(dbs, "has a local public.commits; in the split layout it must read the main database's")


def test_refuses_runs_database_of_another_split(dbs, pair):
    seed(dbs.m)
    assert dbs.split()[0] == 0
    other = Dbs(pair, "one_db_template")
    try:
        seed(other.m)
        other.r, other.r_dsn = dbs.r, dbs.r_dsn
        _refused(other, "already holds 4 flake(s) and 1 ledger row(s) that did not come from this main database")
    finally:
        drop_database(other.m_server, other.m_name)
        drop_database(other.r_server, other.r_name)


def test_undo_refuses_a_runs_database_that_is_not_the_split_one(dbs, pair):
    seed(dbs.m)
    assert dbs.split()[0] == 0
    other_r = create_database(pair[1], dbs.r_name + "x")
    try:
        before = catalog(dbs.m)
        with pytest.raises(SplitRefused, match="does not hold this main database's flakes"):
            split.split(dbs.m_dsn, other_r, undo=True, out=lambda line: None)
        assert catalog(dbs.m) == before
    finally:
        drop_database(pair[1], dbs.r_name + "x")


# --------------------------------------------------------------------------
# Interrupted, then run again
# --------------------------------------------------------------------------


# 1-3: only R changed; 4: R installed; 5: M linked; 6-8: inside M's uncommitted swap
@pytest.mark.parametrize("step", [2, 4, 5, 6, 8])
def test_split_stopped_after_any_step_is_finished_by_a_rerun(dbs, monkeypatch, step):
    seed(dbs.m)
    before = flakes(dbs.m)
    monkeypatch.setenv(split.STOP_ENV, str(step))
    with pytest.raises(split.Stopped, match=f"stopped after step {step}"):
        dbs.split()
    # nothing of M's flakes has changed yet: the swap commits with step 9
    assert q(dbs.m, "select relkind::text from pg_class where relname = 'test_analytics_flake'") == [("r",)]
    assert flakes(dbs.m) == before
    with psycopg.connect(dbs.m) as c:  # M's writers went on meanwhile
        Repo(c, 5).flake("meanwhile")
    monkeypatch.delenv(split.STOP_ENV)
    code, lines = dbs.split()
    assert code == 0, lines
    assert flakes(dbs.m) == flakes(dbs.r) == flakes(dbs.m, "test_analytics_flake_pre_split")
    assert len(flakes(dbs.r)) == 5


# 1: R's calls stopped; 2-4: inside M's uncommitted transaction
@pytest.mark.parametrize("step", [1, 4])
def test_undo_stopped_after_any_step_is_finished_by_a_rerun(dbs, monkeypatch, step):
    s = seed(dbs.m)
    assert dbs.split()[0] == 0
    add_runs(dbs.r, s["upload"], ("d", "failure", 10))
    with psycopg.connect(dbs.r) as c:
        flakectl.process_commit(c, 1, "sha2")
    want = flakes(dbs.r)
    monkeypatch.setenv(split.STOP_ENV, str(step))
    with pytest.raises(split.Stopped):
        dbs.undo()
    # still split; R's calls are stopped meanwhile
    assert flakes(dbs.m) == want
    with psycopg.connect(dbs.r) as c, pytest.raises(flakectl.FlakectlError, match="split --undo"):
        flakectl.process_uploads(c, 1, [77])
    with pytest.raises(SplitRefused, match="an undo was started and did not finish"):
        dbs.split()
    monkeypatch.delenv(split.STOP_ENV)
    code, lines = dbs.undo()
    assert code == 0, lines
    assert q(dbs.m, "select relkind::text from pg_class where relname = 'test_analytics_flake'") == [("r",)]
    assert flakes(dbs.m) == want


# --------------------------------------------------------------------------
# Failure behaviour
# --------------------------------------------------------------------------


def test_writer_of_the_main_flake_table_waits_then_fails_and_nothing_is_lost(dbs):
    seed(dbs.m)
    before = flakes(dbs.m)
    writer: list[InThread] = []

    def insert(conn: psycopg.Connection) -> None:
        conn.execute("insert into test_analytics_flake (repoid, test_id, recent_passes_count, count,"
                     " fail_count, start_date) values (1, 'late', 0, 1, 1, now())")
        conn.commit()

    def out(line: str) -> None:
        if line.startswith("[6/9]"):  # M's flake table is locked against writers now
            writer.append(InThread(dbs.m, "late_writer", insert))
            with psycopg.connect(dbs.m, autocommit=True) as monitor:
                wait_until(monitor, "late_writer", "Lock", "relation")
            # a reader goes on meanwhile
            assert flakes(dbs.m) == before

    assert split.split(dbs.m_dsn, dbs.r_dsn, out=out) == 0
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match='foreign table "test_analytics_flake" does not allow inserts'):
        writer[0].join()
    assert flakes(dbs.m) == flakes(dbs.r) == before


def _restart(server: ThrowawayServer) -> None:
    server._pg.start()  # noqa: SLF001 - same data directory and port


def test_main_database_down(dbs, pair):
    s = seed(dbs.m)
    assert dbs.split()[0] == 0
    add_runs(dbs.r, s["upload"], ("a", "failure", 10))
    add_runs(dbs.r, 4242, ("e", "failure", 11))
    state = flakes(dbs.r), q(dbs.r, "select * from flakectl.processed_upload order by 1"), \
        q(dbs.r, "select outcome from ta_timeseries_testrun order by upload_id")
    m_server = pair[0]
    m_server._pg.terminate()  # noqa: SLF001 - M goes down (fast shutdown)
    try:
        with psycopg.connect(dbs.r) as c:
            with pytest.raises(flakectl.FlakectlError, match='could not connect to server "flakectl_main"') as info:
                flakectl.process_commit(c, 1, "sha2")
            assert info.value.sqlstate == "08001"
            c.rollback()
            assert (flakes(dbs.r), q(dbs.r, "select * from flakectl.processed_upload order by 1"),
                    q(dbs.r, "select outcome from ta_timeseries_testrun order by upload_id")) == state
            # the worker that holds its upload ids goes on
            summary = flakectl.process_uploads(c, 1, [4242])
            c.commit()
            link = read_status(c).layout
            assert (link.side, link.answers) == ("runs", False)
            assert 'could not connect to server "flakectl_main"' in link.error
        assert (summary.uploads_processed, summary.flakes_created, summary.testruns_marked) == (1, 1, 1)
    finally:
        _restart(m_server)
    with psycopg.connect(dbs.r) as c:
        assert flakectl.process_commit(c, 1, "sha2").uploads_processed == 1
    assert flakes(dbs.m) == flakes(dbs.r)


# --------------------------------------------------------------------------
# The differential cases in the runs database
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_conns(pair):
    """A split deployment (Codecov's main database, no flakes yet): connections to M and R."""
    d = Dbs(pair, "codecov_template")
    assert d.split()[0] == 0
    with psycopg.connect(d.m) as m, psycopg.connect(d.r) as r:
        yield m, r
    d.drop()


@settings(max_examples=min(settings().max_examples, 40))
@given(history=histories())
def test_function_equals_reference_in_the_runs_database(split_conns, history):
    """test_differential's cases, with the reports in M (read across the link) and the
    runs, flakes and ledger in R: the same results as in one database."""
    m, r = split_conns
    try:
        (now,) = r.execute("select now()").fetchone()
        expected = _materialize(now, history)
        insert(m, replace(expected, testruns=(), flakes=(), ledger=frozenset()))
        m.commit()
        insert(r, replace(expected, commits=(), reports=(), uploads=()))
        known_ids = {f.id for f in expected.flakes}
        for call in history[-1]:
            options = {k: call[k] for k in ("lookback", "expire_after", "dry_run") if k in call}
            if call["kind"] == "commit":
                want = reference.process_commit(expected, call["repo"], call["sha"], **options)
                got = flakectl.process_commit(r, call["repo"], call["sha"], **options)
            else:
                want = reference.process_uploads(expected, call["repo"], call["ids"], **options)
                got = flakectl.process_uploads(r, call["repo"], call["ids"], **options)
            assert got == want.summary, call
            expected = reference.apply(expected, want)
            assert_state(r, expected, known_ids)
    finally:
        r.rollback()
        m.rollback()
        m.execute("truncate reports_upload, reports_commitreport, commits")
        m.commit()


# --------------------------------------------------------------------------
# With the Codecov schema recorded by the install (revision 0005)
# --------------------------------------------------------------------------


def test_install_on_the_main_side_refuses(capsys, codecov_dbs):
    """flakectl belongs in the runs database: `db upgrade` on a split main database
    (Codecov's without flakectl, or a one-database deployment at 0004 moved to the
    split) refuses, naming the supported layout, and changes nothing."""
    one_db = Dbs((codecov_dbs.m_server, codecov_dbs.r_server), "codecov_template")
    try:
        migrate.upgrade(one_db.m, "0004")
        for d in (codecov_dbs, one_db):
            assert d.split()[0] == 0
            before = catalog(d.m)
            capsys.readouterr()
            assert main(["db", "upgrade", "--dsn", d.m]) == 1
            err = capsys.readouterr().err
            assert err.splitlines() == [
                "flakectl: error: migration failed, nothing was changed: public.test_analytics_flake is a"
                " foreign table; flakectl installs only where the flakes are a local table: one database, or"
                " in Codecov's split layout the runs database, where commits and reports_* are the foreign"
                " tables (SPEC \"Deployments\"); nothing was changed",
                "flakectl: hint: Install flakectl in the runs database (flakectl split sets that layout up)."]
            assert catalog(d.m) == before
    finally:
        one_db.drop()


def test_split_with_another_codecov_schema(pair):
    d = Dbs(pair, "template0")
    try:
        q(d.m, "create schema codecov")
        migrate.upgrade(d.m, codecov_schema="codecov")  # a one-database deployment in schema codecov
        with psycopg.connect(d.m) as c:
            c.execute("set search_path = codecov")
            fid = Repo(c, 1).flake("a")
            up = Repo(c, 1).upload("sha9")
        code, lines = d.split()
        assert code == 0, lines
        assert q(d.r, "select name from flakectl.codecov_schema") == [("codecov",)]
        assert q(d.r, "select relnamespace::regnamespace::text, relname, relkind::text from pg_class"
                      " where relname in ('commits', 'test_analytics_flake') order by 2") == [
            ("codecov", "commits", "f"), ("codecov", "test_analytics_flake", "r")]
        assert [f[0] for f in flakes(d.m, "codecov.test_analytics_flake")] == [fid]
        with psycopg.connect(d.r) as c:
            c.execute("set search_path = codecov")
            Repo(c, 1).runs(up, ("a", "failure", at(5)))
            c.commit()
            c.execute("set search_path = public")  # the function finds its schema by the record
            assert flakectl.process_commit(c, 1, "sha9").flakes_updated == 1
        assert flakes(d.m, "codecov.test_analytics_flake") == flakes(d.r, "codecov.test_analytics_flake")
        assert d.undo()[0] == 0
        assert q(d.m, "select relkind::text from pg_class where relname = 'test_analytics_flake'") == [("r",)]
    finally:
        d.drop()


def test_archive_moves_with_the_flakes(dbs):
    """flakectl.flake_archive (revision 0006, replay) moves with the flakes and the
    ledger, and comes back with them."""
    if q(dbs.m, "select to_regclass('flakectl.flake_archive') is null")[0][0]:
        pytest.skip("flakectl.flake_archive comes with revision 0006")
    seed(dbs.m)
    archived = ("insert into flakectl.flake_archive (id, repoid, test_id, flags_id, recent_passes_count, count,"
                " fail_count, start_date, end_date, archived_at)"
                " values (%s, 1, 'old', null, 0, 2, 2, now() - interval '9 days', null, now() - interval '1 day')")
    q(dbs.m, archived, (900,))
    code, lines = dbs.split()
    assert code == 0, lines
    assert "flake(s) with their ids and 1 processed_upload, 1 flake_archive row(s) to the runs" in lines[5]
    archive = "select id, repoid, test_id, archived_at from flakectl.flake_archive order by id"
    assert q(dbs.r, archive) == q(dbs.m, archive)
    q(dbs.r, archived, (901,))  # archived in R after the split
    code, lines = dbs.undo()
    assert code == 0, lines
    assert [row[0] for row in q(dbs.m, archive)] == [900, 901]


def test_a_worker_role_calls_in_the_runs_database(dbs):
    """The worker's role, with `flakectl db grant` in R (EXECUTE on the two entry
    points only), calls process_commit in R: the function reads M's reports across
    the link as its owner, through the user mapping; the role itself reads nothing."""
    s = seed(dbs.m)
    assert dbs.split()[0] == 0
    add_runs(dbs.r, s["upload"], ("a", "failure", 10))
    q(dbs.r, "create role ta_worker login")
    assert main(["db", "grant", "--dsn", dbs.r, "ta_worker"]) == 0
    worker = dbs.r.replace("postgres@", "ta_worker@")
    with psycopg.connect(worker) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("select count(*) from commits")
        c.rollback()
        assert flakectl.process_commit(c, 1, "sha2").flakes_updated == 1
        c.commit()
    assert flakes(dbs.m) == flakes(dbs.r)
