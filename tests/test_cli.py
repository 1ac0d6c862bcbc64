"""The flakectl command, in-process through main(argv), against real servers:
every subcommand, each user-mistake path (one line, exit 1; usage: exit 2),
and `verify` catching deliberately corrupted function bodies."""

from __future__ import annotations

import argparse
import json
import re
from datetime import timedelta

import psycopg
import pytest

import flakectl
from flakectl import sqlfiles
from flakectl.dba import migrate
from flakectl.lab import bench
from flakectl.cli import build_parser, main
from flakectl.dba.durations import format_duration, parse_duration

from builders import Repo, at

HEAD = migrate.head()
HEAD_FUNCTIONS = ", ".join(f"{name} v{max(v):04d}" for name, v in sorted(sqlfiles.versions().items()))


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `flakectl ARGS...`: (exit code, stdout, stderr)."""
    for name in ("FLAKECTL_DATABASE_URL", "FLAKECTL_REPO", "FLAKECTL_LOOKBACK", "FLAKECTL_JSON",
                 "FLAKECTL_COMMIT", "FLAKECTL_UPLOADS", "FLAKECTL_EXPIRE_AFTER", "FLAKECTL_BENCH_DSN",
                 "FLAKECTL_DEMO_UPLOADS", "FLAKECTL_BENCH_UPLOADS",
                 "FLAKECTL_TESTS", "FLAKECTL_OTHER_ROWS", "FLAKECTL_REPEAT", "FLAKECTL_SHAPE"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flakectl: error: "), err
    assert "Traceback" not in err
    return lines[0][len("flakectl: error: "):]


@pytest.fixture
def repo(conn: psycopg.Connection) -> Repo:
    return Repo(conn)


def history(repo: Repo) -> dict[str, int]:
    """Commit sha1: test a fails then passes, b fails twice, c passes; committed."""
    up1 = repo.upload("sha1")
    up2 = repo.upload("sha1")
    repo.runs(up1, ("a", "failure", at(1)), ("b", "error", at(1)), ("c", "pass", at(1)))
    repo.runs(up2, ("a", "pass", at(2)), ("b", "failure", at(2)), ("c", "pass", at(2)))
    repo.conn.commit()
    return {"up1": up1, "up2": up2}


SHA1_SUMMARY = dict(uploads_processed=2, uploads_skipped=0, testruns_considered=4, flakes_created=2,
                    flakes_updated=0, flakes_expired=0, testruns_marked=3)


def state(conn: psycopg.Connection) -> tuple[list, list, list]:
    """(flakes, run outcomes, ledger) as plain rows, for before/after comparisons."""
    conn.commit()
    flakes = conn.execute("select test_id, count, fail_count, recent_passes_count, end_date"
                          " from test_analytics_flake order by id").fetchall()
    runs = conn.execute("select upload_id, test_id, outcome from ta_timeseries_testrun"
                        " order by upload_id, test_id, outcome").fetchall()
    ledger = conn.execute("select upload_id from flakectl.processed_upload order by 1").fetchall()
    conn.commit()
    return flakes, runs, ledger


# --- durations --------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("1d", timedelta(days=1)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
    ("90s", timedelta(seconds=90)), ("2w", timedelta(weeks=2)), ("1d12h", timedelta(hours=36)),
    (" 2D ", timedelta(days=2)), ("0s", timedelta(0)),
])
def test_parse_duration(text, value):
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["xyz", "", "1", "d", "1.5d", "-1d", "1y", "1d x"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="invalid duration .* e.g. 1d, 12h, 30m, 90s, 2w"):
        parse_duration(text)


@pytest.mark.parametrize("value, text", [
    (timedelta(days=30), "30d"), (timedelta(days=14), "2w"), (timedelta(hours=36), "36h"),
    (timedelta(seconds=90), "90s"), (timedelta(0), "0s"),
])
def test_format_duration(value, text):
    assert format_duration(value) == text
    assert parse_duration(text) == value


# --- help and usage ---------------------------------------------------------


SUBCOMMANDS = [["db", "upgrade"], ["db", "downgrade"], ["db", "current"], ["db", "sql"], ["process"],
               ["verify"], ["status"], ["prune"], ["demo"], ["bench"], ["split"], ["replay"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help_has_an_example_and_every_flags_env_var(cli, words):
    code, out, err = cli(*words, "--help")
    assert (code, err) == (0, "")
    assert "\nexample:\n" in out
    assert "flakectl " + " ".join(words) in out.split("\nexample:\n")[1]
    flags = set(re.findall(r"^  (--[a-z-]+)", out, re.M)) - {"--help"}
    assert flags, out
    text = " ".join(out.split())
    for flag in flags:
        name = OWN_VARIABLE.get((" ".join(words), flag), flag[2:].upper().replace("-", "_"))
        assert f"env: FLAKECTL_{name}" in text, flag


# Flags whose variable is not FLAKECTL_<FLAG>: the same name would mean another thing elsewhere.
OWN_VARIABLE = {
    **{(" ".join(w), "--dsn"): "DATABASE_URL" for w in SUBCOMMANDS},
    ("bench", "--dsn"): "BENCH_DSN",  # the bench writes to no database unless named for it
    ("process", "--force"): "PROCESS_FORCE",  # a switch that writes: one command's own
    ("demo", "--uploads"): "DEMO_UPLOADS",  # a count; process --uploads is a list of ids
    ("bench", "--uploads"): "BENCH_UPLOADS",
    ("replay", "--apply"): "REPLAY_APPLY",  # a write: never set by a variable meant for another command
}


def test_every_environment_variable_has_one_meaning():
    """A variable read by several commands is read with the same type and metavar by each
    (FLAKECTL_UPLOADS was a list of ids for process and a count for demo and bench)."""
    parser = build_parser()
    meanings: dict[str, set] = {}
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:  # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                stack.extend(action.choices.values())
        for option in p.get_default("_env_options") or []:
            action = next(a for a in p._actions if a.dest == option.dest)  # noqa: SLF001
            meanings.setdefault(option.env, set()).add(
                (getattr(option.convert, "__qualname__", option.convert), action.metavar))
    assert {env: m for env, m in meanings.items() if len(m) > 1} == {}
    assert meanings["FLAKECTL_UPLOADS"] == {("id_list", "ID,ID,...")}
    assert meanings["FLAKECTL_DEMO_UPLOADS"] == meanings["FLAKECTL_BENCH_UPLOADS"] == {("positive_int", "N")}


def test_a_count_in_flakectl_uploads_is_not_taken_for_an_upload_id(cli, monkeypatch):
    monkeypatch.setenv("FLAKECTL_DEMO_UPLOADS", "8")
    monkeypatch.setenv("FLAKECTL_BENCH_UPLOADS", "8")
    code, out, err = cli("process", "--repo", "42", "--dry-run")
    assert (code, out) == (2, "")
    assert err == ("flakectl: error: give --commit or --uploads (or set FLAKECTL_COMMIT or"
                   " FLAKECTL_UPLOADS)\n")


def test_top_level_help_lists_the_commands(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in ("db", "process", "verify", "status", "prune", "demo", "bench"):
        assert re.search(rf"^    {name} ", out, re.M)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND (see `flakectl --help`)"),
    (["process", "--repo", "1", "--commit", "s", "--lookback", "xyz"],
     "argument --lookback: invalid duration 'xyz': use a number and a unit (w, d, h, m, s),"
     " e.g. 1d, 12h, 30m, 90s, 2w or 1d12h (see `flakectl process --help`)"),
    (["process", "--repo", "1", "--commit", "s", "--expire-after", "0"],
     "argument --expire-after: must be at least 1, got 0 (see `flakectl process --help`)"),
    (["process", "--repo", "one", "--commit", "s"],
     "argument --repo: expected a whole number, got 'one' (see `flakectl process --help`)"),
    (["process", "--repo", "1"], "give --commit or --uploads (or set FLAKECTL_COMMIT or FLAKECTL_UPLOADS)"),
    (["process", "--commit", "s"], "--repo is required (or set FLAKECTL_REPO)"),
    (["process", "--repo", "1", "--commit", "s", "--uploads", "1"],
     "argument --uploads: not allowed with argument --commit (see `flakectl process --help`)"),
    (["process", "--repo", "1", "--uploads", "1,x"],
     "argument --uploads: expected upload ids separated by commas, e.g. 11,12,13, got '1,x'"
     " (see `flakectl process --help`)"),
    (["prune", "--older-than", "soon"],
     "argument --older-than: invalid duration 'soon': use a number and a unit (w, d, h, m, s),"
     " e.g. 1d, 12h, 30m, 90s, 2w or 1d12h (see `flakectl prune --help`)"),
    (["db", "downgrade"], "the following arguments are required: REV (see `flakectl db downgrade --help`)"),
    (["verify", "--repo", "99999999999999999999", "--commit", "c1"],
     "argument --repo: must fit a bigint (-9223372036854775808 to 9223372036854775807),"
     " got 99999999999999999999 (see `flakectl verify --help`)"),
    (["process", "--repo", "-99999999999999999999", "--commit", "c1"],
     "argument --repo: must fit a bigint (-9223372036854775808 to 9223372036854775807),"
     " got -99999999999999999999 (see `flakectl process --help`)"),
    (["status", "--limit", "99999999999999999999"],
     "argument --limit: must be at most 9223372036854775807, got 99999999999999999999"
     " (see `flakectl status --help`)"),
    (["status", "--repo", "99999999999999999999"],
     "argument --repo: must fit a bigint (-9223372036854775808 to 9223372036854775807),"
     " got 99999999999999999999 (see `flakectl status --help`)"),
    (["demo", "--tests", "0"], "argument --tests: must be at least 1, got 0 (see `flakectl demo --help`)"),
    (["bench", "--uploads", "0"], "argument --uploads: must be at least 1, got 0 (see `flakectl bench --help`)"),
    (["bench", "--shape", "spiky"], "argument --shape: expected one of realistic, uniform, storm, got 'spiky'"
                                    " (see `flakectl bench --help`)"),
    (["bench", "--other-rows", "-1"], "argument --other-rows: must be 0 or more, got -1"
                                      " (see `flakectl bench --help`)"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate' (choose from 'db', 'process',"
                     " 'verify', 'status', 'replay', 'prune', 'split', 'demo', 'bench') (see `flakectl --help`)"),
])
def test_usage_errors_are_one_line_and_exit_2(cli, argv, message):
    code, out, err = cli(*argv)
    assert (code, out) == (2, "")
    assert one_error_line(err) == message


def test_environment_supplies_options_and_flags_win(cli, monkeypatch, db_url, repo):
    history(repo)
    monkeypatch.setenv("FLAKECTL_DATABASE_URL", db_url)
    monkeypatch.setenv("FLAKECTL_REPO", "1")
    monkeypatch.setenv("FLAKECTL_COMMIT", "sha1")
    monkeypatch.setenv("FLAKECTL_JSON", "yes")
    code, out, _ = cli("process", "--dry-run")
    assert code == 0
    assert json.loads(out) == {**SHA1_SUMMARY, "dry_run": True}
    # --uploads on the command line wins over FLAKECTL_COMMIT
    code, out, _ = cli("process", "--dry-run", "--uploads", "999", "--force")
    assert json.loads(out)["uploads_processed"] == 1
    assert json.loads(out)["testruns_considered"] == 0


@pytest.mark.parametrize("name, value, message", [
    ("FLAKECTL_LOOKBACK", "xyz", "FLAKECTL_LOOKBACK='xyz' (for --lookback): invalid duration 'xyz'"),
    ("FLAKECTL_JSON", "maybe", "FLAKECTL_JSON='maybe' (for --json): expected 1/0, true/false"),
])
def test_bad_environment_values_are_usage_errors(cli, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    code, _, err = cli("process", "--repo", "1", "--commit", "s")
    assert code == 2
    assert one_error_line(err).startswith(message)


# --- connecting -------------------------------------------------------------


def test_connection_refused_is_one_line(cli):
    code, out, err = cli("status", "--dsn", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert (code, out) == (1, "")
    line = one_error_line(err)
    assert line.startswith("cannot connect to PostgreSQL at 127.0.0.1:1, database nowhere: ")
    assert line.endswith("; check --dsn, $FLAKECTL_DATABASE_URL or the PG* variables")


def test_malformed_dsn_is_one_line(cli):
    code, _, err = cli("process", "--repo", "1", "--commit", "s", "--dsn", "nonsense")
    assert code == 1
    assert one_error_line(err) == (
        'cannot connect to PostgreSQL at (an unreadable DSN): missing "=" after "nonsense" in'
        " connection info string; check --dsn, $FLAKECTL_DATABASE_URL or the PG* variables")


def test_libpq_variables_when_no_dsn(cli, monkeypatch, server, db_url):
    params = psycopg.conninfo.conninfo_to_dict(db_url)
    for key, env in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"), ("dbname", "PGDATABASE")):
        monkeypatch.setenv(env, str(params[key]))
    code, out, _ = cli("db", "current")
    assert (code, out) == (0, f"{HEAD} (head)\n")


def test_key_value_dsn(cli, db_url):
    params = psycopg.conninfo.conninfo_to_dict(db_url)
    code, out, _ = cli("db", "current", "--dsn", psycopg.conninfo.make_conninfo(**params))
    assert (code, out) == (0, f"{HEAD} (head)\n")


# --- db ---------------------------------------------------------------------


def function_names(url: str) -> list[str]:
    with psycopg.connect(url) as c:
        return [n for (n,) in c.execute(
            "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'flakectl' order by 1")]


def test_db_upgrade_current_downgrade(cli, empty_db_url):
    assert cli("db", "current", "--dsn", empty_db_url) == (0, f"none (not installed; head is {HEAD})\n", "")
    assert cli("db", "upgrade", "0002", "--dsn", empty_db_url) == (
        0, "", "flakectl: upgraded from nothing to 0002\n")
    code, out, _ = cli("db", "current", "--json", "--dsn", empty_db_url)
    assert json.loads(out) == {"revision": "0002", "head": HEAD, "up_to_date": False}
    assert cli("db", "current", "--dsn", empty_db_url)[1] == f"0002 (head is {HEAD})\n"
    assert "prune_ledger" not in function_names(empty_db_url)

    assert cli("db", "upgrade", "--dsn", empty_db_url) == (0, "", f"flakectl: upgraded from 0002 to {HEAD}\n")
    assert function_names(empty_db_url) == sorted(sqlfiles.versions())  # a function per plpgsql/ folder
    assert cli("db", "upgrade", "--dsn", empty_db_url) == (0, "", f"flakectl: already at {HEAD}\n")

    assert cli("db", "downgrade", "0002", "--dsn", empty_db_url) == (
        0, "", f"flakectl: downgraded from {HEAD} to 0002\n")
    assert "prune_ledger" not in function_names(empty_db_url)
    assert cli("db", "downgrade", "base", "--dsn", empty_db_url) == (
        0, "", "flakectl: downgraded from 0002 to nothing (flakectl removed)\n")
    assert function_names(empty_db_url) == []
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("select to_regnamespace('flakectl')").fetchone() == (None,)


def test_db_unknown_revision(cli, empty_db_url):
    code, out, err = cli("db", "upgrade", "0099", "--dsn", empty_db_url)
    assert (code, out) == (1, "")
    assert one_error_line(err) == (
        f"Can't locate revision identified by '0099'; known revisions: "
        f"{', '.join(f'{n:04d}' for n in range(1, int(migrate.head()) + 1))}, or head / base")
    assert cli("db", "sql", "nope")[0] == 1


def test_db_upgrade_failure_keeps_detail_and_hint_and_changes_nothing(cli, db_url, empty_db_url):
    # Two open flakes for one test: revision 0002 refuses (its guard names them).
    assert cli("db", "upgrade", "0001", "--dsn", empty_db_url)[0] == 0
    with psycopg.connect(empty_db_url) as c:
        c.execute("insert into test_analytics_flake (repoid, test_id, recent_passes_count, count,"
                  " fail_count, start_date) values (1, 'a', 0, 1, 1, now()), (1, 'a', 0, 1, 1, now())")
    code, _, err = cli("db", "upgrade", "--dsn", empty_db_url)
    assert code == 1
    assert err.splitlines() == [
        "flakectl: error: migration failed, nothing was changed: test_analytics_flake has more than"
        " one open flake for a test; nothing was changed",
        "flakectl: detail: repoid 1, test_id \\x61: flake ids {1,2}",
        'flakectl: hint: Close all but the newest open flake of each test (README, "Adopting a database"),'
        " then upgrade again.",
    ]
    assert cli("db", "current", "--dsn", empty_db_url)[1] == f"0001 (head is {HEAD})\n"


def _psql(server, url: str, sql: str) -> None:
    import shutil
    import subprocess

    psql = server.bin_dir / "psql"
    psql = str(psql) if psql.exists() else shutil.which("psql")
    assert psql, "psql not found"
    subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url], input=sql, text=True,
                   check=True, capture_output=True)


def definitions(url: str) -> dict[str, str]:
    with psycopg.connect(url) as c:
        return dict(c.execute(
            "select p.proname, pg_get_functiondef(p.oid) from pg_proc p"
            " join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'flakectl'"))


def test_db_sql_applied_by_psql_equals_an_online_upgrade(cli, server, db_url, empty_db_url):
    code, sql, err = cli("db", "sql")
    assert (code, err) == (0, "")
    assert sql.startswith("BEGIN;\n") and sql.rstrip().endswith("COMMIT;")
    assert "create or replace function flakectl.process_upload_set" in sql
    assert "%%" not in sql
    for path in sqlfiles.released():
        name, version = path.split("/")
        assert sqlfiles.body(name, int(version[1:5])).strip() in sql, path
    _psql(server, empty_db_url, sql)
    assert definitions(empty_db_url) == definitions(db_url)
    # the bodies' format('%s') survived: the message names the value
    with psycopg.connect(empty_db_url) as c, pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        c.execute("select flakectl.prune_ledger(interval '1 day')")
    assert info.value.diag.message_primary.endswith("got 1 day")
    assert cli("db", "current", "--dsn", empty_db_url)[1] == f"{HEAD} (head)\n"


def test_db_sql_from_a_revision(cli, server, empty_db_url):
    assert cli("db", "upgrade", "0002", "--dsn", empty_db_url)[0] == 0
    code, sql, _ = cli("db", "sql", "--from", "0002")
    assert code == 0
    assert "-- Running upgrade 0002 -> 0003" in sql
    assert "-- Running upgrade 0003 -> 0004" in sql
    assert "0001 ->" not in sql and "create table %1$I." not in sql  # 0001's Codecov tables
    _psql(server, empty_db_url, sql)
    assert "prune_ledger" in function_names(empty_db_url)


# --- process ----------------------------------------------------------------


def test_process_commit_text(cli, db_url, repo):
    history(repo)
    code, out, err = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1")
    assert (code, err) == (0, "")
    assert out == (
        "uploads_processed    2\n"
        "uploads_skipped      0\n"
        "testruns_considered  4\n"
        "flakes_created       2\n"
        "flakes_updated       0\n"
        "flakes_expired       0\n"
        "testruns_marked      3\n")
    flakes, runs, ledger = state(repo.conn)
    assert [(bytes(t), c, f, r, e) for t, c, f, r, e in flakes] == [
        (b"a", 2, 1, 1, None), (b"b", 2, 2, 0, None)]
    assert len(ledger) == 2

    code, out, err = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--json")
    assert json.loads(out) == {**dict.fromkeys(SHA1_SUMMARY, 0), "uploads_skipped": 2, "dry_run": False}
    assert err == ("flakectl: nothing to process for commit sha1 of repository 1: its 2 upload(s)"
                   " were processed before\n")


def test_process_options_reach_the_function(cli, db_url, repo):
    history(repo)
    before = state(repo.conn)
    code, out, err = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--dry-run",
                         "--json", "--expire-after", "1")
    assert code == 0
    assert json.loads(out) == {**SHA1_SUMMARY, "flakes_updated": 0, "flakes_expired": 1, "dry_run": True}
    assert err == "flakectl: dry run: nothing was written\n"
    assert state(repo.conn) == before
    # a lookback shorter than the runs' age leaves only their uploads
    code, out, _ = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--dry-run",
                       "--json", "--lookback", "1m")
    assert json.loads(out) == {**dict.fromkeys(SHA1_SUMMARY, 0), "uploads_processed": 2, "dry_run": True}


def test_process_uploads_refuses_ids_without_a_run_of_the_repository(cli, db_url, repo):
    """A mistyped id (3040 for 304) would be recorded in the ledger and its upload skipped when it
    arrives: refused, naming the ids, and nothing written."""
    ups = history(repo)
    other = Repo(repo.conn, repo_id=2)
    theirs = other.upload("sha9")
    other.runs(theirs, ("z", "failure", at(1)))
    repo.conn.commit()
    before = state(repo.conn)
    for extra in ([], ["--dry-run"]):
        code, out, err = cli("process", "--dsn", db_url, "--repo", "1", "--uploads",
                             f"{ups['up1']},3040,{theirs},777,3040", *extra)
        assert (code, out) == (1, "")
        named = ",".join(map(str, sorted([777, 3040, theirs])))  # each once, ascending
        assert err == (f"flakectl: error: no test run of repository 1 in upload(s) {named}:"
                       " check --repo and --uploads; processing them would record them in the ledger,"
                       " and skip them if they arrive later (--force to do it anyway)\n")
    assert state(repo.conn) == before


def test_process_uploads_refuses_what_it_cannot_check(cli, db_url, repo):
    """A role that cannot read the runs table (a worker's, say) gets the check's refusal, not a
    raw permission error, and --force as the way past it."""
    ups = history(repo)
    repo.conn.execute("create role flakectl_cli_reader login")
    repo.conn.commit()
    try:
        dsn = psycopg.conninfo.make_conninfo(db_url, user="flakectl_cli_reader")
        code, out, err = cli("process", "--dsn", dsn, "--repo", "1", "--uploads", f"{ups['up1']},7")
        assert (code, out) == (1, "")
        assert err == (f"flakectl: error: cannot check that upload(s) 7,{ups['up1']} have runs of"
                       " repository 1: permission denied for table ta_timeseries_testrun; run as a role"
                       " that can read the runs table, or give --force to process them unchecked\n")
    finally:
        repo.conn.execute("drop role flakectl_cli_reader")
        repo.conn.commit()


def test_process_uploads(cli, db_url, repo):
    ups = history(repo)
    code, out, _ = cli("process", "--dsn", db_url, "--repo", "1", "--uploads", f"{ups['up2']}, 777", "--json",
                       "--force")
    assert code == 0
    assert json.loads(out) == dict(uploads_processed=2, uploads_skipped=0, testruns_considered=1,
                                   flakes_created=1, flakes_updated=0, flakes_expired=0,
                                   testruns_marked=1, dry_run=False)
    assert state(repo.conn)[2] == [(777,), (ups["up2"],)]


def test_process_unknown_commit_is_zeros_not_an_error(cli, db_url):
    code, out, err = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "nope", "--json")
    assert code == 0
    assert json.loads(out) == {**dict.fromkeys(SHA1_SUMMARY, 0), "dry_run": False}
    assert err == ("flakectl: nothing to process for commit nope of repository 1: no processed"
                   " test_results upload (check --repo and --commit)\n")


NOT_INSTALLED = "flakectl is not installed in this database: {}run `flakectl db upgrade` (or `alembic upgrade head`)"


@pytest.mark.parametrize("command, reason", [
    (["process", "--repo", "1", "--commit", "sha1"], 'schema "flakectl" does not exist; '),
    (["verify", "--repo", "1", "--commit", "sha1"], ""),
    (["prune", "--older-than", "30d"], 'schema "flakectl" does not exist; '),
    (["status"], ""),
])
def test_not_installed(cli, empty_db_url, command, reason):
    code, out, err = cli(*command, "--dsn", empty_db_url)
    assert (code, out) == (1, "")
    assert one_error_line(err) == NOT_INSTALLED.format(reason)


def test_prune_on_a_database_before_0003_says_upgrade(cli, db_url):
    assert cli("db", "downgrade", "0002", "--dsn", db_url)[0] == 0
    code, _, err = cli("prune", "--older-than", "30d", "--dsn", db_url)
    assert code == 1
    assert one_error_line(err) == NOT_INSTALLED.format(
        "function flakectl.prune_ledger(older_than => interval) does not exist; ")


def test_process_lock_busy(cli, db_url, repo):
    history(repo)
    with psycopg.connect(db_url) as holder:
        holder.execute("select 1")  # a transaction is open: the call's lock stays until rollback
        flakectl.process_commit(holder, 1, "other", dry_run=True)
        code, out, err = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--no-wait")
        assert (code, out) == (1, "")
        assert one_error_line(err) == ("repository 1 is being processed by another call;"
                                       " retry later, or leave out --no-wait to wait for it")
        # another repository does not wait
        assert cli("process", "--dsn", db_url, "--repo", "2", "--commit", "x", "--no-wait")[0] == 0
        holder.rollback()
    assert cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--no-wait")[0] == 0


def test_process_works_under_a_repeatable_read_default(cli, db_url, repo):
    # the command asks for READ COMMITTED whatever the database's default
    with psycopg.connect(db_url, autocommit=True) as c:
        name = c.execute("select current_database()").fetchone()[0]
        c.execute(f'alter database "{name}" set default_transaction_isolation = \'repeatable read\'')
    history(repo)
    code, out, _ = cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--json")
    assert code == 0
    assert json.loads(out)["uploads_processed"] == 2


# --- verify -----------------------------------------------------------------


def test_verify_identical_and_rolled_back(cli, db_url, repo):
    history(repo)
    before = state(repo.conn)
    code, out, err = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1")
    assert code == 0
    assert out == ("identical: repository 1, commit sha1: 2 uploads, 4 runs considered, 3 marked,"
                   " flakes 2 created / 0 updated / 0 expired\n")
    assert err == "flakectl: rolled back: nothing was changed\n"
    assert state(repo.conn) == before


def test_verify_json(cli, db_url, repo):
    history(repo)
    code, out, _ = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1", "--json")
    assert code == 0
    assert json.loads(out) == {"repo_id": 1, "commit_sha": "sha1", "identical": True,
                               "expected": SHA1_SUMMARY, "got": SHA1_SUMMARY, "differences": []}


def test_verify_unknown_commit_is_an_error(cli, db_url):
    code, out, err = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "nope")
    assert (code, out) == (1, "")
    assert one_error_line(err) == "repository 1 has no commit 'nope': nothing to verify"


def test_verify_processed_commit_says_it_covered_nothing(cli, db_url, repo):
    history(repo)
    assert cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1")[0] == 0
    code, out, err = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1")
    assert code == 0
    assert out.startswith("identical: repository 1, commit sha1: 0 uploads")
    assert err == ("flakectl: the commit's 2 upload(s) were processed before, so the comparison"
                   " covered nothing; verify a commit before it is processed\n"
                   "flakectl: rolled back: nothing was changed\n")


def runnable_v0001(body: str) -> str:
    """A v0001 body of process_upload_set as head's entry points can call it:
    head's functions run with search_path = pg_catalog, pg_temp, and v0001
    names Codecov's tables unqualified."""
    return body.replace("\nlanguage plpgsql\n", "\nlanguage plpgsql\nset search_path = public, pg_catalog\n", 1)


def corrupt(conn: psycopg.Connection, old: str, new: str) -> None:
    body = sqlfiles.body("process_upload_set", 1)
    assert body.count(old) == 1, old
    conn.execute(runnable_v0001(body.replace(old, new)))
    conn.commit()


def test_verify_catches_the_expire_at_or_above_trap(cli, db_url, repo):
    # A flake already at 30 recent passes must expire on its next pass.
    flake_id = repo.flake("a", rpc=30, count=5, fail_count=3)
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)))
    repo.conn.commit()
    assert cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1")[0] == 0

    corrupt(repo.conn, "greatest(p_expire_after - o.recent_passes_count, 1)",
            "p_expire_after - o.recent_passes_count")
    before = state(repo.conn)
    code, out, _ = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1")
    assert code == 1
    assert out.splitlines() == [
        "different: 4 difference(s) between the function and the reference, repository 1, commit sha1",
        "  summary row: flakes_expired expected 1, got 0",
        f"  flake id {flake_id} test \\x61: recent_passes_count expected 31, got 30",
        f"  flake id {flake_id} test \\x61: count expected 6, got 5",
        f"  flake id {flake_id} test \\x61: end_date expected {at(1).isoformat()}, got none",
    ]
    assert state(repo.conn) == before
    # status names the hand-changed body
    code, out, _ = cli("status", "--dsn", db_url)
    assert "process_upload_set modified (matches no released body)" in out


