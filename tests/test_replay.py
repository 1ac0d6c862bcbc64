"""flakectl.replay (SPEC rule 11) in PostgreSQL, against the reference.

Hypothesis builds a repository's history (live flakes that start before,
at and after the replayed runs, open and expired, some identical to what a
replay computes, duplicates among them; runs of every outcome, of two repos,
in uploads some of which are in the ledger) and a chain of calls mixing
process_uploads and replay (dry and applied). Each call goes to the SQL
function and to the reference; the summaries, the flake rows (ids of new
rows aside), the archive, the run outcomes and the ledger must be identical.
The chains include: process, replay, process again; and every applied replay
is followed by a dry-run replay of the same uploads that must find everything
identical (nothing archived, nothing inserted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flakectl
from flakectl import reference
from flakectl.errors import InvalidArgument, LockNotAvailable, NullArgument, WrongIsolationLevel
from flakectl.model import ArchivedFlake, Flake, ReplaySummary, Snapshot, TestRun

from builders import Repo, at
from dbdata import all_flakes, all_runs, flake_state, insert, ledger
from sessions import InThread, connect, wait_for_advisory_lock

REPO, OTHER = 1, 2
TESTS = [b"t0", b"t1", b"t2", b"t3"]
OUTCOMES = ["pass", "pass", "pass", "failure", "error", "flaky_fail", "skip", "PASS"]
MINUTES = [0, 0, 5, 10, 60, 24 * 60 * 3]  # minutes after the history's start; days back allowed


def archive(conn: psycopg.Connection) -> Counter:
    rows = conn.execute(
        "select id, repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date,"
        "       end_date, archived_at from flakectl.flake_archive"
    ).fetchall()
    return Counter(
        ArchivedFlake(Flake(i, repo, bytes(t), None if fl is None else bytes(fl), rpc, c, fc, s, e), at)
        for i, repo, t, fl, rpc, c, fc, s, e, at in rows
    )


def assert_state(conn, expected: Snapshot, known_ids: set[int]) -> None:
    got_old, got_new = flake_state(all_flakes(conn), known_ids)
    want_old, want_new = flake_state(list(expected.flakes), known_ids)
    assert got_old == want_old
    assert got_new == want_new
    assert all_runs(conn) == Counter(
        (r.upload_id, r.test_id, r.timestamp, r.repo_id, r.outcome) for r in expected.testruns)
    assert ledger(conn) == expected.ledger
    # archived rows: those that existed before the chain by id, new ones without
    got, want = archive(conn), Counter(expected.archive)
    assert _by_known(got, known_ids) == _by_known(want, known_ids)


def _by_known(rows: Counter, known_ids: set[int]) -> Counter:
    return Counter({(replace(a.flake, id=None) if a.flake.id not in known_ids else a.flake, a.archived_at): n
                    for a, n in rows.items()})


@st.composite
def histories(draw):
    upload_ids = draw(st.lists(st.integers(1, 40), unique=True, min_size=1, max_size=6))
    runs = []
    for upload in upload_ids:
        for _ in range(draw(st.integers(0, 10))):
            runs.append((draw(st.sampled_from(MINUTES)) - draw(st.sampled_from([0, 0, 30])),
                         draw(st.sampled_from(TESTS)), draw(st.sampled_from(OUTCOMES)),
                         draw(st.sampled_from([REPO, REPO, REPO, OTHER])), upload))
    flakes = []
    for n in range(draw(st.integers(0, 7))):
        end = draw(st.sampled_from([None, None, 20, 24 * 60 * 4]))
        rpc = draw(st.sampled_from([0, 1, 2, 30]))
        fails = draw(st.integers(1, 3))
        flakes.append((100 + n, draw(st.sampled_from([REPO, REPO, OTHER])), draw(st.sampled_from(TESTS)),
                       draw(st.sampled_from([None, b"fl"])), rpc, fails + rpc + draw(st.integers(0, 2)),
                       fails, draw(st.sampled_from([-60 * 24 * 30, -30, 0, 5, 10, 61])), end))
    # at most one open flake per (repo, test), as the unique index demands
    seen, kept = set(), []
    for f in flakes:
        if f[-1] is None and (f[1], f[2]) in seen:
            continue
        if f[-1] is None:
            seen.add((f[1], f[2]))
        kept.append(f)
    ledger_ids = draw(st.sets(st.sampled_from(upload_ids), max_size=2))
    ids = st.lists(st.one_of(st.sampled_from(upload_ids + [99]), st.none()), max_size=7)
    call = st.one_of(
        st.fixed_dictionaries({"kind": st.just("replay"), "ids": ids,
                               "repo": st.sampled_from([REPO, REPO, OTHER]),
                               "expire_after": st.sampled_from([1, 2, 30]),
                               "dry_run": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("process"), "ids": ids,
                               "repo": st.sampled_from([REPO, REPO, OTHER]),
                               "expire_after": st.sampled_from([1, 2, 30])}),
    )
    calls = draw(st.lists(call, min_size=1, max_size=4))
    return kept, runs, ledger_ids, calls


def materialize(now, history) -> Snapshot:
    flakes, runs, ledger_ids, _ = history
    base = now - timedelta(days=5)
    at = lambda m: base + timedelta(minutes=m)  # noqa: E731
    return Snapshot(
        now=now,
        testruns=tuple(TestRun(k, at(m), t, o, repo, u) for k, (m, t, o, repo, u) in enumerate(runs)),
        flakes=tuple(Flake(i, repo, t, fl, rpc, c, fc, at(s), None if e is None else at(e))
                     for i, repo, t, fl, rpc, c, fc, s, e in flakes),
        ledger=frozenset(ledger_ids),
    )


@pytest.fixture(scope="module")
def rconn(shared_url):
    with psycopg.connect(shared_url) as c:
        yield c


LOOKBACK = timedelta(days=60)  # process_* see every run, as replay does


@given(history=histories())
def test_replay_equals_reference_in_chains(rconn, history):
    conn = rconn
    try:
        (now,) = conn.execute("select now()").fetchone()
        expected = materialize(now, history)
        insert(conn, expected)
        conn.execute("select setval(pg_get_serial_sequence('test_analytics_flake', 'id'), 1000)")
        known = {f.id for f in expected.flakes}
        for call in history[-1]:
            if call["kind"] == "process":
                want = reference.process_uploads(expected, call["repo"], call["ids"], lookback=LOOKBACK,
                                                 expire_after=call["expire_after"])
                got = flakectl.process_uploads(conn, call["repo"], call["ids"], lookback=LOOKBACK,
                                               expire_after=call["expire_after"])
                assert got == want.summary, call
                expected = reference.apply(expected, want)
                assert_state(conn, expected, known)
                continue
            options = dict(expire_after=call["expire_after"], dry_run=call["dry_run"])
            want = reference.replay(expected, call["repo"], call["ids"], **options)
            got = flakectl.replay(conn, call["repo"], call["ids"], **options)
            assert got == want.summary, call
            expected = reference.apply(expected, want)
            assert_state(conn, expected, known)
            if not call["dry_run"]:
                again = flakectl.replay(conn, call["repo"], call["ids"], expire_after=call["expire_after"])
                assert again == replace(want.summary, flakes_live=want.summary.flakes_replayed,
                                        flakes_identical=want.summary.flakes_replayed,
                                        flakes_archived=0, flakes_inserted=0, testruns_marked=0), call
                assert again == reference.replay(expected, call["repo"], call["ids"],
                                                 expire_after=call["expire_after"]).summary
    finally:
        conn.rollback()


# --------------------------------------------------------------------------
# Bad input, isolation, locking, all or nothing, privileges, the archive
# --------------------------------------------------------------------------

CALL = "select * from flakectl.replay(repo_id => %s, upload_ids => %s, expire_after => %s, dry_run => %s)"


@pytest.mark.parametrize(("args", "sqlstate", "message"), [
    ((None, [1], 30, True), "22004", "flakectl: argument repo_id must not be NULL"),
    ((1, None, 30, True), "22004", "flakectl: argument upload_ids must not be NULL"),
    ((1, [1], None, True), "22004", "flakectl: argument expire_after must not be NULL"),
    ((1, [1], 30, None), "22004", "flakectl: argument dry_run must not be NULL"),
    # NULLs first, in parameter order; then values in parameter order
    ((2**31, None, 0, True), "22004", "flakectl: argument upload_ids must not be NULL"),
    ((2**31, [1], 0, True), "22003",
     "flakectl: argument repo_id must be within integer (the range of test_analytics_flake.repoid),"
     " got 2147483648"),
    ((-(2**31) - 1, [1], 30, True), "22003",
     "flakectl: argument repo_id must be within integer (the range of test_analytics_flake.repoid),"
     " got -2147483649"),
    ((1, [1], 0, True), "22023", "flakectl: argument expire_after must be at least 1, got 0"),
])
def test_bad_input(conn, args, sqlstate, message):
    with pytest.raises(psycopg.Error) as excinfo:
        conn.execute(CALL, args)
    assert (excinfo.value.sqlstate, excinfo.value.diag.message_primary) == (sqlstate, message)


def test_bad_input_through_the_wrapper(conn):
    with pytest.raises(NullArgument):
        flakectl.replay(conn, 1, None)
    conn.rollback()
    with pytest.raises(InvalidArgument) as excinfo:
        flakectl.replay(conn, 1, [1], expire_after=0)
    assert excinfo.value.sqlstate == "22023"


def test_defaults_and_empty_lists(conn):
    # dry_run defaults to true; expire_after to 30; an empty or all-NULL list replays nothing
    repo = Repo(conn, 1)
    upload = repo.upload("c1")
    repo.runs(upload, ("a", "failure", at(0)))
    assert conn.execute("select * from flakectl.replay(1, %s)", ([upload],)).fetchone() == (
        1, 1, 0, 1, 0, 0, 1, 1)
    assert conn.execute("select count(*) from test_analytics_flake").fetchone() == (0,)
    assert repo.outcomes(upload) == [("a", "failure")]
    for ids in ([], [None], [None, None]):
        assert flakectl.replay(conn, 1, ids, dry_run=False) == ReplaySummary()
    assert conn.execute("select count(*) from flakectl.processed_upload").fetchone() == (0,)


@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
def test_snapshot_isolation_is_refused(conn, level):
    conn.execute(f"set transaction isolation level {level}")
    with pytest.raises(WrongIsolationLevel):
        flakectl.replay(conn, 1, [1])


def test_waits_for_the_repository_lock_and_sees_the_holders_writes(db_url, monitor):
    with connect(db_url, "A") as a:
        repo = Repo(a, 1)
        u1, u2 = repo.upload("c1"), repo.upload("c2")
        repo.runs(u1, ("a", "failure", at(0)))
        repo.runs(u2, ("a", "pass", at(1)))
        a.commit()
        a.execute("select 1")  # a transaction open: the call's lock stays until commit
        flakectl.process_commit(a, 1, "c1")
        b = InThread(db_url, "B", lambda c: flakectl.replay(c, 1, [u1, u2], dry_run=False))
        wait_for_advisory_lock(monitor, "B", 1)
        a.commit()
        got = b.join()
        # B saw A's flake (count 1, written by process_commit) and replaced it
        assert got == ReplaySummary(uploads_replayed=2, testruns_considered=2, flakes_live=1,
                                    flakes_replayed=1, flakes_archived=1, flakes_inserted=1)
        assert [(f.count, f.recent_passes_count) for f in repo.flakes()] == [(2, 1)]


def test_all_or_nothing(conn):
    repo = Repo(conn, 1)
    upload = repo.upload("c1")
    repo.runs(upload, ("a", "failure", at(0)), ("a", "pass", at(1)))
    stale = repo.flake("a", count=1, start=at(0))
    conn.commit()
    before = (repo.flakes(), repo.outcomes(upload))
    # the insert into the archive fails after the state machine marked the runs
    conn.execute("alter table flakectl.flake_archive add constraint no_rows check (false) not valid")
    conn.commit()
    with pytest.raises(flakectl.FlakectlError) as excinfo:
        flakectl.replay(conn, 1, [upload], dry_run=False)
    assert excinfo.value.sqlstate == "23514"
    conn.rollback()
    assert (repo.flakes(), repo.outcomes(upload)) == before
    assert stale in [f.id for f in before[0]]
    assert conn.execute("select count(*) from flakectl.processed_upload").fetchone() == (0,)


def test_archive_has_every_column_of_the_flake_table_plus_archived_at(conn):
    def columns(table):
        return conn.execute(
            "select attname, format_type(atttypid, atttypmod) from pg_attribute"
            " where attrelid = %s::regclass and attnum > 0 and not attisdropped order by attnum",
            (table,)).fetchall()
    assert columns("flakectl.flake_archive") == columns("test_analytics_flake") + [
        ("archived_at", "timestamp with time zone")]


def test_not_executable_by_public_nor_granted_to_the_worker(conn):
    rows = conn.execute(
        "select p.proname, p.prosecdef, p.proconfig,"
        "       has_function_privilege('public', p.oid, 'execute')"
        "  from pg_proc p where p.pronamespace = 'flakectl'::regnamespace"
        "   and p.proname in ('replay', 'replay_rows', 'replay_compare', 'replay_guard') order by 1").fetchall()
    assert rows == [
        ("replay", True, ["search_path=pg_catalog, pg_temp", "plan_cache_mode=force_custom_plan", "jit=off"], False),
        ("replay_compare", False, ["search_path=pg_catalog, pg_temp", "plan_cache_mode=force_custom_plan",
                                   "jit=off", "max_parallel_workers_per_gather=0"], False),
        ("replay_guard", False, ["search_path=pg_catalog, pg_temp"], False),
        ("replay_rows", True, ["search_path=pg_catalog, pg_temp", "plan_cache_mode=force_custom_plan", "jit=off"],
         False),
    ]
    conn.execute("create role replay_worker login")
    conn.execute("grant usage on schema flakectl to replay_worker")
    conn.execute("set role replay_worker")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from flakectl.replay(1, '{}')")


@pytest.fixture
def monitor(db_url):
    with connect(db_url, "monitor", autocommit=True) as m:
        yield m


def test_replay_rows_lists_both_sides_of_the_tests_that_differ(conn):
    repo = Repo(conn, 1)
    upload = repo.upload("c1")
    repo.runs(upload, ("a", "failure", at(0)), ("b", "failure", at(0)))
    right = repo.flake("a", start=at(0), flags_id=b"f")
    wrong = repo.flake("b", count=5, start=at(0))
    rows = conn.execute(
        "select side, paired, id, convert_from(test_id, 'UTF8'), flags_id, count, fail_count,"
        "       recent_passes_count, start_date, end_date from flakectl.replay_rows(1, %s)",
        ([upload],)).fetchall()
    # a's rows are identical: left out; b's live row and its replayed row
    assert rows == [("live", False, wrong, "b", None, 5, 1, 0, at(0), None),
                    ("replayed", False, None, "b", None, 1, 1, 0, at(0), None)]
    assert right != wrong
    with pytest.raises(psycopg.errors.NullValueNotAllowed):
        conn.execute("select * from flakectl.replay_rows(1, null)")
