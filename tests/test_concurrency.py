"""SPEC rule 8: calls for one repository serialize on its advisory lock, calls
for different repositories never wait for each other, `wait => false` fails
at once with 55P03, and any interleaving equals running the calls one after
another (checked against the reference).

Every test commits, so each gets a database of its own (`db_url`). Sessions
are named; the test sees a blocked session in `pg_stat_activity` before it
releases the lock (no sleeping), and statement_timeout bounds every wait.
"""

from __future__ import annotations

import queue
import random
import re
import time
from datetime import timedelta

import psycopg
import pytest

import flakectl
from flakectl import reference
from flakectl.model import Commit, CommitReport, Flake, Snapshot, Summary, TestRun, Upload

from builders import Repo, at
from dbdata import assert_state, insert
from sessions import (InThread, connect, holds_repo_lock, join_all, wait_for_advisory_lock, wait_until,
                      whole_snapshot)

R, S = 1, 2
EXPIRE = 3  # small, so the order of two calls decides which pass expires a flake


@pytest.fixture
def monitor(db_url):
    with connect(db_url, "monitor", autocommit=True) as m:
        yield m


def two_commits(conn: psycopg.Connection, repo_id: int = R) -> None:
    """Two commits of one repository whose result depends on their order:
    sha1 then sha2 is not sha2 then sha1."""
    repo = Repo(conn, repo_id)
    repo.flake("a", rpc=1, count=3, fail_count=2, start=at(-100))
    repo.runs(repo.upload("sha1"), ("a", "pass", at(1)), ("b", "failure", at(1)), ("c", "failure", at(1)))
    repo.runs(repo.upload("sha2"), ("a", "pass", at(2)), ("a", "pass", at(3)), ("b", "pass", at(2)),
              ("c", "failure", at(2)), ("d", "error", at(2)))
    conn.commit()


def sequentially(before: Snapshot, *calls: tuple[int, str]) -> tuple[Snapshot, list]:
    """The reference's state and summaries after `calls`, one after another."""
    summaries = []
    for repo_id, sha in calls:
        result = reference.process_commit(before, repo_id, sha, expire_after=EXPIRE)
        summaries.append(result.summary)
        before = reference.apply(before, result)
    return before, summaries


def test_a_second_call_waits_for_the_first_and_sees_its_writes(db_url, monitor):
    with connect(db_url, "A") as a:
        two_commits(a)
        before = whole_snapshot(a, [R])
        known = {f.id for f in before.flakes}
        # A: a call whose transaction stays open, so it keeps R's lock
        a.execute("select 1")
        got_a = flakectl.process_commit(a, R, "sha1", expire_after=EXPIRE)
        assert holds_repo_lock(monitor, R) == [a.info.backend_pid]

        b = InThread(db_url, "B", lambda conn: flakectl.process_commit(conn, R, "sha2", expire_after=EXPIRE))
        wait_for_advisory_lock(monitor, "B", R)
        a.commit()
        got_b = b.join()

        after, (want_a, want_b) = sequentially(before, (R, "sha1"), (R, "sha2"))
        assert (got_a, got_b) == (want_a, want_b)
        assert_state(a, after, known)
        # and not the other order
        swapped, _ = sequentially(before, (R, "sha2"), (R, "sha1"))
        assert swapped.flakes != after.flakes


def test_the_waiting_call_sees_nothing_of_a_rolled_back_holder(db_url, monitor):
    with connect(db_url, "A") as a:
        two_commits(a)
        before = whole_snapshot(a, [R])
        a.execute("select 1")
        flakectl.process_commit(a, R, "sha1", expire_after=EXPIRE)

        b = InThread(db_url, "B", lambda conn: flakectl.process_commit(conn, R, "sha2", expire_after=EXPIRE))
        wait_for_advisory_lock(monitor, "B", R)
        a.rollback()
        got_b = b.join()

        after, [want_b] = sequentially(before, (R, "sha2"))
        assert got_b == want_b
        assert_state(a, after, {f.id for f in before.flakes})