def test_verify_catches_an_off_by_one_in_new_flakes(cli, db_url, repo):
    up = repo.upload("sha1")
    repo.runs(up, ("b", "failure", at(1)), ("b", "pass", at(2)), ("b", "pass", at(3)))
    repo.conn.commit()
    corrupt(repo.conn, "k <= limit_k", "k < limit_k")
    code, out, _ = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1",
                       "--expire-after", "2")
    assert code == 1
    assert out.splitlines() == [
        "different: 2 difference(s) between the function and the reference, repository 1, commit sha1",
        "  new flake test \\x62: recent_passes_count expected 2, got 1",
        "  new flake test \\x62: count expected 3, got 2",
    ]
    code, out, _ = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1",
                       "--expire-after", "2", "--json")
    assert json.loads(out)["differences"][0] == {
        "what": "new flake", "where": "test \\x62", "field": "recent_passes_count",
        "expected": 2, "got": 1}


def test_verify_catches_wrong_marking(cli, db_url, repo):
    up = repo.upload("sha1")
    repo.runs(up, ("c", "error", at(1)))
    repo.conn.commit()
    corrupt(repo.conn, "set outcome = 'flaky_fail'",
            "set outcome = case when r.outcome = 'error' then r.outcome else 'flaky_fail' end")
    code, out, _ = cli("verify", "--dsn", db_url, "--repo", "1", "--commit", "sha1")
    assert code == 1
    assert out.splitlines() == [
        "different: 1 difference(s) between the function and the reference, repository 1, commit sha1",
        f"  run upload {up} test \\x63 at {at(1).isoformat()}: outcome expected flaky_fail, got error",
    ]


