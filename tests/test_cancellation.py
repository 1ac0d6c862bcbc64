"""SPEC rule 9, all or nothing: a call cancelled or cut off anywhere leaves
flakes, runs and ledger exactly as they were, and a worker's retry does the
right thing (nothing after a lost commit, everything after a lost call).

Mid-work is made deterministic by parking the call at a known statement: a
second session holds a lock the call needs there (the repository's lock, a
row the run update must change, a ledger key the ledger insert must take),
the test sees the call waiting in pg_stat_activity, then cancels it, lets
statement_timeout fire, or terminates its backend. The error's context names
the statement the call was in. A large commit is also cut off by
statement_timeout at many points of its real work, without any parking.
"""

from __future__ import annotations

import time

import psycopg
import pytest

import flakectl
from flakectl import reference
from flakectl.model import Snapshot, Summary

from builders import Repo, at
from conftest import TEMPLATE, create_database, drop_database
from dbdata import assert_state
from sessions import InThread, connect, state, wait_for_advisory_lock, wait_until, whole_snapshot

R = 1


@pytest.fixture
def monitor(db_url):
    with connect(db_url, "monitor", autocommit=True) as m:
        yield m


def history(conn: psycopg.Connection) -> None:
    """sha1: one upload that updates and expires an open flake, opens two new
    ones, and marks runs; sha0 is there for the repository lock's holder."""
    repo = Repo(conn, R)
    repo.flake("a", rpc=28, count=40, fail_count=12, start=at(-100), flags_id=b"f")
    repo.flake("z", rpc=2, count=5, fail_count=3, start=at(-100))
    repo.runs(repo.upload("sha0"), ("z", "failure", at(0)))
    repo.runs(repo.upload("sha1"), ("a", "pass", at(1)), ("a", "pass", at(2)), ("b", "failure", at(1)),
              ("c", "error", at(1)), ("c", "pass", at(2)), ("d", "pass", at(1)), ("z", "pass", at(3)))
    conn.commit()


# Where the call is parked: how the blocker does it, and what the call waits on.
def hold_repository_lock(blocker: psycopg.Connection) -> None:
    blocker.execute("select 1")
    flakectl.process_commit(blocker, R, "sha0")


def hold_a_run_row(blocker: psycopg.Connection) -> None:
    blocker.execute("select 1 from ta_timeseries_testrun where test_id = 'b' for update")


def hold_a_ledger_key(blocker: psycopg.Connection) -> None:
    (upload,) = blocker.execute(
        "select distinct upload_id from ta_timeseries_testrun where test_id = 'b'").fetchone()
    blocker.execute("insert into flakectl.processed_upload (upload_id, repo_id) values (%s, %s)", (upload, R))


PARKED = {
    # point: (blocker, wait event, the statement the call is in)
    "repository lock": (hold_repository_lock, ("Lock", "advisory"), "pg_advisory_xact_lock"),
    # the run update is part of the state machine's one statement (a CTE), before any flake write
    "run update": (hold_a_run_row, ("Lock", "transactionid"), "update public.ta_timeseries_testrun"),
    # every other write has run: the ledger insert is the last statement
    "ledger insert": (hold_a_ledger_key, ("Lock", "transactionid"), "insert into flakectl.processed_upload"),
}


def parked_call(db_url: str, monitor: psycopg.Connection, point: str, timeout_ms: int | None):
    """Start process_commit(sha1) in a session "B" and return once it is
    parked at `point`: (blocker session, B, B's pid)."""
    park, (event_type, event), _ = PARKED[point]
    blocker = connect(db_url, "blocker")
    park(blocker)

    def call(conn: psycopg.Connection) -> Summary:
        if timeout_ms is not None:
            conn.execute(f"set statement_timeout = {timeout_ms}")
            conn.commit()
        return flakectl.process_commit(conn, R, "sha1")

    b = InThread(db_url, "B", call)
    if point == "repository lock":
        pid = wait_for_advisory_lock(monitor, "B", R)
    else:
        pid = wait_until(monitor, "B", event_type, event)
    return blocker, b, pid


def retry_does_everything(conn: psycopg.Connection, snapshot: Snapshot) -> None:
    """The worker's retry of process_commit(sha1) does the whole call, once."""
    want = reference.process_commit(snapshot, R, "sha1")
    assert flakectl.process_commit(conn, R, "sha1") == want.summary
    assert_state(conn, reference.apply(snapshot, want), {f.id for f in snapshot.flakes})


