"""Issue 10, hardening: each of the nine defects found on revision 0004, on
head, deterministically (no sleeps: sessions wait on locks that the test sees
in pg_stat_activity, statement_timeout bounds every wait).

1. a run committed into an upload during a call: neither counted nor marked
   (SPEC rule 5), in both serial orders;
2. the Codecov schema: `$user` schemas, another schema, the downgrade, old
   installs, foreign tables (tests/test_hardening_install.py);
3. planted functions, operators and tables; privileges (test_hardening_install.py);
4. corrupt counters, against the reference;
5. repository ids outside integer, the exact lock key;
6. `wait => false` never waits;
7. lookbacks and prune ages judged by the window start they give, in UTC;
8. the CLI's huge durations;
9. the flake UPDATE restricted to the repository's open rows.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

import flakectl
from flakectl import reference
from flakectl.cli import main
from flakectl.model import Summary

from builders import Repo, at
from dbdata import assert_state
from sessions import LOCK_NAMESPACE, InThread, connect, holds_repo_lock, state, wait_until, whole_snapshot

R, S = 1, 2


@pytest.fixture
def monitor(db_url):
    with connect(db_url, "monitor", autocommit=True) as m:
        yield m


def flake_of(conn: psycopg.Connection, test: str) -> list[tuple]:
    return conn.execute(
        "select repoid, count, fail_count, recent_passes_count, end_date is null from test_analytics_flake"
        " where test_id = %s order by id", (test.encode(),)).fetchall()


# --- 1. one snapshot: the call marks exactly the runs it read ------------------------


def _race_scene(db_url: str) -> tuple[int, int]:
    with connect(db_url, "setup") as conn:
        repo = Repo(conn, R)
        fid = repo.flake("t1", rpc=2, count=4, fail_count=2, start=at(-100))
        up = repo.upload("sha1")
        repo.runs(up, ("t1", "failure", at(1)))
        conn.commit()
    return fid, up


def _insert_late_run(db_url: str, up: int) -> None:
    with connect(db_url, "C") as c:
        Repo(c, R).runs(up, ("late", "failure", at(2)))
        c.commit()


def test_a_run_committed_while_the_call_waits_on_a_flake_row_is_neither_counted_nor_marked(db_url, monitor):
    """The issue's repro: A is blocked on its flake UPDATE (B holds the row),
    C commits a failing run into A's upload, B lets go. v0002 marked `late`
    without a flake; head's one statement read and marked before the wait:
    the result is the serial order A, then C."""
    fid, up = _race_scene(db_url)
    with connect(db_url, "B") as b:
        b.execute("select 1 from test_analytics_flake where id = %s for update", (fid,))
        a = InThread(db_url, "A", lambda conn: (flakectl.process_uploads(conn, R, [up]), conn.commit())[0])
        wait_until(monitor, "A", "Lock", "transactionid")
        _insert_late_run(db_url, up)
        b.rollback()
    summary = a.join()
    assert summary == Summary(uploads_processed=1, testruns_considered=1, flakes_updated=1, testruns_marked=1)
    with connect(db_url, "check") as conn:
        assert Repo(conn, R).outcomes(up) == [("late", "failure"), ("t1", "flaky_fail")]
        assert flake_of(conn, "late") == []
        assert flake_of(conn, "t1") == [(R, 5, 3, 0, True)]
        assert conn.execute("select upload_id from flakectl.processed_upload").fetchall() == [(up,)]


def test_a_run_committed_while_the_call_waits_for_the_repository_is_counted_and_marked(db_url, monitor):
    """The other serial order: C commits while A waits for the repository's
    lock, before its statement's snapshot: `late` is counted, marked, and
    opens a flake."""
    fid, up = _race_scene(db_url)
    with connect(db_url, "B") as b:
        b.execute("select pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, R))
        a = InThread(db_url, "A", lambda conn: (flakectl.process_uploads(conn, R, [up]), conn.commit())[0])
        wait_until(monitor, "A", "Lock", "advisory")
        _insert_late_run(db_url, up)
        b.rollback()
    summary = a.join()
    assert summary == Summary(uploads_processed=1, testruns_considered=2, flakes_created=1, flakes_updated=1,
                              testruns_marked=2)
    with connect(db_url, "check") as conn:
        assert Repo(conn, R).outcomes(up) == [("late", "flaky_fail"), ("t1", "flaky_fail")]
        assert flake_of(conn, "late") == [(R, 1, 1, 0, True)]
        assert flake_of(conn, "t1") == [(R, 5, 3, 0, True)]


def test_dry_run_marks_nothing_and_counts_what_it_would_mark(conn):
    repo = Repo(conn, R)
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)), ("b", "error", at(1)), ("c", "flaky_fail", at(1)))
    conn.commit()
    before = state(conn)
    got = flakectl.process_commit(conn, R, "sha1", dry_run=True)
    assert got.testruns_marked == 2 and got.testruns_considered == 3
    assert state(conn) == before


# --- 4. corrupt stored counters: no intermediate overflow ---------------------------------


def _against_reference(conn: psycopg.Connection, **options) -> Summary:
    conn.commit()
    snapshot = whole_snapshot(conn, [R])
    want = reference.process_commit(snapshot, R, "sha1", **options)
    got = flakectl.process_commit(conn, R, "sha1", **options)
    assert got == want.summary
    assert_state(conn, reference.apply(snapshot, want), {f.id for f in snapshot.flakes})
    return got


def test_an_unrelated_flake_at_int_min_breaks_nothing(conn):
    repo = Repo(conn, R)
    repo.flake("unrelated", rpc=-2**31, count=-2**31, fail_count=-2**31)
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)), ("a", "pass", at(2)))
    got = _against_reference(conn)
    assert got.flakes_created == 1 and got.flakes_updated == 0


def test_expire_after_int_max_with_a_negative_counter(conn):
    repo = Repo(conn, R)
    repo.flake("a", rpc=-1, count=3, fail_count=2)
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)), ("a", "pass", at(2)))
    got = _against_reference(conn, expire_after=2**31 - 1)
    assert got.flakes_updated == 1 and got.flakes_expired == 0
    assert flake_of(conn, "a") == [(R, 5, 2, 1, True)]


def test_negative_counters_count_on_from_where_they_are(conn):
    repo = Repo(conn, R)
    repo.flake("a", rpc=-5, count=-7, fail_count=-9)
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)), ("a", "failure", at(2)), ("a", "pass", at(3)))
    _against_reference(conn, expire_after=2)
    assert flake_of(conn, "a") == [(R, -4, -8, 1, True)]


@pytest.mark.parametrize("column", ["count", "fail_count"])
def test_a_result_beyond_integer_fails_naming_the_flake_and_changes_nothing(conn, column):
    repo = Repo(conn, R)
    fid = repo.flake("a", **{"count": 5, "fail_count": 3, column: 2**31 - 1})
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)), ("b", "failure", at(1)))
    conn.commit()
    snapshot = whole_snapshot(conn, [R])
    before = state(conn)
    with pytest.raises(flakectl.FlakectlError) as want:
        reference.process_commit(snapshot, R, "sha1")
    for dry_run in (False, True):
        with pytest.raises(flakectl.FlakectlError) as got:
            flakectl.process_commit(conn, R, "sha1", dry_run=dry_run)
        assert got.value.sqlstate == want.value.sqlstate == "22003"
        assert str(got.value) == str(want.value)
        assert str(got.value).startswith(f"flakectl: a counter of flake {fid} (test \\x61): ")
        assert state(conn) == before


# --- 5. repository ids: integer only, the lock key is the id ------------------------------


def test_a_repo_id_beyond_integer_is_refused_before_any_lock(db_url, monitor):
    with connect(db_url, "B") as b:
        # v0002 hashed 2^40 to this key: the two calls shared a lock
        b.execute("select pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, 1851357687))
        with connect(db_url, "A") as a:
            with pytest.raises(flakectl.InvalidArgument) as info:
                flakectl.process_commit(a, 2**40, "sha", wait=False)
            assert info.value.sqlstate == "22003"
            assert str(info.value) == ("flakectl: argument repo_id must be within integer (the range of"
                                       " test_analytics_flake.repoid), got 1099511627776")
            assert flakectl.process_commit(a, 1851357687 + 1, "sha", wait=False) == Summary()
        b.rollback()


@pytest.mark.parametrize("repo_id", [-1, -2**31, 2**31 - 1, 0])
def test_the_lock_key_is_the_repository_id(db_url, monitor, repo_id):
    with connect(db_url, "A") as a:
        flakectl.process_uploads(a, repo_id, [], dry_run=True)  # in the wrapper's transaction: released
        a.execute("select * from flakectl.process_uploads(%s, '{}')", (repo_id,))
        assert holds_repo_lock(monitor, repo_id % 2**32) == [a.info.backend_pid]
        a.rollback()


# --- 6. wait => false never waits ----------------------------------------------------------


def _no_wait_fails(conn: psycopg.Connection, call) -> None:  # noqa: ANN001
    """`call` fails at once (the session's statement_timeout is 5 s) with 55P03."""
    with pytest.raises(flakectl.LockNotAvailable) as info:
        call(conn)
    assert info.value.sqlstate == "55P03"
    assert str(info.value).startswith(f"flakectl: repository {R}: wait => false, and a lock this call needs"
                                      " is held by another transaction (")
    assert str(info.value).endswith("); nothing was changed")


def test_no_wait_against_another_repositorys_uncommitted_ledger_row(db_url):
    with connect(db_url, "setup") as conn:
        up = Repo(conn, R).upload("sha1")
        Repo(conn, R).runs(up, ("a", "failure", at(1)))
        conn.commit()
    with connect(db_url, "B") as b, connect(db_url, "A", timeout_s=5) as a:
        before = state(a)
        a.commit()
        b.execute("select * from flakectl.process_uploads(%s, %s)", (S, [up]))  # uncommitted
        _no_wait_fails(a, lambda c: flakectl.process_uploads(c, R, [up], wait=False))
        b.rollback()
        assert state(a) == before
        a.commit()
        assert flakectl.process_uploads(a, R, [up], wait=False).uploads_processed == 1


@pytest.mark.parametrize("held", ["flake row", "run row", "table"])
def test_no_wait_against_a_row_or_table_another_transaction_holds(db_url, held):
    with connect(db_url, "setup") as conn:
        repo = Repo(conn, R)
        fid = repo.flake("a", rpc=1, count=2, fail_count=1)
        up = repo.upload("sha1")
        repo.runs(up, ("a", "failure", at(1)))
        conn.commit()
    hold = {
        "flake row": ("select 1 from test_analytics_flake where id = %s for update", (fid,)),
        "run row": ("select 1 from ta_timeseries_testrun where upload_id = %s for update", (up,)),
        "table": ("lock table test_analytics_flake in access exclusive mode", ()),
    }[held]
    with connect(db_url, "B") as b, connect(db_url, "A", timeout_s=5) as a:
        before = state(a)
        a.commit()
        b.execute(*hold)
        _no_wait_fails(a, lambda c: flakectl.process_commit(c, R, "sha1", wait=False))
        b.rollback()
        assert state(a) == before


def test_no_wait_restores_the_callers_lock_timeout_and_wait_keeps_its_own(db_url):
    with connect(db_url, "setup") as conn:
        repo = Repo(conn, R)
        fid = repo.flake("a")
        up = repo.upload("sha1")
        repo.runs(up, ("a", "failure", at(1)))
        conn.commit()
    with connect(db_url, "A", timeout_s=5) as a:
        a.execute("set lock_timeout = '7s'")
        a.execute("select * from flakectl.process_commit(%s, 'sha1', dry_run => true, wait => false)", (R,))
        assert a.execute("show lock_timeout").fetchone() == ("7s",)
        a.rollback()
        with connect(db_url, "B") as b:
            b.execute("select 1 from test_analytics_flake where id = %s for update", (fid,))
            # wait => true: the caller's own lock_timeout fires, PostgreSQL's own error
            a.execute("set lock_timeout = '10ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable) as info:
                a.execute("select * from flakectl.process_commit(%s, 'sha1')", (R,))
            assert info.value.diag.message_primary == "canceling statement due to lock timeout"
            a.rollback()
            b.rollback()


# --- 7. lookbacks and ages, judged by the window start, in UTC -----------------------------


def _month_days(conn: psycopg.Connection) -> int:
    """Days between one month ago and now, in UTC, on the day the test runs."""
    (days,) = conn.execute(
        "select extract(day from (now() at time zone 'UTC') - ((now() at time zone 'UTC') - interval '1 mon'))::int"
    ).fetchone()
    conn.rollback()
    return days


def test_a_month_mix_is_judged_on_the_day_it_is_used(conn):
    repo = Repo(conn, R)
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)))
    conn.commit()
    days = _month_days(conn)  # 28 to 31
    # '1 mon -<days> days' is zero today: valid, an empty window
    (processed, considered) = conn.execute(
        "select uploads_processed, testruns_considered from flakectl.process_commit(%s, 'sha1',"
        f" lookback => interval '1 mon -{days} days', dry_run => true)", (R,)).fetchone()
    assert (processed, considered) == (1, 0)
    # one day more starts the window tomorrow: negative (v0002 accepted it on most dates)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        conn.execute(f"select * from flakectl.process_commit({R}, 'sha1', lookback => interval"
                     f" '1 mon -{days + 1} days')")
    assert info.value.diag.message_primary == (
        f"flakectl: argument lookback must not be negative, got 1 mon -{days + 1} days")
    conn.rollback()