# --- status -----------------------------------------------------------------


def test_status(cli, db_url, repo):
    history(repo)
    repo.flake("z", end=at(-5))  # an expired one
    Repo(repo.conn, 2).flake("y")
    repo.conn.commit()
    code, out, _ = cli("status", "--dsn", db_url)
    assert code == 0
    assert out.splitlines() == [
        "layout     one database",
        f"revision   {HEAD} (head)",
        "functions  " + HEAD_FUNCTIONS,
        "ledger     0 uploads",
        "",
        "      repo      open   expired",
        "         1         0         1",
        "         2         1         0",
    ]
    assert cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1")[0] == 0
    code, out, _ = cli("status", "--dsn", db_url, "--repo", "1", "--limit", "1")
    lines = out.splitlines()
    assert re.fullmatch(rf"ledger     2 uploads; last: upload \d+ of repo 1, commit sha1, at \S+ \S+", lines[3])
    assert lines[6:] == [
        "         1         2         1",
        "         2         1         0",
        "",
        "open flakes of repo 1 (2), most failing first:",
        " fails   count  passes  since                      test",
        f"     2       2       0  {at(1):%Y-%m-%d %H:%M:%S%z}   \\x62",
        "... and 1 more (--limit)",
    ]


def test_status_json(cli, db_url, repo):
    history(repo)
    repo.conn.execute("update ta_timeseries_testrun set computed_name = 'tests/test_a.py::a'"
                      " where test_id = 'a'")
    repo.conn.commit()
    assert cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1")[0] == 0
    code, out, _ = cli("status", "--dsn", db_url, "--repo", "1", "--json")
    data = json.loads(out)
    assert data["revision"] == HEAD and data["head"] == HEAD
    assert data["functions"]["prune_ledger"] == f"v{max(sqlfiles.versions()['prune_ledger']):04d}"
    assert data["ledger_rows"] == 2 and data["last_repo_id"] == 1 and data["last_commit_sha"] == "sha1"
    assert data["repos"] == [{"repo_id": 1, "open": 2, "expired": 0}]
    assert [(f["name"], f["fail_count"], f["count"], f["recent_passes_count"]) for f in data["open_flakes"]] == [
        (None, 2, 2, 0), ("tests/test_a.py::a", 1, 2, 1)]
    assert data["open_total"] == 2
    assert data["layout"] == {"side": "one", "target": None, "link_answers": None, "link_error": None,
                              "undone": False}