STOP = {
    # how: (SQL run by the monitor on the parked call's pid, statement_timeout of the call)
    "pg_cancel_backend": ("select pg_cancel_backend(%s)", None),
    "statement_timeout": (None, 500),
    # the connection dies mid-statement: the worker sees a lost connection
    "pg_terminate_backend": ("select pg_terminate_backend(%s)", None),
}


@pytest.mark.parametrize("how", list(STOP))
@pytest.mark.parametrize("point", list(PARKED))
def test_a_call_stopped_mid_work_leaves_nothing_and_its_retry_does_everything(db_url, monitor, point, how):
    with connect(db_url, "setup") as conn:
        history(conn)
        before = state(conn)
        snapshot = whole_snapshot(conn, [R])
        conn.commit()

        stop, timeout_ms = STOP[how]
        blocker, b, pid = parked_call(db_url, monitor, point, timeout_ms)
        with blocker:
            if stop:
                assert monitor.execute(stop, (pid,)).fetchone() == (True,)
            with pytest.raises(flakectl.FlakectlError) as info:
                b.join()
            if how == "pg_terminate_backend":
                assert info.value.sqlstate in ("57P01", None), info.value  # admin_shutdown, or a lost connection
            else:
                assert info.value.sqlstate == "57014", info.value  # query_canceled, for both
                assert PARKED[point][2] in info.value.__cause__.diag.context
            blocker.rollback()

        assert state(conn) == before
        conn.commit()
        retry_does_everything(conn, snapshot)


# --- a dropped connection, and the worker's retry ----------------------------


def test_connection_dropped_after_commit_retry_changes_nothing(db_url):
    with connect(db_url, "setup") as conn:
        history(conn)
        snapshot = whole_snapshot(conn, [R])
        conn.commit()

    worker = connect(db_url, "worker")
    worker.execute("select 1")
    first = flakectl.process_commit(worker, R, "sha1")
    # COMMIT is sent, then the connection drops before its answer is read
    worker.pgconn.send_query(b"commit")
    worker.close()

    with connect(db_url, "retry") as retry:
        want = reference.process_commit(snapshot, R, "sha1")
        assert first == want.summary
        # the retry queues behind the old session's lock if it is still committing
        again = flakectl.process_commit(retry, R, "sha1")
        assert again == Summary(uploads_skipped=want.summary.uploads_processed)
        assert_state(retry, reference.apply(snapshot, want), {f.id for f in snapshot.flakes})


def close_without_commit(worker: psycopg.Connection, monitor: psycopg.Connection) -> None:
    worker.close()


def terminate_backend(worker: psycopg.Connection, monitor: psycopg.Connection) -> None:
    assert monitor.execute("select pg_terminate_backend(%s)", (worker.info.backend_pid,)).fetchone() == (True,)
    worker.close()


@pytest.mark.parametrize("drop", [close_without_commit, terminate_backend])
def test_connection_dropped_before_commit_retry_does_everything(db_url, monitor, drop):
    with connect(db_url, "setup") as conn:
        history(conn)
        snapshot = whole_snapshot(conn, [R])
        before = state(conn)
        conn.commit()

    worker = connect(db_url, "worker")
    worker.execute("select 1")
    flakectl.process_commit(worker, R, "sha1")  # done, but not committed
    drop(worker, monitor)

    with connect(db_url, "retry") as retry:
        assert state(retry) == before  # the retry's first statement may run before the old backend has gone
        retry.commit()
        retry_does_everything(retry, snapshot)


# --- a large commit, cut off by statement_timeout -----------------------------

UPLOADS, RUNS_PER_UPLOAD, TESTS = 10, 5000, 2000