def test_the_window_starts_exactly_lookback_before_now_in_utc(conn):
    """The clock pinned: now() is the transaction's start, so runs placed
    relative to it in the same transaction sit exactly on the boundary,
    computed with month arithmetic in UTC whatever the session's TimeZone."""
    repo = Repo(conn, R)
    up = repo.upload("sha1")
    conn.execute("set local timezone = 'Pacific/Chatham'")
    (start,) = conn.execute("select (now() at time zone 'UTC' - interval '1 mon') at time zone 'UTC'").fetchone()
    repo.runs(up, ("in", "failure", start), ("out", "failure", start - timedelta(microseconds=1)))
    row = conn.execute("select testruns_considered, testruns_marked from flakectl.process_commit(%s, 'sha1',"
                       " lookback => interval '1 mon')", (R,)).fetchone()
    assert row == (1, 1)
    assert repo.outcomes(up) == [("in", "flaky_fail"), ("out", "failure")]
    conn.rollback()


@pytest.mark.parametrize("lookback, verdict", [
    ("interval '10000 years'", "all"),  # v0002: a bare 22008
    ("interval '178000000 years'", "all"),
    # PostgreSQL cannot subtract the months alone, the whole is about 6.8 years: judged by its length
    ("make_interval(years => 10000, days => -3650000)", "recent"),
    ("interval '-178000000 years'", "22023"),  # past the latest timestamp: negative
    ("interval '-10000 years'", "22023"),
])
def test_huge_lookbacks(conn, lookback, verdict):
    repo = Repo(conn, R)
    up = repo.upload("sha1")
    repo.runs(up, ("old", "failure", at(0) - timedelta(days=365 * 300)), ("new", "failure", at(1)))
    query = f"select testruns_considered from flakectl.process_commit({R}, 'sha1', lookback => {lookback})"
    if verdict == "22023":
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
            conn.execute(query)
        assert info.value.diag.message_primary.startswith("flakectl: argument lookback must not be negative, got ")
    else:
        assert conn.execute(query).fetchone() == ((2,) if verdict == "all" else (1,))
    conn.rollback()


