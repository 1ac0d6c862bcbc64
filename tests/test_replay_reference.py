"""Rule 11 (replay) in the reference alone: no database.

Every expected value below is worked out by hand from rule 11's words: R from
an empty state with no lookback and the ledger ignored; T0 the earliest
timestamp of the repository's runs of any outcome in the uploads; L the rows
starting at or after T0 plus the open rows of tests with a row in R; pairs of
identical rows (test_id, count, fail_count, recent_passes_count, start_date,
end_date; flags_id ignored) matched one to one, as multisets.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flakectl import reference
from flakectl.errors import InvalidArgument, NullArgument
from flakectl.model import (
    ArchivedFlake,
    Flake,
    ReplayResult,
    ReplaySummary,
    Snapshot,
    Summary,
    TestRun,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T = NOW - timedelta(days=3)  # older than process_*'s one-day lookback: replay has none
OLD = NOW - timedelta(days=40)
REPO, OTHER = 1, 2
A, B, C, D = b"a", b"b", b"c", b"d"


def ts(minutes: int) -> datetime:
    return T + timedelta(minutes=minutes)


def run(key, upload, test, outcome, minutes, repo=REPO) -> TestRun:
    return TestRun(key, ts(minutes), test, outcome, repo, upload)


def flake(id, test, count, fail_count, rpc, start, end=None, *, flags=None, repo=REPO) -> Flake:
    return Flake(id, repo, test, flags, rpc, count, fail_count, start, end)


def new(test, count, fail_count, rpc, start, end=None) -> Flake:
    return flake(None, test, count, fail_count, rpc, start, end)


def snap(runs=(), flakes=(), ledger=()) -> Snapshot:
    return Snapshot(now=NOW, testruns=tuple(runs), flakes=tuple(flakes), ledger=frozenset(ledger))


# A's history: fails in upload 1, passes twice in upload 2: with expire_after=2
# the flake expires on the second pass with count 3, rpc 2.
A_RUNS = [run(1, 1, A, "failure", 0), run(2, 2, A, "pass", 10), run(3, 2, A, "pass", 20)]
A_RIGHT = new(A, 3, 1, 2, ts(0), ts(20))


def test_the_old_workers_expiry_bug_is_found_and_repaired():
    # Known trap: only end_date written on expiry, count and rpc left at the
    # previous pass's values (2 and 1).
    stale = flake(5, A, 2, 1, 1, ts(0), ts(20), flags=b"f")
    history = flake(3, A, 4, 2, 2, OLD, OLD + timedelta(days=1))  # before T0: not compared
    other_test = flake(4, B, 1, 1, 0, OLD)  # open, but B has no row in R: not compared
    s = snap(A_RUNS, [history, other_test, stale])

    dry = reference.replay(s, REPO, [2, 1, None, 2], expire_after=2)

    assert dry == ReplayResult(
        summary=ReplaySummary(
            uploads_replayed=2, testruns_considered=3, flakes_live=1, flakes_replayed=1,
            flakes_identical=0, flakes_archived=1, flakes_inserted=1, testruns_marked=1,
        ),
        live=(stale,),
        replayed=(A_RIGHT,),
    )
    assert reference.apply(s, dry) == s  # a dry run writes nothing

    real = reference.replay(s, REPO, [2, 1, None, 2], expire_after=2, dry_run=False)
    assert real.summary == dry.summary
    assert real.archived == (stale,)
    assert real.inserted == (A_RIGHT,)
    assert real.marked == frozenset({1})
    assert real.ledger_added == (1, 2)

    after = reference.apply(s, real)
    assert after.flakes == (history, other_test, replace(A_RIGHT, id=6))
    assert after.archive == (ArchivedFlake(stale, NOW),)
    assert [r.outcome for r in after.testruns] == ["flaky_fail", "pass", "pass"]
    assert after.ledger == frozenset({1, 2})

    # applied, the same replay finds everything identical
    again = reference.replay(after, REPO, [1, 2], expire_after=2)
    assert again.summary == ReplaySummary(
        uploads_replayed=2, testruns_considered=3, flakes_live=1, flakes_replayed=1,
        flakes_identical=1, testruns_marked=0,
    )


def test_t0_is_the_earliest_run_of_any_outcome():
    runs = [run(1, 1, C, "skip", -10), run(2, 1, C, None, -8), *A_RUNS,
            run(9, 1, D, "pass", -20, repo=OTHER)]  # another repo's run does not move T0
    no_runs_test = flake(7, D, 1, 1, 0, ts(-5), ts(-1))  # starts after T0 = ts(-10): compared
    before = flake(8, D, 1, 1, 0, ts(-11), ts(-9))  # starts before T0: not compared
    at_t0 = flake(9, B, 1, 1, 0, ts(-10))  # start_date = T0 is "at or after"
    right = replace(A_RIGHT, id=10)
    s = snap(runs, [no_runs_test, before, at_t0, right])

    result = reference.replay(s, REPO, [1, 2], expire_after=2, dry_run=False)

    assert result.live == (no_runs_test, at_t0, right)
    assert result.summary == ReplaySummary(
        uploads_replayed=2, testruns_considered=3, flakes_live=3, flakes_replayed=1,
        flakes_identical=1, flakes_archived=2, flakes_inserted=0, testruns_marked=1,
    )
    assert result.archived == (no_runs_test, at_t0)
    assert result.inserted == ()


def test_open_rows_of_replayed_tests_are_compared_whatever_their_start():
    # A's open row started long before T0 (an old worker that reloaded an
    # expired flake keeps bumping it): replay opens A's flake at its first
    # failure in the uploads, so the old open row is compared and differs.
    runs = [run(1, 1, A, "failure", 0), run(2, 1, A, "pass", 5), run(3, 2, B, "pass", 5)]
    old_open_a = flake(1, A, 9, 4, 1, OLD)
    old_open_b = flake(2, B, 5, 2, 3, OLD)  # B only passes: R has no B row, so not compared
    s = snap(runs, [old_open_a, old_open_b])

    result = reference.replay(s, REPO, [1, 2], dry_run=False)

    assert result.live == (old_open_a,)
    assert result.replayed == (new(A, 2, 1, 1, ts(0)),)
    assert result.summary == ReplaySummary(
        uploads_replayed=2, testruns_considered=2, flakes_live=1, flakes_replayed=1,
        flakes_archived=1, flakes_inserted=1, testruns_marked=1,
    )
    after = reference.apply(s, result)
    # the old open row left before the new one came in: one open row per test
    assert after.flakes == (old_open_b, flake(3, A, 2, 1, 1, ts(0)))


def test_identical_rows_pair_one_to_one_as_multisets_and_flags_are_not_compared():
    # Two failures of A expire twice with expire_after=1: R = two rows of A
    # that differ in dates; live holds three rows, two of them identical to
    # R's first (a duplicate write), one with flags matching R's second.
    runs = [run(1, 1, A, "failure", 0), run(2, 1, A, "pass", 1),
            run(3, 2, A, "error", 2), run(4, 2, A, "pass", 3)]
    first, second = new(A, 2, 1, 1, ts(0), ts(1)), new(A, 2, 1, 1, ts(2), ts(3))
    dup1 = replace(first, id=11, flags_id=b"x")
    dup2 = replace(first, id=12)
    flagged = replace(second, id=13, flags_id=b"y")
    s = snap(runs, [dup2, flagged, dup1])

    result = reference.replay(s, REPO, [1, 2], expire_after=1, dry_run=False)

    assert result.replayed == (first, second)
    assert result.summary == ReplaySummary(
        uploads_replayed=2, testruns_considered=4, flakes_live=3, flakes_replayed=2,
        flakes_identical=2, flakes_archived=1, flakes_inserted=0, testruns_marked=2,
    )
    assert result.archived == (dup2,)  # the lowest id (11) is the one paired
    after = reference.apply(s, result)
    assert after.flakes == (flagged, dup1)  # paired rows keep id and flags


def test_ledger_and_lookback_are_ignored_and_only_the_repos_failures_are_marked():
    runs = [
        run(1, 1, A, "failure", -60 * 24 * 30),  # a month old: no lookback in replay
        run(2, 1, A, "flaky_fail", 1),  # a failure, considered, not rewritten
        run(3, 1, B, "error", 2),
        run(4, 1, B, "failure", 3, repo=OTHER),  # another repo's run: not marked, not state
        run(5, 1, C, "pass", 4),  # C never fails: not considered
        run(6, 9, A, "failure", 5),  # an upload not replayed
    ]
    s = snap(runs, ledger=[1])

    result = reference.replay(s, REPO, [1], dry_run=False)

    assert result.replayed == (new(A, 2, 2, 0, ts(-60 * 24 * 30)), new(B, 1, 1, 0, ts(2)))
    assert result.summary == ReplaySummary(
        uploads_replayed=1, testruns_considered=3, flakes_replayed=2, flakes_inserted=2,
        testruns_marked=2,
    )
    assert result.marked == frozenset({1, 3})
    assert result.ledger_added == ()  # already recorded


def test_empty_all_null_and_runless_uploads_replay_nothing():
    live = flake(1, A, 1, 1, 0, ts(0))
    s = snap([run(1, 1, A, "failure", 0)], [live])

    for ids in ([], [None, None], [404]):
        result = reference.replay(s, REPO, ids, dry_run=False)
        assert result.summary.flakes_live == 0 and result.archived == ()
    assert reference.replay(s, REPO, []) == ReplayResult(summary=ReplaySummary())
    assert reference.replay(s, REPO, [None]) == ReplayResult(summary=ReplaySummary())
    # an upload without runs is still an upload replayed (and recorded when applied)
    unknown = reference.replay(s, REPO, [404], dry_run=False)
    assert unknown.summary == ReplaySummary(uploads_replayed=1)
    assert unknown.ledger_added == (404,)
    # another repository's replay of the same upload compares nothing of REPO
    assert reference.replay(s, OTHER, [1]).summary == ReplaySummary(uploads_replayed=1)


def test_dry_run_is_the_default():
    s = snap(A_RUNS)
    assert reference.replay(s, REPO, [1, 2]).inserted == ()
    assert reference.apply(s, reference.replay(s, REPO, [1, 2])) == s


def test_process_then_replay_then_process_again():
    # processed call by call with a long lookback, the live rows are what a
    # replay computes: everything identical, nothing written but the marks
    # (already done) and the ledger (already there)
    runs = [*A_RUNS, run(4, 3, A, "failure", 30), run(5, 3, B, "pass", 30)]
    s = snap(runs)
    for upload in (1, 2):
        s = reference.apply(s, reference.process_uploads(s, REPO, [upload], lookback=timedelta(days=30),
                                                         expire_after=2))
    replayed = reference.replay(s, REPO, [1, 2], expire_after=2, dry_run=False)
    assert replayed.summary == ReplaySummary(
        uploads_replayed=2, testruns_considered=3, flakes_live=1, flakes_replayed=1, flakes_identical=1,
        testruns_marked=0,
    )
    s = reference.apply(s, replayed)
    third = reference.process_uploads(s, REPO, [3], lookback=timedelta(days=30), expire_after=2)
    assert third.summary == Summary(uploads_processed=1, testruns_considered=1, flakes_created=1,
                                    testruns_marked=1)


_ARGS = {"repo_id": REPO, "upload_ids": [1], "expire_after": 30, "dry_run": True}


def _call(args):
    args = dict(args)
    return reference.replay(snap(), args.pop("repo_id"), args.pop("upload_ids"), **args)


@pytest.mark.parametrize("name", list(_ARGS))
def test_null_argument(name):
    with pytest.raises(NullArgument) as excinfo:
        _call({**_ARGS, name: None})
    assert excinfo.value.sqlstate == "22004"
    assert str(excinfo.value) == f"{name} must not be NULL, got NULL"


def test_bad_values_in_parameter_order_after_nulls():
    with pytest.raises(NullArgument):
        _call({**_ARGS, "repo_id": 2**40, "dry_run": None})
    with pytest.raises(InvalidArgument) as excinfo:
        _call({**_ARGS, "repo_id": 2**31, "expire_after": 0})
    assert excinfo.value.sqlstate == "22003"
    with pytest.raises(InvalidArgument) as excinfo:
        _call({**_ARGS, "expire_after": 0})
    assert excinfo.value.sqlstate == "22023"
    assert str(excinfo.value) == "expire_after must be at least 1, got 0"