def test_different_repositories_never_wait(db_url, monitor):
    with connect(db_url, "A") as a, connect(db_url, "S", timeout_s=5) as s:
        two_commits(a, R)
        two_commits(a, S)
        before = whole_snapshot(a, [R, S])
        a.execute("select 1")
        flakectl.process_commit(a, R, "sha1", expire_after=EXPIRE)

        # B queues behind A on R; a call for S neither waits for A nor for B
        b = InThread(db_url, "B", lambda conn: flakectl.process_commit(conn, R, "sha2", expire_after=EXPIRE))
        wait_for_advisory_lock(monitor, "B", R)
        started = time.monotonic()
        got_s = [flakectl.process_commit(s, S, sha, expire_after=EXPIRE) for sha in ("sha1", "sha2")]
        assert time.monotonic() - started < 5
        assert holds_repo_lock(monitor, R) == [a.info.backend_pid]
        a.commit()
        b.join()

        after, summaries = sequentially(before, (S, "sha1"), (S, "sha2"), (R, "sha1"), (R, "sha2"))
        assert got_s == summaries[:2]
        assert_state(a, after, {f.id for f in before.flakes})


def test_an_upload_taken_meanwhile_by_another_repo_fails_the_call_and_its_retry_skips(db_url, monitor):
    """process_uploads trusts its list, so two repositories' calls can name one
    upload. The ledger is read under each repository's own lock: the later
    call waits on the earlier's ledger row, then fails whole (40001) instead
    of counting an upload that, run in turn, it would have skipped."""
    with connect(db_url, "A") as a:
        r, s = Repo(a, R), Repo(a, S)
        upload = r.upload("sha1", upload_id=777)
        r.runs(upload, ("a", "failure", at(1)))
        s.runs(upload, ("b", "failure", at(1)), repo_id=S)
        a.commit()
        a.execute("select 1")
        got_a = flakectl.process_uploads(a, R, [777])
        assert got_a == Summary(1, 0, 1, 1, 0, 0, 1)

        b = InThread(db_url, "B", lambda conn: flakectl.process_uploads(conn, S, [777]))
        wait_until(monitor, "B", "Lock", "transactionid")  # on A's ledger row
        a.commit()
        with pytest.raises(flakectl.ConcurrentConflict) as info:
            b.join()
        assert info.value.sqlstate == "40001"
        assert str(info.value) == ("flakectl: a concurrent call for another repository processed an upload"
                                   " of this call (Key (upload_id)=(777) already exists.)")

        # B left nothing; its retry is what running after A gives
        both = [("a", "flaky_fail"), ("b", "failure")]  # the upload's runs: R's, then S's
        assert s.flakes() == [] and s.outcomes(upload) == both
        assert flakectl.process_uploads(a, S, [777]) == Summary(0, 1, 0, 0, 0, 0, 0)
        assert s.flakes() == [] and s.outcomes(upload) == both
        assert a.execute("select upload_id, repo_id from flakectl.processed_upload").fetchall() == [(777, R)]


def uploads_of(snapshot: Snapshot, sha: str) -> list[int]:
    commits = {c.id for c in snapshot.commits if c.commitid == sha}
    reports = {r.id for r in snapshot.reports if r.commit_id in commits}
    return [u.id for u in snapshot.uploads if u.report_id in reports]