def test_prune_ledger_judges_its_age_by_the_cutoff(conn):
    conn.execute("insert into flakectl.processed_upload (upload_id, repo_id, processed_at)"
                 " values (1, 1, now() - interval '1 day'), (2, 1, now() - interval '3 days')")
    conn.commit()
    days = _month_days(conn)
    # the cut-off one day back: refused (v0001 let '1 mon -28 days' through on 1 March of a
    # non-leap year with the cut-off at now(), deleting every row)
    for age in (f"1 mon -{days - 1} days", f"1 mon -{days} days", "-10000 years"):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
            conn.execute(f"select flakectl.prune_ledger(interval '{age}')")
        assert info.value.diag.message_primary.startswith(
            "flakectl: argument older_than must be at least 2 days (twice the default lookback), got ")
        conn.rollback()
    assert conn.execute("select flakectl.prune_ledger(interval '10000 years')").fetchone() == (0,)
    assert conn.execute(f"select flakectl.prune_ledger(interval '1 mon -{days - 2} days')").fetchone() == (1,)
    assert conn.execute("select upload_id from flakectl.processed_upload").fetchall() == [(1,)]
    conn.rollback()


# --- 8. the CLI's huge durations: exit 2, one line ------------------------------------------


@pytest.mark.parametrize("argv, env", [
    (["process", "--repo", "1", "--commit", "s", "--lookback", "1000000000d"], {}),
    (["process", "--repo", "1", "--commit", "s"], {"FLAKECTL_LOOKBACK": "1000000000d"}),
    (["prune", "--older-than", "99999999999d"], {}),
    (["verify", "--repo", "1", "--commit", "s", "--lookback", "999999999d86400s"], {}),
])
def test_huge_durations_are_usage_errors(capsys, monkeypatch, argv, env):
    for name in ("FLAKECTL_DATABASE_URL", "FLAKECTL_LOOKBACK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("flakectl: error: ") and "is too large: at most 999999999d" in lines[0]


def test_the_largest_duration_reaches_the_database(db_url, capsys, monkeypatch):
    monkeypatch.delenv("FLAKECTL_LOOKBACK", raising=False)
    assert main(["process", "--dsn", db_url, "--repo", "1", "--commit", "s", "--lookback", "999999999d",
                 "--dry-run"]) == 0
    assert main(["prune", "--dsn", db_url, "--older-than", "999999999d"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "pruned 0 ledger row(s) older than 999999999d"


# --- 9. the flake UPDATE touches the repository's open rows only ----------------------------


def test_the_flake_update_is_restricted_to_the_repositorys_open_rows(conn):
    """With anything but a heap table with a primary key behind the name, an id
    need not be unique: rows of another repository, or history, with the same
    id are not written."""
    conn.execute("alter table test_analytics_flake drop constraint test_analytics_flake_pkey")
    repo = Repo(conn, R)
    fid = repo.flake("a", rpc=0, count=2, fail_count=1, start=at(-100))
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)))
    conn.execute(
        "insert into test_analytics_flake (id, repoid, test_id, recent_passes_count, count, fail_count,"
        " start_date, end_date) values (%(id)s, %(s)s, 'a', 0, 7, 7, %(t)s, null),"
        " (%(id)s, %(r)s, 'a', 0, 9, 9, %(t)s, %(t)s)", {"id": fid, "s": S, "r": R, "t": at(-200)})
    assert flakectl.process_commit(conn, R, "sha1").flakes_updated == 1
    assert conn.execute("select repoid, count, fail_count, end_date is null from test_analytics_flake"
                        " where id = %s order by repoid, count", (fid,)).fetchall() == [
        (R, 3, 2, True), (R, 9, 9, False), (S, 7, 7, True)]
    conn.rollback()