# --- prune ------------------------------------------------------------------


def test_prune(cli, db_url, repo):
    history(repo)
    assert cli("process", "--dsn", db_url, "--repo", "1", "--commit", "sha1")[0] == 0
    repo.conn.execute("insert into flakectl.processed_upload (upload_id, repo_id, processed_at) values"
                      " (1, 1, now() - interval '31 days'), (2, 1, now() - interval '40 days'),"
                      " (3, 1, now() - interval '29 days')")
    repo.conn.commit()
    assert cli("prune", "--dsn", db_url, "--older-than", "30d") == (
        0, "pruned 2 ledger row(s) older than 30d\n", "")
    assert len(state(repo.conn)[2]) == 3
    code, out, _ = cli("prune", "--dsn", db_url, "--older-than", "2d", "--json")
    assert json.loads(out) == {"deleted": 1, "older_than_seconds": 2 * 86400}


@pytest.mark.parametrize("age, shown", [("1d", "1 day"), ("47h", "1 day 23:00:00")])
def test_prune_refuses_short_ages(cli, db_url, age, shown):
    code, out, err = cli("prune", "--dsn", db_url, "--older-than", age)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "flakectl: error: argument older_than must be at least 2 days (twice the default lookback),"
        f" got {shown}; use --older-than 2d or longer",
        "flakectl: hint: An upload pruned sooner could be processed again and counted twice.",
    ]