@pytest.mark.parametrize("entry", ["process_commit", "process_uploads"])
def test_wait_false_fails_at_once_and_writes_nothing(db_url, monitor, entry):
    with connect(db_url, "A") as a, connect(db_url, "C") as c:
        two_commits(a)
        before = whole_snapshot(a, [R])

        def call(conn, **options):
            if entry == "process_commit":
                return flakectl.process_commit(conn, R, "sha2", expire_after=EXPIRE, **options)
            return flakectl.process_uploads(conn, R, uploads_of(before, "sha2"), expire_after=EXPIRE, **options)

        a.execute("select 1")
        flakectl.process_commit(a, R, "sha1", expire_after=EXPIRE)

        started = time.monotonic()
        with pytest.raises(flakectl.LockNotAvailable) as info:
            call(c, wait=False)
        assert time.monotonic() - started < 2  # statement_timeout is 20 s: it did not wait
        assert info.value.sqlstate == "55P03"
        assert info.value.__cause__.sqlstate == "55P03"
        assert re.search(rf"\brepository {R}\b", str(info.value)), str(info.value)
        c.rollback()
        # the failed call left nothing, and holds no lock
        assert holds_repo_lock(monitor, R) == [a.info.backend_pid]
        a.commit()
        only_a, _ = sequentially(before, (R, "sha1"))
        assert_state(c, only_a, {f.id for f in before.flakes})
        c.commit()

        # once the lock is free, wait => false just runs
        got = call(c, wait=False)
        after, [_, want] = sequentially(before, (R, "sha1"), (R, "sha2"))
        assert got == want
        assert_state(c, after, {f.id for f in before.flakes})


def test_wait_false_on_a_free_lock_of_another_repo(db_url, monitor):
    with connect(db_url, "A") as a, connect(db_url, "C") as c:
        two_commits(a, R)
        two_commits(a, S)
        a.execute("select 1")
        flakectl.process_commit(a, R, "sha1", expire_after=EXPIRE)
        assert flakectl.process_commit(c, S, "sha1", expire_after=EXPIRE, wait=False).uploads_processed == 1
        a.rollback()


# --- stress ------------------------------------------------------------------

REPOS = [1, 2, 3]
TESTS = [b"t0", b"t1", b"t2", b"t3", b"t4", b"t5"]
OUTCOMES = ["pass"] * 5 + ["failure", "error", "flaky_fail", "skip"]
COMMITS = 40
WORKERS = 8
STRESS_EXPIRE = 2


