"""DBA tools you can trust (issue 15): downgrades that keep the ledger, one
migration at a time, guarded offline SQL, a verify that sees everything a
call can change, infinity timestamps, hostile test names, SIGTERM, and the
command line's edges. Real PostgreSQL, real sessions; no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from flakectl.dba import dbadmin, migrate
from flakectl.errors import DataWouldBeLost

from builders import Repo, at
from sessions import InThread, connect, join_all, wait_until
from test_cli import cli  # noqa: F401 - the fixture: flakectl ARGS in-process

HEAD = migrate.head()
ROOT = Path(__file__).resolve().parent.parent


def ledger_refusal(rows: int, target: str = "0001") -> str:
    return (
        f"downgrading below 0002 drops flakectl.processed_upload, which holds {rows} row(s): the"
        " ledger of processed uploads: without it every upload is processed, and counted, again"
        " (exactly-once is lost). Nothing was changed. To keep them, export the table first (psql:"
        " \\copy flakectl.processed_upload to 'processed_upload.csv' csv header) or stay at 0002 or"
        f" later; to drop them anyway: flakectl db downgrade {target} --drop-data (alembic: -x"
        f" drop_data=true downgrade {target})"
    )


def commit_c1(conn: psycopg.Connection) -> Repo:
    """Commit c1 of repo 1: 4 uploads; test a fails in each, then passes."""
    repo = Repo(conn)
    for n in range(4):
        up = repo.upload("c1")
        repo.runs(up, ("a", "failure", at(10 * n)), ("a", "pass", at(10 * n + 1)),
                  ("b", "pass", at(10 * n)))
    conn.commit()
    return repo


def flakes_and_ledger(conn: psycopg.Connection) -> tuple[list, list]:
    conn.commit()
    flakes = conn.execute("select id, test_id, count, fail_count, recent_passes_count, end_date"
                          " from test_analytics_flake order by id").fetchall()
    has_ledger = conn.execute("select to_regclass('flakectl.processed_upload') is not null").fetchone()[0]
    ledger = conn.execute("select upload_id from flakectl.processed_upload order by 1").fetchall() \
        if has_ledger else None
    conn.commit()
    return flakes, ledger


# --- 1. a downgrade below 0002 keeps the ledger unless told ---------------------------


def test_downgrade_below_0002_refuses_while_the_ledger_holds_rows(db_url, conn):
    repo = commit_c1(conn)
    conn.execute("select * from flakectl.process_commit(1, 'c1')")
    conn.commit()
    before = flakes_and_ledger(conn)
    assert len(before[1]) == 4 and before[0][0][2:4] == (8, 4)

    with pytest.raises(DataWouldBeLost) as info:
        dbadmin.downgrade(db_url, "0001")
    assert str(info.value) == ledger_refusal(4)
    with pytest.raises(DataWouldBeLost) as info:  # Alembic's own path (URL, no shared connection)
        migrate.downgrade(db_url, "base")
    assert str(info.value) == ledger_refusal(4, "base")
    assert dbadmin.current(db_url) == HEAD
    assert flakes_and_ledger(conn) == before
    # exactly-once held: processing c1 again changes nothing
    assert conn.execute("select uploads_processed, uploads_skipped from flakectl.process_commit(1, 'c1')"
                        ).fetchone() == (0, 4)
    conn.commit()
    assert flakes_and_ledger(conn) == before

    # a downgrade that keeps the ledger is not refused
    assert dbadmin.downgrade(db_url, "0002") == (HEAD, "0002")
    assert flakes_and_ledger(conn) == before
    # with drop_data, it goes
    assert dbadmin.downgrade(db_url, "0001", drop_data=True) == ("0002", "0001")
    assert flakes_and_ledger(conn) == (before[0], None)
    assert repo.flakes()  # the Codecov tables and their rows stay


def test_downgrade_of_an_empty_ledger_is_not_refused(db_url):
    assert dbadmin.downgrade(db_url, "0001") == (HEAD, "0001")


def test_alembic_command_downgrade_refuses_then_drops_with_x_drop_data(db_url, conn):
    commit_c1(conn)
    conn.execute("select * from flakectl.process_commit(1, 'c1')")
    conn.commit()
    env = {**os.environ, "FLAKECTL_DATABASE_URL": db_url}

    def alembic(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    refused = alembic("downgrade", "0001")
    assert refused.returncode == 255  # Alembic's exit for its `FAILED:` messages
    assert refused.stdout == f"FAILED: {ledger_refusal(4)}\n"  # one message, no traceback
    assert "Traceback" not in refused.stderr
    assert migrate.current(db_url) == HEAD
    done = alembic("-x", "drop_data=true", "downgrade", "0001")
    assert done.returncode == 0, done.stderr
    assert migrate.current(db_url) == "0001"


# --- 5. concurrent `db upgrade`: the second waits, then finds nothing to do ----------


def test_concurrent_upgrades_serialize_on_the_migration_lock(empty_db_url):
    dsn = psycopg.conninfo.make_conninfo(empty_db_url)
    with connect(empty_db_url, "holder", autocommit=True) as holder, \
            connect(empty_db_url, "monitor", autocommit=True) as monitor:
        holder.execute("select pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK_KEY,))
        sessions = []
        for name in ("upgrade-a", "upgrade-b"):
            sessions.append(InThread(
                empty_db_url, name + "-thread",
                lambda _c, n=name: dbadmin.upgrade(psycopg.conninfo.make_conninfo(dsn, application_name=n)),
                autocommit=True))
            pid = wait_until(monitor, name, "Lock", "advisory")
            assert monitor.execute(
                "select classid::bigint << 32 | objid::bigint, objsubid from pg_locks"
                " where pid = %s and locktype = 'advisory' and not granted", (pid,)
            ).fetchall() == [(migrate.MIGRATION_LOCK_KEY, 1)]
        holder.execute("select pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK_KEY,))
        results = join_all(sessions)
    assert sorted(results, key=str) == sorted([(None, HEAD), (HEAD, HEAD)], key=str)
    assert migrate.current(empty_db_url) == HEAD


# --- 3. offline SQL checks where it starts -------------------------------------------


def psql(server, url: str, script: str) -> subprocess.CompletedProcess:
    import shutil

    exe = server.bin_dir / "psql"
    exe = str(exe) if exe.exists() else shutil.which("psql")
    assert exe, "psql not found"
    return subprocess.run([exe, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url], input=script,
                          text=True, capture_output=True, timeout=60)


def installed(url: str) -> tuple[str | None, dict[str, str]]:
    with psycopg.connect(url) as c:
        version = c.execute("select version_num from alembic_version").fetchone() \
            if c.execute("select to_regclass('alembic_version')").fetchone()[0] else None
        return version and version[0], dict(c.execute(
            "select p.proname, pg_get_functiondef(p.oid) from pg_proc p"
            " join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'flakectl'"))


def test_offline_script_refuses_a_database_at_another_revision(server, empty_db_url):
    migrate.upgrade(empty_db_url, "0002")
    before = installed(empty_db_url)
    result = psql(server, empty_db_url, dbadmin.offline_sql("head", "0003"))
    assert result.returncode == 3, result
    assert ("ERROR:  flakectl: this script upgrades from 0003, but the database is at 0002;"
            " nothing was changed\nHINT:  print the script for the database's revision: flakectl db sql"
            " REV --from <the revision `flakectl db current` shows>") in result.stderr
    assert installed(empty_db_url) == before and "prune_ledger" not in before[1]
    # the script for where it is applies
    assert psql(server, empty_db_url, dbadmin.offline_sql("head", "0002")).returncode == 0
    assert installed(empty_db_url)[0] == HEAD


def test_offline_install_script_refuses_an_installed_database(server, db_url, empty_db_url):
    before = installed(db_url)
    result = psql(server, db_url, dbadmin.offline_sql("head"))
    assert result.returncode == 3
    assert (f"ERROR:  flakectl: this script installs flakectl from nothing, but the database is at {HEAD};"
            " nothing was changed") in result.stderr
    assert installed(db_url) == before
    assert psql(server, empty_db_url, dbadmin.offline_sql("0002")).returncode == 0
    assert installed(empty_db_url)[0] == "0002"


@pytest.mark.parametrize("revision, start", [("0002", "0004"), ("base", "0002"), ("0001", "head")])
def test_offline_sql_refuses_a_downgrade(revision, start):
    with pytest.raises(dbadmin.NotAnUpgrade) as info:
        dbadmin.offline_sql(revision, start)
    assert str(info.value) == (f"{revision} lies below --from {start}: `db sql` prints upgrades only;"
                               f" to downgrade, run `flakectl db downgrade {revision}` against the database")


# --- 4. timestamps Python's datetime cannot hold ----------------------------------------


def test_infinity_runs_are_read_verified_and_shown(cli, db_url, conn):
    from flakectl.model import INFINITY, OutOfRange
    from flakectl.dba.snapshot import read_snapshot

    repo = Repo(conn)
    up = repo.upload("c1")
    repo.runs(up, ("a", "pass", at(1)))
    conn.execute("insert into ta_timeseries_testrun (timestamp, test_id, outcome, repo_id, upload_id) values"
                 " ('infinity', 'a', 'failure', 1, %s), ('infinity', 'b', 'error', 1, %s),"
                 " ('10000-01-01 00:00:00+00', 'b', 'pass', 1, %s), ('-infinity', 'c', 'failure', 1, %s)",
                 (up, up, up, up))
    conn.commit()
    runs = {(r.test_id, r.timestamp) for r in read_snapshot(conn, 1, commit_sha="c1").testruns}
    assert (b"a", INFINITY) in runs and (b"b", OutOfRange("10000-01-01 00:00:00+00")) in runs
    assert cli("verify", "--dsn", db_url, "--repo", 1, "--commit", "c1") == (
        0, "identical: repository 1, commit c1: 1 uploads, 4 runs considered, 2 marked,"
           " flakes 2 created / 0 updated / 0 expired\n",
        "flakectl: rolled back: nothing was changed\n")
    assert cli("process", "--dsn", db_url, "--repo", 1, "--commit", "c1")[0] == 0
    # b's failure at infinity sorts after its pass in year 10000: the pass is ignored
    assert [(f.test_id, f.count, f.start_date) for f in repo.flakes()] == [
        (b"a", 1, INFINITY), (b"b", 1, INFINITY)]
    code, out, _ = cli("status", "--dsn", db_url, "--repo", 1)
    assert code == 0
    assert out.splitlines()[-3:] == [
        " fails   count  passes  since                      test",
        "     1       1       0  infinity                   \\x61",
        "     1       1       0  infinity                   \\x62",
    ]
    code, out, _ = cli("status", "--dsn", db_url, "--repo", 1, "--json")
    assert [f["start_date"] for f in json.loads(out)["open_flakes"]] == ["infinity", "infinity"]


# --- the command line: db downgrade --drop-data, db sql refusing a downgrade ---------
# (numbers out of range: tests/test_cli.py's usage errors)


def test_cli_downgrade_refuses_then_drops_with_drop_data(cli, db_url, conn):
    commit_c1(conn)
    assert cli("process", "--dsn", db_url, "--repo", 1, "--commit", "c1")[0] == 0
    before = flakes_and_ledger(conn)
    code, out, err = cli("db", "downgrade", "0001", "--dsn", db_url)
    assert (code, out, err) == (1, "", f"flakectl: error: {ledger_refusal(4)}\n")
    assert flakes_and_ledger(conn) == before
    # the cycle the issue found: processing c1 again counts nothing twice
    code, out, _ = cli("process", "--dsn", db_url, "--repo", 1, "--commit", "c1", "--json")
    assert (code, json.loads(out)["uploads_skipped"], json.loads(out)["flakes_updated"]) == (0, 4, 0)
    assert flakes_and_ledger(conn) == before
    assert cli("db", "downgrade", "0001", "--drop-data", "--dsn", db_url) == (
        0, "", f"flakectl: downgraded from {HEAD} to 0001\n")
    assert flakes_and_ledger(conn) == (before[0], None)


def test_cli_db_sql_refuses_a_downgrade_with_exit_2(cli):
    assert cli("db", "sql", "0002", "--from", "0004") == (
        2, "", "flakectl: error: 0002 lies below --from 0004: `db sql` prints upgrades only; to downgrade,"
               " run `flakectl db downgrade 0002` against the database\n")


# --- 2. verify sees everything a call can change -------------------------------------


def scene(conn: psycopg.Connection) -> dict[str, int]:
    """Repo 1's commit c1 (upload u1: a fails then passes, b passes, c passes
    on an open flake; a run of repo 2 fails in it too), repo 1's commit c2
    (upload u2: a fails, not processed), an expired flake of a, and repo 2's
    open flake of x."""
    one, two = Repo(conn, 1), Repo(conn, 2)
    u1, u2 = one.upload("c1"), one.upload("c2")
    one.runs(u1, ("a", "failure", at(1)), ("a", "pass", at(2)), ("b", "pass", at(1)), ("c", "pass", at(1)))
    one.runs(u1, ("z", "failure", at(1)), repo_id=2)
    one.runs(u2, ("a", "error", at(3)))
    ids = {"u1": u1, "u2": u2,
           "history": one.flake("a", count=4, fail_count=2, start=at(-60), end=at(-5)),
           "open": one.flake("c", count=2, fail_count=1, start=at(-30)),
           "other": two.flake("x", count=1, fail_count=1, start=at(-30))}
    conn.commit()
    return ids


def install_broken(conn: psycopg.Connection, pattern: str, replacement: str) -> None:
    """Install the live process_upload_set, or the state machine it calls (which
    reads and marks the runs), with one deliberate change."""
    import re

    changed = []
    for function in ("process_upload_set", "state_machine"):
        (src,) = conn.execute("select pg_get_functiondef(%s::regproc)", (f"flakectl.{function}",)).fetchone()
        broken, n = re.subn(pattern, replacement, src, flags=re.S)
        if n:
            changed.append((function, n, broken))
    assert [(f, n) for f, n, _ in changed] in ([("process_upload_set", 1)], [("state_machine", 1)]), pattern
    conn.execute(changed[0][2])
    conn.commit()


def verify_lines(cli, db_url: str) -> tuple[int, list[str]]:
    code, out, err = cli("verify", "--dsn", db_url, "--repo", 1, "--commit", "c1")
    assert err.endswith("flakectl: rolled back: nothing was changed\n")
    return code, out.splitlines()


def test_verify_is_identical_on_the_released_body_and_changes_nothing(cli, db_url, conn):
    scene(conn)
    before = flakes_and_ledger(conn), conn.execute(
        "select upload_id, test_id, outcome from ta_timeseries_testrun order by 1, 2, 3").fetchall()
    conn.commit()
    assert verify_lines(cli, db_url) == (0, [
        "identical: repository 1, commit c1: 1 uploads, 3 runs considered, 1 marked,"
        " flakes 1 created / 1 updated / 0 expired"])
    assert (flakes_and_ledger(conn), conn.execute(
        "select upload_id, test_id, outcome from ta_timeseries_testrun order by 1, 2, 3").fetchall()) == before


# (the live bodies run with search_path = pg_catalog, pg_temp: injected statements name their schema)
_RETURN = r"(\n\s*return v_result;\s*end;\s*\$\w*\$\s*)$"

BROKEN = {
    # the ledger insert removed: the commit would be counted twice
    "no ledger insert": (
        r"\n\s*begin\s+insert into \S*processed_upload.*?end;", "",
        lambda ids: [
            f"ledger upload {ids['u1']}: row expected recorded, got missing",
            "writes flakectl.processed_upload: rows inserted expected 1, got 0",
        ]),
    # the marking UPDATE without its upload filter: marks commit c2's run too
    "marking without the upload filter": (
        r"(set outcome = 'flaky_fail'\s+where p_mark\s+)and r\.upload_id = any\(p_uploads\)\s+", r"\1",
        lambda ids: ["writes ta_timeseries_testrun: rows updated expected 1, got 2"]),
    # the marking UPDATE without its repository filter: marks repo 2's run in the upload
    "marking without the repo filter": (
        r"\s+and r\.repo_id = p_repo_id(\s+and r\.timestamp >= p_cutoff\s+\),)", r"\1",
        lambda ids: [
            f"run upload {ids['u1']} test \\x7a at {at(1).isoformat()}: outcome expected failure,"
            " got flaky_fail",
            "writes ta_timeseries_testrun: rows updated expected 1, got 2",
        ]),
    # a history row written (upstream's trap: expired rows taken as current)
    "history row written": (
        _RETURN, "\n  update public.test_analytics_flake set fail_count = fail_count + 1"
                 " where repoid = p_repo_id and end_date is not null;\\1",
        lambda ids: [
            f"flake id {ids['history']} test \\x61: row expected unchanged (history or another row the"
            " reference does not touch), got written: count=4 fail_count=3 recent_passes_count=0"
            f" start={at(-60).isoformat()} ended {at(-5).isoformat()}",
            "writes test_analytics_flake: rows updated expected 1, got 2",
        ]),
    # another repository's flake written
    "other repository's flake written": (
        _RETURN, "\n  update public.test_analytics_flake set count = count + 1 where repoid <> p_repo_id;\\1",
        lambda ids: ["writes test_analytics_flake: rows updated expected 1, got 2"]),
    # a run deleted
    "run deleted": (
        _RETURN, "\n  delete from public.ta_timeseries_testrun where outcome = 'pass' and test_id = 'b';\\1",
        lambda ids: ["writes ta_timeseries_testrun: rows deleted expected 0, got 1"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_verify_reports_a_broken_body_exactly(cli, db_url, conn, name):
    pattern, replacement, differences = BROKEN[name]
    ids = scene(conn)
    install_broken(conn, pattern, replacement)
    code, lines = verify_lines(cli, db_url)
    assert (code, lines) == (1, [
        f"different: {len(differences(ids))} difference(s) between the function and the reference,"
        " repository 1, commit c1", *(f"  {d}" for d in differences(ids))])


def test_verify_reads_what_the_reference_needs_not_every_run(db_url, conn):
    from flakectl.dba.snapshot import read_snapshot

    repo = Repo(conn)
    up = repo.upload("c1")
    repo.flake("k", start=at(-30))
    repo.runs(up, ("a", "failure", at(1)), ("a", "pass", at(2)), ("k", "pass", at(1)),
              *[(f"t{n}", "pass", at(1)) for n in range(2000)], ("s", "skip", at(1)))
    conn.commit()
    bounded = read_snapshot(conn, 1, commit_sha="c1", bounded=True)
    assert sorted((r.test_id, r.outcome) for r in bounded.testruns) == [
        (b"a", "failure"), (b"a", "pass"), (b"k", "pass")]
    assert len(read_snapshot(conn, 1, commit_sha="c1").testruns) == 2004
    conn.rollback()


def test_verify_uses_flake_ids_as_documented(cli, db_url, conn):
    scene(conn)
    (before,) = conn.execute("select last_value from test_analytics_flake_id_seq").fetchone()
    conn.commit()
    assert verify_lines(cli, db_url)[0] == 0
    # one flake created and rolled back: its id is used up (sequences are not transactional)
    assert conn.execute("select last_value from test_analytics_flake_id_seq").fetchone() == (before + 1,)


# --- 5. status: hostile test names, a database at 0001 --------------------------------


def test_status_escapes_test_names_and_shas_from_ci_data(cli, db_url, conn):
    repo = Repo(conn)
    sha = "c1\x1b]0;owned\x07"
    up = repo.upload(sha)
    repo.runs(up, ("a", "failure", at(1)), ("b", "failure", at(1)))
    conn.execute("update ta_timeseries_testrun set computed_name = case test_id"
                 " when 'a' then E'test_a\\nFAKE LINE' else E'\\x1b[2Jtest_b\\\\x' end")
    conn.commit()
    assert cli("process", "--dsn", db_url, "--repo", 1, "--commit", sha)[0] == 0
    code, out, _ = cli("status", "--dsn", db_url, "--repo", 1)
    assert code == 0
    assert all(c.isprintable() for line in out.splitlines() for c in line)
    lines = out.splitlines()
    assert f"commit c1\\x1b]0;owned\\x07, at " in next(line for line in lines if line.startswith("ledger"))
    assert [line[51:] for line in lines[-2:]] == ["test_a\\nFAKE LINE", "\\x1b[2Jtest_b\\\\x"]
    code, out, _ = cli("status", "--dsn", db_url, "--repo", 1, "--json")
    assert all(c.isprintable() or c == "\n" for c in out) and out.isascii()
    data = json.loads(out)
    assert data["last_commit_sha"] == sha
    assert [f["name"] for f in data["open_flakes"]] == ["test_a\nFAKE LINE", "\x1b[2Jtest_b\\x"]


def test_status_on_a_database_at_0001_says_partly_installed(cli, empty_db_url):
    migrate.upgrade(empty_db_url, "0001")
    assert cli("status", "--dsn", empty_db_url) == (
        1, "", "flakectl: error: flakectl is partly installed in this database: it is at revision 0001,"
               " which has the Codecov tables but not flakectl's ledger and functions (head is"
               f" {HEAD}); run `flakectl db upgrade` to finish the install\n")


# --- 5. SIGTERM cancels the server-side call, as Ctrl-C does --------------------------


@pytest.mark.parametrize("command", ["process", "verify"])
def test_sigterm_cancels_the_call_on_the_server(db_url, conn, command):
    import signal

    from sessions import LOCK_NAMESPACE

    commit_c1(conn)
    name = f"sigterm-{command}"
    dsn = psycopg.conninfo.make_conninfo(db_url, application_name=name)
    with connect(db_url, "holder") as holder, connect(db_url, "monitor", autocommit=True) as monitor:
        holder.execute("select pg_advisory_xact_lock(%s, 1)", (LOCK_NAMESPACE,))
        proc = subprocess.Popen([sys.executable, "-m", "flakectl", command, "--repo", "1", "--commit", "c1",
                                 "--dsn", dsn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("FLAKECTL_")})
        try:
            pid = wait_until(monitor, name, "Lock", "advisory")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert (proc.returncode, out, err) == (143, "", "flakectl: terminated\n")
        # the backend is gone (psycopg cancelled the statement, rolled back and closed before the
        # command exited; the server ends the backend as it reads the close): nothing parked on the
        # lock, nothing holding it
        deadline = time.monotonic() + 20
        while monitor.execute("select state from pg_stat_activity where pid = %s", (pid,)).fetchall():
            assert time.monotonic() < deadline, "the backend stayed"
            time.sleep(0.01)
        assert monitor.execute("select count(*) from pg_locks where pid = %s and locktype = 'advisory'",
                               (pid,)).fetchone() == (0,)
        holder.rollback()
    assert flakes_and_ledger(conn) == ([], [])


def test_verify_and_status_read_the_codecov_schema_the_install_recorded(cli, empty_db_url):
    with psycopg.connect(empty_db_url) as c:
        c.execute("create schema codecov")
    migrate.upgrade(empty_db_url, codecov_schema="codecov")
    with psycopg.connect(empty_db_url, options="-c search_path=codecov") as c:
        commit_c1(c)
        c.execute("create table public.test_analytics_flake (like codecov.test_analytics_flake)")  # a decoy
        c.commit()
    assert cli("verify", "--dsn", empty_db_url, "--repo", 1, "--commit", "c1") == (
        0, "identical: repository 1, commit c1: 4 uploads, 8 runs considered, 4 marked,"
           " flakes 1 created / 0 updated / 0 expired\n", "flakectl: rolled back: nothing was changed\n")
    assert cli("process", "--dsn", empty_db_url, "--repo", 1, "--commit", "c1")[0] == 0
    code, out, _ = cli("status", "--dsn", empty_db_url, "--repo", 1, "--json")
    assert code == 0
    assert [(f["test_id"], f["fail_count"], f["count"]) for f in json.loads(out)["open_flakes"]] == [
        ("\\x61", 4, 8)]