# --- bench (the smallest sizes; tests/test_bench.py covers the bench itself) ----


def test_bench_small(cli, db_url):
    code, out, err = cli("bench", "--dsn", db_url, "--uploads", "3", "--tests", "200",
                         "--other-rows", "0", "--repeat", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"flakectl bench: PostgreSQL \d+\.\d+.*, \d+ CPUs, .* GB RAM; shared_buffers \S+,"
                        r" work_mem \S+, jit (on|off); 1 timed calls of A, C, W and 1 of B \(medians\),"
                        r" A called 10\+ times per session", lines[0]), lines[0]
    assert lines[1:6] == [
        "",
        "realistic: 3 uploads x 200 tests = 600 runs in the commit"
        " (+0 other rows; 2 flaky tests, 200 open flakes; seed 1)",
        lines[3],
        "A and B agree (flakes, run outcomes, counters)",
        "",
    ]
    assert re.fullmatch(r"function summary: 3 uploads, \d+ runs considered, \d+ flakes created,"
                        r" \d+ updated, \d+ expired, \d+ runs marked", lines[3]), lines[3]
    assert lines[6:8] == [
        "| path | median | min | max | rows | buffers | not in shared buffers | peak backend memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    number = r"[\d,.]+ (ms|s)"
    for line, path in zip(lines[8:12], ("A function", "B worker path", "C read floor", "W write floor")):
        assert re.fullmatch(rf"\| {path} \| {number} \| {number} \| {number} \| [\d,]+ \| [\d,]+"
                            r" \| [\d,]+ \| ([\d,.]+ MB|n/a) \|", line), line
    assert lines[12] == ""
    # the server runs on this machine: each path's time on a CPU and waiting for one
    assert lines[13].startswith("on a CPU (the backend's time on a CPU, from /proc/<pid>/schedstat")
    assert lines[14:17] == ["", "| path | CPU median | CPU min | waiting for a CPU (median) |", "|---|---:|---:|---:|"]
    for line, path in zip(lines[17:21], ("A function", "B worker path", "C read floor", "W write floor")):
        assert re.fullmatch(rf"\| {path} \| {number} \| {number} \| {number} \|", line), line
    assert lines[21] == ""
    assert re.fullmatch(r"by CPU: B/A = [\d,.]+x    A/C = [\d,.]+    A/W = [\d,.]+    W/C = [\d,.]+",
                        lines[22]), lines[22]
    lines[12:24] = [""]  # the rest as without CPU times
    assert re.fullmatch(r"B/A = [\d,.]+x    A/C = [\d,.]+    A/W = [\d,.]+    W/C = [\d,.]+",
                        lines[13]), lines[13]
    assert re.fullmatch(rf"W's marking UPDATE alone: median {number} \(\d+ runs\)", lines[14]), lines[14]
    assert re.fullmatch(r"A, every call in order \(ms; the first untimed\): [\d.]+(, [\d.]+){9}",
                        lines[15]), lines[15]
    for line, path in zip(lines[16:18], "CW"):
        assert re.fullmatch(rf"{path}, every call in order \(ms; the first untimed\): [\d.]+, [\d.]+",
                            line), line
    assert lines[18:] == ["", bench.PROTOCOL + "."]
    progress = err.splitlines()
    assert progress[0] == "flakectl bench: generating realistic: 3 uploads x 200 tests + 0 other rows"
    assert re.fullmatch(r"flakectl bench: generated in [\d.]+ s; running A, B, C, W", progress[1])
    assert progress[2:] == ["flakectl bench: A and B agree (flakes, run outcomes, counters)"]


def test_bench_reads_its_own_dsn_variable_only(cli, monkeypatch, db_url):
    monkeypatch.setenv("FLAKECTL_DATABASE_URL", db_url)
    monkeypatch.setenv("FLAKECTL_BENCH_DSN", "postgresql://postgres@127.0.0.1:1/nowhere")
    code, out, err = cli("bench", "--uploads", "1", "--tests", "1")
    assert (code, out) == (1, "")
    assert one_error_line(err).startswith("could not connect to PostgreSQL: ")


def test_every_subcommand_is_tested():
    parser = build_parser()
    names = {a.dest for a in parser._subparsers._group_actions}  # noqa: SLF001
    assert names == {"command"}
    choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert sorted(choices) == sorted({w[0] for w in SUBCOMMANDS})


# --- startup, --version, values that start with a dash (issue 12) ------------


HEAVY = ("alembic", "sqlalchemy", "psycopg")


def _modules_after(code: str) -> list[str]:
    import subprocess
    import sys

    script = (f"import sys\n{code}\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_import_flakectl_imports_neither_alembic_nor_sqlalchemy():
    assert _modules_after("import flakectl") == ["[]"]
    # the wrapper runs on the caller's connection: no driver of its own (issue 14)
    assert _modules_after("import flakectl\nflakectl.process_commit") == ["[]"]


@pytest.mark.parametrize("argv", [["--help"], ["process", "--help"], ["process"], ["--version"]])
def test_the_command_line_alone_imports_nothing_heavy(argv):
    """`flakectl --help` and `flakectl process --help` start fast: no driver, no Alembic."""
    lines = _modules_after(f"from flakectl.cli import main\nmain({argv!r})")
    assert lines[-1] == "[]"


def test_version(cli):
    from importlib.metadata import version

    assert cli("--version") == (0, f"flakectl {version('flakectl')}\n", "")


@pytest.mark.parametrize("argv, message", [
    (["--lookback", "-1d"], "argument --lookback: invalid duration '-1d': use a number and a unit"
     " (w, d, h, m, s), e.g. 1d, 12h, 30m, 90s, 2w or 1d12h (see `flakectl process --help`)"),
    (["--expire-after", "-3"], "argument --expire-after: must be at least 1, got -3"
     " (see `flakectl process --help`)"),
    (["--uploads", "-5"], "argument --uploads: not allowed with argument --commit"
     " (see `flakectl process --help`)"),
])
def test_a_value_starting_with_a_dash_gets_its_own_message(cli, argv, message):
    assert cli("process", "--repo", "1", "--commit", "s", *argv) == (2, "", f"flakectl: error: {message}\n")