def stress_history(rng: random.Random, now) -> Snapshot:
    """3 repositories, 40 commits of 1-3 uploads (upload ids shuffled, so id
    order is not commit order), runs of 6 tests, open and expired flakes."""
    flakes, commits, reports, uploads, runs = [], [], [], [], []
    flake_id = 1_000_000  # clear of the ids the table's sequence hands out
    for repo in REPOS:
        for test in TESTS:
            if rng.random() < 0.3:
                flake_id += 1
                flakes.append(Flake(flake_id, repo, test, None, 5, 9, 4, now - timedelta(days=9),
                                    now - timedelta(days=8)))
            if rng.random() < 0.5:
                rpc = rng.choice([0, 1, 2, 3])
                flake_id += 1
                flakes.append(Flake(flake_id, repo, test, rng.choice([None, b"f"]), rpc, rpc + 2, 2,
                                    now - timedelta(days=3)))
    upload_ids = rng.sample(range(1, 10_000), COMMITS * 3)
    for i in range(COMMITS):
        repo = REPOS[i % len(REPOS)]
        sha = f"s{i}"
        commits.append(Commit(i + 1, sha, repo))
        reports.append(CommitReport(i + 1, i + 1))
        for n in range(rng.randint(1, 3)):
            upload = upload_ids.pop()
            uploads.append(Upload(upload, i + 1, "processed" if n == 0 or rng.random() < 0.8 else "started"))
            ts = now - timedelta(hours=rng.choice([1, 2, 3, 23]))
            for _ in range(rng.randint(3, 15)):
                runs.append((ts + timedelta(seconds=rng.choice([0, 0, 1])), rng.choice(TESTS),
                             rng.choice(OUTCOMES), repo if rng.random() < 0.9 else rng.choice(REPOS), upload, sha))
            if rng.random() < 0.2:  # outside the window
                runs.append((now - timedelta(hours=30), rng.choice(TESTS), "failure", repo, upload, sha))
    return Snapshot(
        now=now,
        commits=tuple(commits),
        reports=tuple(reports),
        uploads=tuple(uploads),
        testruns=tuple(TestRun(key, *run) for key, run in enumerate(runs)),
        flakes=tuple(flakes),
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stress_any_interleaving_equals_a_sequential_replay(db_url, seed):
    rng = random.Random(seed)
    with connect(db_url, "setup") as conn:
        (now,) = conn.execute("select now()").fetchone()
        initial = stress_history(rng, now)
        insert(conn, initial)
        conn.execute("create sequence stress_order")
        conn.commit()

        # every commit once, a dozen again or as a dry run; some with wait => false
        work = [(c.repoid, c.commitid, False) for c in initial.commits]
        work += [(repo, sha, rng.random() < 0.5) for repo, sha, _ in rng.sample(work, 12)]
        rng.shuffle(work)
        jobs: queue.Queue = queue.Queue()
        for repo, sha, dry_run in work:
            jobs.put((repo, sha, dry_run, rng.random() < 0.3))
        done: list[tuple[int, int, str, bool, flakectl.Summary]] = []

        def worker(c: psycopg.Connection) -> None:
            while True:
                try:
                    repo, sha, dry_run, nowait = jobs.get_nowait()
                except queue.Empty:
                    return
                while True:
                    try:
                        with c.transaction():
                            got = flakectl.process_commit(c, repo, sha, expire_after=STRESS_EXPIRE,
                                                          dry_run=dry_run, wait=not nowait)
                            # taken while the repository's lock is held: the order of the calls
                            (seq,) = c.execute("select nextval('stress_order')").fetchone()
                        break
                    except flakectl.LockNotAvailable:
                        nowait = False
                done.append((seq, repo, sha, dry_run, got))

        threads = [InThread(db_url, f"stress-{i}", worker) for i in range(WORKERS)]
        join_all(threads)
        assert len(done) == len(work)

        # no upload twice in the ledger, every processed upload in it, no test with two open flakes
        assert conn.execute("select upload_id from flakectl.processed_upload group by 1 having count(*) > 1"
                            ).fetchall() == []
        assert conn.execute("select repoid, test_id from test_analytics_flake where end_date is null"
                            " group by 1, 2 having count(*) > 1").fetchall() == []
        ledger = conn.execute("select repo_id, commit_sha, upload_id, xmin::text::bigint"
                              " from flakectl.processed_upload").fetchall()
        assert {u for _, _, u, _ in ledger} == {u.id for u in initial.uploads if u.state == "processed"}

        # Ledger order: a call writes its ledger rows in one transaction, whose
        # id (xmin) is assigned at its first write, after it took the lock; the
        # next call for the repository gets the lock only after that commit. So
        # per repository, xid order is the order the calls ran in. (processed_at
        # is now(), the transaction's start, which may precede the lock wait.)
        xid_of_commit: dict[tuple[int, str], set[int]] = {}
        for repo, sha, _, xid in ledger:
            xid_of_commit.setdefault((repo, sha), set()).add(xid)
        assert all(len(xids) == 1 for xids in xid_of_commit.values())  # one call processed each commit
        ledger_order = sorted(xid_of_commit, key=lambda key: xid_of_commit[key])

        expected = initial
        for repo, sha in ledger_order:
            expected = reference.apply(expected, reference.process_commit(expected, repo, sha,
                                                                          expire_after=STRESS_EXPIRE))
        assert_state(conn, expected, {f.id for f in initial.flakes})

        # Cross-check with the order the calls themselves recorded under the
        # lock: it agrees with the ledger, and replaying every call (dry runs
        # and repeats included) in it gives each call's own summary.
        done.sort()
        for repo in REPOS:
            writers = [sha for _, r, sha, dry_run, got in done if r == repo and not dry_run and got.uploads_processed]
            assert writers == [sha for r, sha in ledger_order if r == repo]
        replay = initial
        for _, repo, sha, dry_run, got in done:
            want = reference.process_commit(replay, repo, sha, expire_after=STRESS_EXPIRE, dry_run=dry_run)
            assert got == want.summary, (repo, sha, dry_run)
            replay = reference.apply(replay, want)