@pytest.fixture(scope="module")
def big_url(server, template_url):
    """One commit of 50,000 runs (a fifth of them failing) and 100 open
    flakes near expiry. The tests roll back whatever they do."""
    name = "cancel_big"
    url = create_database(server, name, TEMPLATE)
    with psycopg.connect(url) as conn:
        conn.execute("insert into commits (id, commitid, repoid) values (1, 'big', %s)", (R,))
        conn.execute("insert into reports_commitreport (id, commit_id, report_type) values (1, 1, 'test_results')")
        conn.execute("insert into reports_upload (id, report_id, state)"
                      " select u, 1, 'processed' from generate_series(1, %s) u", (UPLOADS,))
        conn.execute(
            "insert into ta_timeseries_testrun (timestamp, test_id, outcome, repo_id, upload_id)"
            " select now() - interval '2 hours' + (i %% 7) * interval '1 second', convert_to('t' || i %% %s, 'UTF8'),"
            "        case when i %% 5 = 0 then 'failure' when i %% 11 = 0 then 'error' else 'pass' end, %s, u"
            "   from generate_series(1, %s) u, generate_series(1, %s) i",
            (TESTS, R, UPLOADS, RUNS_PER_UPLOAD))
        conn.execute("insert into test_analytics_flake (repoid, test_id, recent_passes_count, count, fail_count,"
                     " start_date) select %s, convert_to('t' || i, 'UTF8'), 28, 30, 2, now() - interval '3 days'"
                     " from generate_series(1, 100) i", (R,))
        conn.execute("analyze")
    yield url
    drop_database(server, name)


def fingerprint(conn: psycopg.Connection) -> tuple:
    """Flakes, run outcomes and ledger, hashed in the server (50,000 runs)."""
    return conn.execute("""
        select (select md5(string_agg(f::text, ',' order by f.id)) from test_analytics_flake f),
               (select md5(string_agg(concat_ws(':', r.upload_id, r.test_id, r.timestamp, r.outcome), ','
                                      order by r.upload_id, r.test_id, r.timestamp, r.outcome))
                  from ta_timeseries_testrun r),
               (select md5(string_agg(l::text, ',' order by l.upload_id)) from flakectl.processed_upload l)
    """).fetchone()


def test_statement_timeout_cuts_a_large_commit_anywhere_and_leaves_nothing(big_url):
    with connect(big_url, "big") as conn:
        before = fingerprint(conn)
        conn.commit()
        expected = flakectl.process_commit(conn, R, "big", dry_run=True)
        assert expected.testruns_marked > 10_000

        # how long the whole call takes here (then rolled back)
        conn.execute("select 1")
        started = time.monotonic()
        assert flakectl.process_commit(conn, R, "big") == expected
        duration = time.monotonic() - started
        conn.rollback()

        # timeouts from a tenth of that, growing by a quarter, until one is enough;
        # every attempt is rolled back, the one that completes too
        timeout, landed = duration / 10, []
        while True:
            conn.execute("set statement_timeout = %s" % max(1, int(timeout * 1000)))
            try:
                got = flakectl.process_commit(conn, R, "big")
            except flakectl.FlakectlError as exc:
                assert exc.sqlstate == "57014", exc
                landed.append(exc.__cause__.diag.context or "")
                conn.rollback()
                assert fingerprint(conn) == before, landed[-1]
                conn.rollback()
                timeout *= 1.25
                assert len(landed) < 40
                continue
            assert got == expected
            assert fingerprint(conn) != before
            conn.rollback()
            break
    # some cut fell in the run update, after the flakes had been written
    assert any("update public.ta_timeseries_testrun" in context for context in landed), landed


def test_pg_cancel_backend_during_the_writes_of_a_large_commit(big_url):
    with connect(big_url, "setup") as conn, connect(big_url, "monitor", autocommit=True) as monitor:
        before = fingerprint(conn)
        conn.commit()

        def call(c: psycopg.Connection) -> Summary:
            with c.transaction(force_rollback=True):  # a call that ends before the cancel writes nothing either
                return flakectl.process_commit(c, R, "big")

        b = InThread(big_url, "B", call)
        # cancel as soon as B writes flakes: its run update (most of the call) is still to come
        deadline = time.monotonic() + 20
        while not monitor.execute(
                "select 1 from pg_locks l join pg_stat_activity a using (pid) where a.application_name = 'B'"
                " and l.relation = 'test_analytics_flake'::regclass and l.mode = 'RowExclusiveLock'").fetchone():
            assert time.monotonic() < deadline and b.error is None and b.result is None
            time.sleep(0.001)
        monitor.execute("select pg_cancel_backend(pid) from pg_stat_activity where application_name = 'B'")
        with pytest.raises(flakectl.FlakectlError) as info:
            b.join()
        assert info.value.sqlstate == "57014"
        context = info.value.__cause__.diag.context
        assert "flakectl.process_upload_set" in context
        assert fingerprint(conn) == before
