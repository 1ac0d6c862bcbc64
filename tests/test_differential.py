"""The function against the reference on generated repositories.

Hypothesis builds a repository history (open and expired flakes at any
recent_passes_count, commits with uploads in mixed states and report types,
runs with equal timestamps, every outcome kind, runs outside the window, rows
of other commits and repos), then makes one to three calls. Each call goes to
both the SQL function and the reference; the flake rows (ids of new rows
aside), the run outcomes, the ledger and the summaries must be identical.

Every example runs inside one transaction that is rolled back, so now() is
fixed for the example and the reference sees the same clock.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from psycopg import sql
from hypothesis import given
from hypothesis import strategies as st

import flakectl
from flakectl import reference
from flakectl.model import Commit, CommitReport, Flake, Snapshot, TestRun, Upload

from dbdata import assert_state, insert

REPO, OTHER_REPO = 1, 2
TESTS = [b"t0", b"t1", b"t2", b"t3", b"t4"]
SHAS = ["c1", "c2", "c3"]
OUTCOMES = ["pass", "pass", "pass", "failure", "error", "flaky_fail", "skip", "PASS", "xfail"]
# hours before now(): clusters make equal timestamps likely; 24 is the window's
# edge (included), 25 is outside it
HOURS = [1, 1, 2, 3, 24, 25]
SECONDS = [0, 0, 0, 1, 2]


@st.composite
def histories(draw):
    """A Snapshot template with timestamps as offsets from now (timedeltas)."""
    flake_id = 1_000_000
    flakes = []
    for repo in (REPO, OTHER_REPO):
        for test in draw(st.lists(st.sampled_from(TESTS), unique=True, max_size=4)):
            # history rows first; at most one open flake per test
            for _ in range(draw(st.integers(0, 2))):
                flake_id += 1
                flakes.append(_flake(draw, flake_id, repo, test, expired=True))
            if draw(st.booleans()):
                flake_id += 1
                flakes.append(_flake(draw, flake_id, repo, test, expired=False))

    commits, reports, uploads, runs = [], [], [], []
    upload_ids = draw(st.lists(st.integers(1, 60), unique=True, min_size=1, max_size=9))
    next_upload = iter(upload_ids)
    commit_id = report_id = 0
    for repo, sha in [(REPO, "c1"), (REPO, "c2"), (REPO, "c3"), (OTHER_REPO, "c1")]:
        commit_id += 1
        commits.append(Commit(commit_id, sha, repo))
        for report_type in draw(st.lists(st.sampled_from(["test_results", "test_results", "coverage", None]),
                                         min_size=1, max_size=2)):
            report_id += 1
            reports.append(CommitReport(report_id, commit_id, None, report_type))
            for _ in range(draw(st.integers(0, 3))):
                upload_id = next(next_upload, None)
                if upload_id is None:
                    break
                state = draw(st.sampled_from(["processed", "processed", "processed", "started", "error"]))
                uploads.append(Upload(upload_id, report_id, state))
                hour = draw(st.sampled_from(HOURS))
                for _ in range(draw(st.integers(0, 12))):
                    run_repo = draw(st.sampled_from([repo, repo, repo, OTHER_REPO if repo == REPO else REPO]))
                    runs.append((
                        timedelta(hours=hour, seconds=draw(st.sampled_from(SECONDS))),
                        draw(st.sampled_from(TESTS)),
                        draw(st.sampled_from(OUTCOMES)),
                        run_repo,
                        upload_id,
                        sha,
                    ))
    # runs of an upload id no report knows (reachable through process_uploads only)
    for _ in range(draw(st.integers(0, 4))):
        runs.append((timedelta(hours=1), draw(st.sampled_from(TESTS)), draw(st.sampled_from(OUTCOMES)),
                     REPO, 99, None))
    ledger = draw(st.sets(st.sampled_from(upload_ids), max_size=2))
    calls = draw(st.lists(_calls(upload_ids), min_size=1, max_size=3))
    return flakes, commits, reports, uploads, runs, ledger, calls


def _flake(draw, flake_id, repo, test, *, expired):
    rpc = draw(st.sampled_from([0, 1, 2, 3, 28, 29, 30, 31, 45]))
    fails = draw(st.integers(1, 3))
    start = timedelta(hours=draw(st.sampled_from([30, 48, 100])))
    return (flake_id, repo, test, draw(st.sampled_from([None, b"flags"])), rpc, fails + rpc, fails, start,
            timedelta(hours=26) if expired else None)


def _calls(upload_ids):
    options = dict(
        lookback=st.sampled_from([timedelta(days=1), timedelta(hours=2), timedelta(0), timedelta(days=30)]),
        expire_after=st.sampled_from([1, 2, 3, 30]),
        dry_run=st.sampled_from([False, False, False, True]),
    )
    commit = st.fixed_dictionaries({"kind": st.just("commit"), "sha": st.sampled_from(SHAS),
                                    "repo": st.sampled_from([REPO, REPO, REPO, OTHER_REPO])}, optional=options)
    uploads = st.fixed_dictionaries(
        {"kind": st.just("uploads"), "repo": st.sampled_from([REPO, REPO, OTHER_REPO]),
         "ids": st.lists(st.one_of(st.sampled_from(upload_ids + [99, 12345]), st.none()), max_size=6)},
        optional=options,
    )
    return st.one_of(commit, uploads)


def _materialize(now, history) -> Snapshot:
    flakes, commits, reports, uploads, runs, ledger, _ = history
    return Snapshot(
        now=now,
        commits=tuple(commits),
        reports=tuple(reports),
        uploads=tuple(uploads),
        testruns=tuple(
            TestRun(key, now - ago, test, outcome, repo, upload, sha)
            for key, (ago, test, outcome, repo, upload, sha) in enumerate(runs)
        ),
        flakes=tuple(
            Flake(fid, repo, test, flags, rpc, count, fails, now - start, None if end is None else now - end)
            for fid, repo, test, flags, rpc, count, fails, start, end in flakes
        ),
        ledger=frozenset(ledger),
    )


@pytest.fixture(scope="module")
def diff_conn(shared_url):
    with psycopg.connect(shared_url) as c:
        yield c


@pytest.mark.parametrize("timezone", ["UTC", "America/New_York"])
@given(history=histories())
def test_function_equals_reference(diff_conn, timezone, history):
    conn = diff_conn
    try:
        # the window is computed in UTC whatever the session's TimeZone
        conn.execute(sql.SQL("set timezone = {}").format(sql.Literal(timezone)))
        (now,) = conn.execute("select now()").fetchone()
        expected = _materialize(now, history)
        insert(conn, expected)
        known_ids = {f.id for f in expected.flakes}
        for call in history[-1]:
            options = {k: call[k] for k in ("lookback", "expire_after", "dry_run") if k in call}
            if call["kind"] == "commit":
                want = reference.process_commit(expected, call["repo"], call["sha"], **options)
                got = flakectl.process_commit(conn, call["repo"], call["sha"], **options)
            else:
                want = reference.process_uploads(expected, call["repo"], call["ids"], **options)
                got = flakectl.process_uploads(conn, call["repo"], call["ids"], **options)
            assert got == want.summary, call
            expected = reference.apply(expected, want)
            assert_state(conn, expected, known_ids)
    finally:
        conn.rollback()
