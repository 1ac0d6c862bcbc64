"""Tests of the reference implementation (flakectl.reference) alone: no database.

Each SPEC semantics rule and each "Known trap" is pinned here with exact
expected values, so the oracle the SQL function is compared against is itself
checked against the SPEC's words.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flakectl import reference
from flakectl.errors import InvalidArgument, NullArgument
from flakectl.model import (
    Commit,
    CommitReport,
    Flake,
    Result,
    Snapshot,
    Summary,
    TestRun,
    Upload,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T0 = NOW - timedelta(hours=2)  # well inside the default one-day window
OLD = NOW - timedelta(days=10)  # start dates of flakes from earlier calls

REPO = 1
OTHER_REPO = 2
SHA = "a" * 40
OTHER_SHA = "b" * 40

A = b"test-a"
B = b"test-b"
C = b"test-c"


def ts(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def run(
    key: int,
    upload_id: int | None,
    test_id: bytes,
    outcome: str | None,
    timestamp: datetime = T0,
    repo_id: int = REPO,
) -> TestRun:
    return TestRun(
        key=key,
        timestamp=timestamp,
        test_id=test_id,
        outcome=outcome,
        repo_id=repo_id,
        upload_id=upload_id,
        commit_sha=SHA,
    )


def flake(
    id: int,
    test_id: bytes,
    *,
    recent_passes_count: int = 0,
    count: int = 1,
    fail_count: int = 1,
    start_date: datetime = OLD,
    end_date: datetime | None = None,
    repoid: int = REPO,
    flags_id: bytes | None = None,
) -> Flake:
    return Flake(
        id=id,
        repoid=repoid,
        test_id=test_id,
        flags_id=flags_id,
        recent_passes_count=recent_passes_count,
        count=count,
        fail_count=fail_count,
        start_date=start_date,
        end_date=end_date,
    )


def new_flake(test_id: bytes, **fields) -> Flake:
    """A flake as a call returns it when it opened it (id None, repo REPO)."""
    return replace(flake(0, test_id, **fields), id=None)


def snapshot(
    runs: tuple[TestRun, ...] | list[TestRun] = (),
    *,
    uploads: tuple[int, ...] = (1,),
    flakes: tuple[Flake, ...] = (),
    ledger: tuple[int, ...] = (),
    now: datetime = NOW,
) -> Snapshot:
    """One commit (REPO, SHA) with one test_results report holding `uploads`."""
    return Snapshot(
        now=now,
        commits=(Commit(id=10, commitid=SHA, repoid=REPO),),
        reports=(CommitReport(id=100, commit_id=10, report_type="test_results"),),
        uploads=tuple(Upload(id=u, report_id=100, state="processed") for u in uploads),
        testruns=tuple(runs),
        flakes=flakes,
        ledger=frozenset(ledger),
    )


# --------------------------------------------------------------------------
# Rule 4: the state machine
# --------------------------------------------------------------------------


def test_failure_without_open_flake_opens_one_dated_from_the_run():
    snap = snapshot([run(1, 1, A, "failure", ts(0)), run(2, 1, B, "pass", ts(0))])

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(
        uploads_processed=1,
        uploads_skipped=0,
        testruns_considered=1,  # B's pass: B neither fails nor has an open flake
        flakes_created=1,
        flakes_updated=0,
        flakes_expired=0,
        testruns_marked=1,
    )
    # start_date is the run's timestamp, not the snapshot's `now` (rule 6).
    assert result.flakes == (new_flake(A, count=1, fail_count=1, recent_passes_count=0, start_date=ts(0)),)
    assert result.marked == frozenset({1})
    assert result.ledger_added == (1,)


def test_open_flake_is_updated_by_passes_and_failures_and_keeps_its_flags():
    existing = flake(7, A, recent_passes_count=3, count=10, fail_count=4, flags_id=b"flags")
    snap = snapshot(
        [
            run(1, 1, A, "pass", ts(0)),
            run(2, 2, A, "failure", ts(1)),
            run(3, 2, A, "pass", ts(2)),
            run(4, 2, A, "pass", ts(3)),
        ],
        uploads=(1, 2),
        flakes=(existing,),
    )

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(
        uploads_processed=2,
        testruns_considered=4,
        flakes_updated=1,
        testruns_marked=1,
    )
    # pass: 11/rpc 4; failure: 12, fail 5, rpc 0; pass: 13/rpc 1; pass: 14/rpc 2
    assert result.flakes == (
        replace(existing, count=14, fail_count=5, recent_passes_count=2),
    )
    assert result.marked == frozenset({2})


def test_pass_without_open_flake_is_ignored_even_if_the_test_fails_later():
    # The pass comes first, so there is no flake yet: it changes nothing, but
    # it is considered (its test fails in the call).
    snap = snapshot([run(1, 1, A, "pass", ts(0)), run(2, 1, A, "failure", ts(1))])

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary.testruns_considered == 2
    assert result.flakes == (new_flake(A, count=1, fail_count=1, start_date=ts(1)),)


def test_passes_of_tests_that_do_not_matter_are_not_considered():
    snap = snapshot([run(1, 1, A, "pass", ts(0)), run(2, 1, B, "pass", ts(0))])

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(uploads_processed=1)
    assert result.flakes == ()
    assert result.marked == frozenset()
    assert result.ledger_added == (1,)


def test_open_flake_untouched_by_the_call_is_not_written():
    snap = snapshot([run(1, 1, B, "failure", ts(0))], flakes=(flake(3, A),))

    result = reference.process_commit(snap, REPO, SHA)

    assert [f.test_id for f in result.flakes] == [B]
    assert result.summary.flakes_updated == 0


def test_tests_are_independent_and_result_is_ordered_by_test_id():
    snap = snapshot(
        [
            run(1, 1, B, "failure", ts(0)),
            run(2, 1, A, "failure", ts(0)),
            run(3, 1, B, "pass", ts(1)),
        ],
        flakes=(flake(5, C, recent_passes_count=0, count=3, fail_count=2),),
    )

    result = reference.process_commit(snap, REPO, SHA, expire_after=1)

    # B expires on its pass; A stays open; C (open, no runs) is untouched.
    assert result.flakes == (
        new_flake(A, start_date=ts(0)),
        new_flake(B, count=2, recent_passes_count=1, start_date=ts(0), end_date=ts(1)),
    )
    assert result.summary == Summary(
        uploads_processed=1,
        testruns_considered=3,
        flakes_created=2,
        flakes_expired=1,
        testruns_marked=2,
    )


def test_expire_after_one_expires_on_the_first_pass():
    snap = snapshot(
        [
            run(1, 1, A, "failure", ts(0)),
            run(2, 1, A, "pass", ts(1)),
            run(3, 1, B, "pass", ts(0)),
        ],
        flakes=(flake(4, B, recent_passes_count=0, count=2, fail_count=2),),
    )

    result = reference.process_commit(snap, REPO, SHA, expire_after=1)

    assert result.flakes == (
        new_flake(A, count=2, fail_count=1, recent_passes_count=1, start_date=ts(0), end_date=ts(1)),
        flake(4, B, recent_passes_count=1, count=3, fail_count=2, end_date=ts(0)),
    )
    assert result.summary == Summary(
        uploads_processed=1,
        testruns_considered=3,
        flakes_created=1,
        flakes_updated=1,
        flakes_expired=2,
        testruns_marked=1,
    )


def test_passes_after_expiry_are_considered_but_change_nothing():
    snap = snapshot(
        [
            run(1, 1, A, "failure", ts(0)),
            run(2, 1, A, "pass", ts(1)),
            run(3, 1, A, "pass", ts(2)),  # rpc 2: expires
            run(4, 1, A, "pass", ts(3)),  # ignored
        ]
    )

    result = reference.process_commit(snap, REPO, SHA, expire_after=2)

    assert result.summary.testruns_considered == 4
    assert result.flakes == (
        new_flake(A, count=3, fail_count=1, recent_passes_count=2, start_date=ts(0), end_date=ts(2)),
    )


def test_expiry_then_failure_in_one_call_opens_a_second_new_row():
    snap = snapshot(
        [
            run(1, 1, A, "failure", ts(0)),
            run(2, 2, A, "pass", ts(1)),
            run(3, 2, A, "pass", ts(2)),  # expires the first flake
            run(4, 2, A, "failure", ts(3)),  # opens a new one
            run(5, 2, A, "pass", ts(4)),
        ],
        uploads=(1, 2),
    )

    result = reference.process_commit(snap, REPO, SHA, expire_after=2)

    assert result.flakes == (
        new_flake(A, count=3, fail_count=1, recent_passes_count=2, start_date=ts(0), end_date=ts(2)),
        new_flake(A, count=2, fail_count=1, recent_passes_count=1, start_date=ts(3)),
    )
    assert result.summary == Summary(
        uploads_processed=2,
        testruns_considered=5,
        flakes_created=2,
        flakes_expired=1,
        testruns_marked=2,
    )
    assert result.marked == frozenset({1, 4})


def test_pre_existing_flake_expires_then_a_failure_opens_a_new_one():
    existing = flake(9, A, recent_passes_count=1, count=5, fail_count=2, flags_id=b"f")
    snap = snapshot(
        [
            run(1, 1, A, "pass", ts(0)),  # rpc 2: expires
            run(2, 1, A, "pass", ts(1)),  # ignored, but considered
            run(3, 1, A, "failure", ts(2)),  # new flake, flags_id NULL
        ],
        flakes=(existing,),
    )

    result = reference.process_commit(snap, REPO, SHA, expire_after=2)

    assert result.flakes == (
        replace(existing, count=6, recent_passes_count=2, end_date=ts(0)),
        new_flake(A, start_date=ts(2)),
    )
    assert result.summary == Summary(
        uploads_processed=1,
        testruns_considered=3,
        flakes_created=1,
        flakes_updated=1,
        flakes_expired=1,
        testruns_marked=1,
    )


# --------------------------------------------------------------------------
# Known traps
# --------------------------------------------------------------------------


def test_trap_failure_in_upload_1_then_passes_in_uploads_2_to_n_expire_the_new_flake():
    # Pre-filtering passes to flakes open *before* the call would drop all of
    # these passes. Upload 32's pass comes after expiry: considered, ignored.
    runs = [run(1, 1, A, "failure", ts(0))]
    runs += [run(k, k, A, "pass", ts(k)) for k in range(2, 33)]
    snap = snapshot(runs, uploads=tuple(range(1, 33)))

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(
        uploads_processed=32,
        testruns_considered=32,
        flakes_created=1,
        flakes_expired=1,
        testruns_marked=1,
    )
    # The 30th pass (upload 31) expires it; count and rpc are kept (trap).
    assert result.flakes == (
        new_flake(A, count=31, fail_count=1, recent_passes_count=30, start_date=ts(0), end_date=ts(31)),
    )


@pytest.mark.parametrize("start_rpc", [30, 45])
def test_trap_flake_starting_at_or_above_expire_after_expires_on_first_pass(start_rpc):
    existing = flake(5, A, recent_passes_count=start_rpc, count=40, fail_count=10)
    snap = snapshot([run(1, 1, A, "pass", ts(0)), run(2, 1, A, "pass", ts(1))], flakes=(existing,))

    result = reference.process_commit(snap, REPO, SHA)

    # Every field persisted, not only end_date (trap).
    assert result.flakes == (
        replace(existing, count=41, recent_passes_count=start_rpc + 1, end_date=ts(0)),
    )
    assert result.summary == Summary(
        uploads_processed=1,
        testruns_considered=2,
        flakes_updated=1,
        flakes_expired=1,
    )


def test_trap_expired_flake_is_never_updated_and_a_new_failure_creates_a_new_row():
    history = flake(
        3, A, recent_passes_count=30, count=35, fail_count=5, end_date=NOW - timedelta(days=2)
    )
    snap = snapshot([run(1, 1, A, "failure", ts(0)), run(2, 1, A, "pass", ts(1))], flakes=(history,))

    result = reference.process_commit(snap, REPO, SHA)

    assert result.flakes == (new_flake(A, count=2, fail_count=1, recent_passes_count=1, start_date=ts(0)),)
    assert result.summary == Summary(
        uploads_processed=1, testruns_considered=2, flakes_created=1, testruns_marked=1
    )
    after = reference.apply(snap, result)
    assert after.flakes == (history, replace(result.flakes[0], id=4))


def test_trap_expired_flake_is_not_state_for_passes():
    history = flake(3, A, recent_passes_count=30, count=35, end_date=NOW - timedelta(days=2))
    snap = snapshot([run(1, 1, A, "pass", ts(0))], flakes=(history,))

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(uploads_processed=1)
    assert result.flakes == ()


def test_trap_processing_the_same_commit_twice_changes_nothing_the_second_time():
    snap = snapshot(
        [run(1, 1, A, "failure", ts(0)), run(2, 2, A, "pass", ts(1))],
        uploads=(1, 2),
    )
    first = reference.process_commit(snap, REPO, SHA)
    after = reference.apply(snap, first)

    second = reference.process_commit(after, REPO, SHA)

    assert second == Result(summary=Summary(uploads_skipped=2))
    assert reference.apply(after, second) == after


def test_uploads_already_in_the_ledger_are_skipped():
    snap = snapshot(
        [
            run(1, 1, A, "failure", ts(0)),
            run(2, 2, B, "failure", ts(0)),
            run(3, 3, C, "failure", ts(0)),
        ],
        uploads=(1, 2, 3),
        ledger=(1, 2),
    )

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(
        uploads_processed=1,
        uploads_skipped=2,
        testruns_considered=1,
        flakes_created=1,
        testruns_marked=1,
    )
    assert result.flakes == (new_flake(C, start_date=ts(0)),)
    assert result.marked == frozenset({3})
    assert result.ledger_added == (3,)


# --------------------------------------------------------------------------
# Rule 2: order, window, repo
# --------------------------------------------------------------------------


def test_tie_failure_before_pass_at_equal_timestamp_within_an_upload():
    # Pass listed first; at rpc 29 a pass first would expire the flake and the
    # failure would open a new one. Failure first resets rpc instead.
    existing = flake(2, A, recent_passes_count=29, count=40, fail_count=5)
    snap = snapshot(
        [run(1, 1, A, "pass", ts(0)), run(2, 1, A, "failure", ts(0))],
        flakes=(existing,),
    )

    result = reference.process_commit(snap, REPO, SHA)

    assert result.flakes == (replace(existing, count=42, fail_count=6, recent_passes_count=1),)
    assert result.summary == Summary(
        uploads_processed=1, testruns_considered=2, flakes_updated=1, testruns_marked=1
    )


def test_order_is_upload_id_before_timestamp():
    # Upload 2's failure is older than upload 1's pass, but upload 1 comes
    # first: its pass meets no flake and is ignored.
    snap = snapshot(
        [run(1, 2, A, "failure", ts(5)), run(2, 1, A, "pass", ts(10))],
        uploads=(2, 1),
    )

    result = reference.process_commit(snap, REPO, SHA)

    assert result.flakes == (new_flake(A, count=1, start_date=ts(5)),)
    assert result.summary.testruns_considered == 2
    assert result.ledger_added == (1, 2)


def test_order_within_an_upload_is_by_timestamp():
    snap = snapshot([run(1, 1, A, "pass", ts(5)), run(2, 1, A, "failure", ts(3))])

    result = reference.process_commit(snap, REPO, SHA)

    assert result.flakes == (new_flake(A, count=2, recent_passes_count=1, start_date=ts(3)),)


def test_lookback_boundary_is_inclusive():
    edge = NOW - timedelta(days=1)
    snap = snapshot(
        [
            run(1, 1, A, "failure", edge),
            run(2, 1, B, "failure", edge - timedelta(microseconds=1)),
        ]
    )

    result = reference.process_commit(snap, REPO, SHA)

    assert result.flakes == (new_flake(A, start_date=edge),)
    assert result.marked == frozenset({1})
    assert result.summary.testruns_considered == 1


def test_custom_and_zero_lookback():
    snap = snapshot(
        [
            run(1, 1, A, "failure", NOW),
            run(2, 1, B, "failure", NOW - timedelta(microseconds=1)),
            run(3, 1, C, "failure", NOW - timedelta(hours=1)),
        ]
    )

    hour = reference.process_commit(snap, REPO, SHA, lookback=timedelta(hours=1))
    zero = reference.process_commit(snap, REPO, SHA, lookback=timedelta(0))

    assert hour.marked == frozenset({1, 2, 3})
    assert zero.marked == frozenset({1})
    assert zero.flakes == (new_flake(A, start_date=NOW),)


def test_runs_outside_the_window_do_not_touch_an_open_flake():
    existing = flake(1, A, recent_passes_count=29, count=30, fail_count=1)
    snap = snapshot([run(1, 1, A, "pass", NOW - timedelta(days=2))], flakes=(existing,))

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(uploads_processed=1)
    assert result.flakes == ()


def test_other_repos_runs_and_flakes_are_ignored():
    # Upload 1 belongs to REPO's commit but holds a run of another repo; the
    # other repo's open flake for B is not REPO's state.
    other_flake = flake(6, B, repoid=OTHER_REPO, recent_passes_count=0, count=1)
    snap = snapshot(
        [
            run(1, 1, A, "failure", ts(0), repo_id=OTHER_REPO),
            run(2, 1, B, "pass", ts(0)),
            run(3, 1, C, "failure", ts(0)),
        ],
        flakes=(other_flake,),
    )

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(
        uploads_processed=1, testruns_considered=1, flakes_created=1, testruns_marked=1
    )
    assert result.flakes == (new_flake(C, start_date=ts(0)),)
    assert result.marked == frozenset({3})


def test_runs_without_upload_are_never_considered():
    snap = snapshot([run(1, None, A, "failure", ts(0))])

    result = reference.process_commit(snap, REPO, SHA)

    assert result.summary == Summary(uploads_processed=1)


# --------------------------------------------------------------------------
# Rules 3 and 5: outcome classes and marking
# --------------------------------------------------------------------------


def test_outcome_classes_and_marking():
    existing = flake(1, A, recent_passes_count=0, count=1, fail_count=1)
    snap = snapshot(
        [
            run(1, 1, A, "skip", ts(0)),
            run(2, 1, A, None, ts(0)),
            run(3, 1, A, "PASS", ts(0)),
            run(4, 1, A, "Failure", ts(0)),
            run(5, 1, B, "flaky_fail", ts(0)),
            run(6, 1, C, "error", ts(0)),
            run(7, 1, C, "pass", ts(1)),
        ],
        flakes=(existing,),
    )

    result = reference.process_commit(snap, REPO, SHA)

    # A's runs are all ignored: its open flake is untouched. flaky_fail is a
    # failure but is not marked again; error is marked.
    assert result.flakes == (
        new_flake(B, start_date=ts(0)),
        new_flake(C, count=2, recent_passes_count=1, start_date=ts(0)),
    )
    assert result.marked == frozenset({6})
    assert result.summary == Summary(
        uploads_processed=1, testruns_considered=3, flakes_created=2, testruns_marked=1
    )


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("failure", "failure"),
        ("error", "failure"),
        ("flaky_fail", "failure"),
        ("pass", "pass"),
        ("skip", None),
        ("PASS", None),
        ("", None),
        (None, None),
    ],
)
def test_outcome_class(outcome, expected):
    assert reference.outcome_class(outcome) == expected


# --------------------------------------------------------------------------
# Rule 1 and entry points: which uploads
# --------------------------------------------------------------------------


def _many_reports_snapshot(*, pending_state: str = "pending") -> Snapshot:
    return Snapshot(
        now=NOW,
        commits=(
            Commit(id=10, commitid=SHA, repoid=REPO),
            Commit(id=11, commitid=OTHER_SHA, repoid=REPO),
            Commit(id=12, commitid=SHA, repoid=OTHER_REPO),
        ),
        reports=(
            CommitReport(id=100, commit_id=10, report_type="test_results"),
            CommitReport(id=101, commit_id=10, report_type=None),
            CommitReport(id=102, commit_id=10, report_type="coverage"),
            CommitReport(id=103, commit_id=11, report_type="test_results"),
            CommitReport(id=104, commit_id=12, report_type="test_results"),
        ),
        uploads=(
            Upload(id=5, report_id=100, state="processed"),
            Upload(id=3, report_id=100, state="processed"),
            Upload(id=4, report_id=100, state=pending_state),
            Upload(id=6, report_id=101, state="processed"),
            Upload(id=7, report_id=102, state="processed"),
            Upload(id=8, report_id=103, state="processed"),
            Upload(id=9, report_id=104, state="processed"),
        ),
        # One failing run per upload, keyed by the upload id.
        testruns=tuple(run(u, u, b"t%d" % u, "failure", ts(u)) for u in range(3, 10)),
    )


def test_process_commit_selects_processed_test_results_uploads_of_the_commit():
    snap = _many_reports_snapshot()

    result = reference.process_commit(snap, REPO, SHA)

    assert result.ledger_added == (3, 5)
    assert result.marked == frozenset({3, 5})
    assert result.summary == Summary(
        uploads_processed=2, testruns_considered=2, flakes_created=2, testruns_marked=2
    )


def test_uploads_that_reach_processed_later_are_picked_up_later():
    snap = _many_reports_snapshot()
    after = reference.apply(snap, reference.process_commit(snap, REPO, SHA))
    later = replace(after, uploads=_many_reports_snapshot(pending_state="processed").uploads)

    result = reference.process_commit(later, REPO, SHA)

    assert result.ledger_added == (4,)
    assert result.summary == Summary(
        uploads_processed=1,
        uploads_skipped=2,
        testruns_considered=1,
        flakes_created=1,
        testruns_marked=1,
    )


def test_unknown_repo_or_commit_returns_zeros():
    snap = _many_reports_snapshot()

    assert reference.process_commit(snap, 999, SHA) == Result(summary=Summary())
    assert reference.process_commit(snap, REPO, "no-such-commit") == Result(summary=Summary())


def test_process_uploads_trusts_the_list_drops_nulls_duplicates_and_ledger_ids():
    # 8 is another commit's upload, 4 is pending, 999 is unknown: all
    # processed. 5 is in the ledger: skipped once though listed twice.
    snap = replace(_many_reports_snapshot(), ledger=frozenset({5}))

    result = reference.process_uploads(snap, REPO, [8, None, 4, 5, 999, 5, 8, None])

    assert result.ledger_added == (4, 8, 999)
    assert result.marked == frozenset({4, 8})
    assert result.summary == Summary(
        uploads_processed=3,
        uploads_skipped=1,
        testruns_considered=2,
        flakes_created=2,
        testruns_marked=2,
    )


def test_process_uploads_ignores_other_repos_runs():
    snap = snapshot([run(1, 1, A, "failure", ts(0), repo_id=OTHER_REPO), run(2, 1, B, "error", ts(0))])

    result = reference.process_uploads(snap, REPO, [1])

    assert result.marked == frozenset({2})
    assert result.flakes == (new_flake(B, start_date=ts(0)),)


def test_process_uploads_with_unknown_ids_records_them_only():
    snap = snapshot([run(1, 1, A, "failure", ts(0))])

    result = reference.process_uploads(snap, REPO, [404, 405])

    assert result == Result(summary=Summary(uploads_processed=2), ledger_added=(404, 405))


def test_process_uploads_with_empty_list_returns_zeros():
    assert reference.process_uploads(snapshot(), REPO, []) == Result(summary=Summary())


# --------------------------------------------------------------------------
# Rule 10: bad input
# --------------------------------------------------------------------------

_COMMIT_ARGS = {
    "repo_id": REPO,
    "commit_sha": SHA,
    "lookback": timedelta(days=1),
    "expire_after": 30,
    "dry_run": False,
}
_UPLOADS_ARGS = {
    "repo_id": REPO,
    "upload_ids": [1],
    "lookback": timedelta(days=1),
    "expire_after": 30,
    "dry_run": False,
}


def _call_commit(args):
    args = dict(args)
    return reference.process_commit(snapshot(), args.pop("repo_id"), args.pop("commit_sha"), **args)


def _call_uploads(args):
    args = dict(args)
    return reference.process_uploads(snapshot(), args.pop("repo_id"), args.pop("upload_ids"), **args)


@pytest.mark.parametrize(
    ("call", "base", "name"),
    [(_call_commit, _COMMIT_ARGS, name) for name in _COMMIT_ARGS]
    + [(_call_uploads, _UPLOADS_ARGS, name) for name in _UPLOADS_ARGS],
)
def test_null_argument(call, base, name):
    with pytest.raises(NullArgument) as excinfo:
        call({**base, name: None})
    assert excinfo.value.sqlstate == "22004"
    assert str(excinfo.value) == f"{name} must not be NULL, got NULL"


@pytest.mark.parametrize("call", [_call_commit, _call_uploads])
def test_negative_lookback(call):
    base = _COMMIT_ARGS if call is _call_commit else _UPLOADS_ARGS
    with pytest.raises(InvalidArgument) as excinfo:
        call({**base, "lookback": -timedelta(microseconds=1)})
    assert excinfo.value.sqlstate == "22023"
    assert str(excinfo.value) == "lookback must not be negative, got -1 day, 23:59:59.999999"


@pytest.mark.parametrize("call", [_call_commit, _call_uploads])
@pytest.mark.parametrize("value", [0, -5])
def test_expire_after_below_one(call, value):
    base = _COMMIT_ARGS if call is _call_commit else _UPLOADS_ARGS
    with pytest.raises(InvalidArgument) as excinfo:
        call({**base, "expire_after": value})
    assert excinfo.value.sqlstate == "22023"
    assert str(excinfo.value) == f"expire_after must be at least 1, got {value}"


def test_null_is_reported_before_out_of_range():
    with pytest.raises(NullArgument):
        _call_commit({**_COMMIT_ARGS, "repo_id": None, "expire_after": 0})


def test_boundary_arguments_are_accepted():
    assert _call_commit({**_COMMIT_ARGS, "lookback": timedelta(0), "expire_after": 1}).summary == Summary(
        uploads_processed=1
    )


# --------------------------------------------------------------------------
# dry_run and apply
# --------------------------------------------------------------------------


def test_dry_run_returns_the_same_summary_and_writes_nothing():
    snap = snapshot(
        [run(1, 1, A, "failure", ts(0)), run(2, 2, A, "pass", ts(1)), run(3, 2, B, "pass", ts(1))],
        uploads=(1, 2),
        flakes=(flake(1, B, recent_passes_count=0),),
    )

    real = reference.process_commit(snap, REPO, SHA, expire_after=1)
    dry = reference.process_commit(snap, REPO, SHA, expire_after=1, dry_run=True)

    assert real.summary == Summary(
        uploads_processed=2,
        testruns_considered=3,
        flakes_created=1,
        flakes_updated=1,
        flakes_expired=2,
        testruns_marked=1,
    )
    assert dry == Result(summary=real.summary)
    assert reference.apply(snap, dry) == snap
    assert reference.process_uploads(snap, REPO, [1, 2], expire_after=1, dry_run=True) == dry


def test_apply_chains_calls():
    untouched = flake(7, C, recent_passes_count=2, count=5, fail_count=3)
    snap = Snapshot(
        now=NOW,
        commits=(Commit(id=10, commitid=SHA, repoid=REPO), Commit(id=11, commitid=OTHER_SHA, repoid=REPO)),
        reports=(CommitReport(id=100, commit_id=10), CommitReport(id=101, commit_id=11)),
        uploads=(Upload(id=1, report_id=100), Upload(id=2, report_id=101)),
        testruns=(
            run(1, 1, A, "failure", ts(0)),
            run(2, 1, B, "error", ts(0)),
            run(3, 2, A, "pass", ts(1)),
            run(4, 2, B, "failure", ts(1)),
        ),
        flakes=(untouched,),
    )

    first = reference.process_commit(snap, REPO, SHA)
    after_first = reference.apply(snap, first)

    # New flakes get ids max + 1, + 2 in result order (A, then B).
    assert after_first.flakes == (
        untouched,
        flake(8, A, start_date=ts(0)),
        flake(9, B, start_date=ts(0)),
    )
    assert [r.outcome for r in after_first.testruns] == ["flaky_fail", "flaky_fail", "pass", "failure"]
    assert after_first.ledger == frozenset({1})

    second = reference.process_commit(after_first, REPO, OTHER_SHA)
    assert second.summary == Summary(
        uploads_processed=1, testruns_considered=2, flakes_updated=2, testruns_marked=1
    )
    after_second = reference.apply(after_first, second)
    assert after_second.flakes == (
        untouched,
        flake(8, A, count=2, recent_passes_count=1, start_date=ts(0)),
        flake(9, B, count=2, fail_count=2, start_date=ts(0)),
    )
    assert [r.outcome for r in after_second.testruns] == ["flaky_fail"] * 2 + ["pass", "flaky_fail"]
    assert after_second.ledger == frozenset({1, 2})

    # Both commits are now in the ledger: nothing more happens.
    again = reference.process_commit(after_second, REPO, SHA)
    assert again == Result(summary=Summary(uploads_skipped=1))


def test_apply_starts_ids_at_one_on_an_empty_table():
    snap = snapshot([run(1, 1, A, "failure", ts(0))])

    after = reference.apply(snap, reference.process_commit(snap, REPO, SHA))

    assert after.flakes == (flake(1, A, start_date=ts(0)),)


def test_apply_rejects_updates_of_unknown_flakes():
    result = Result(summary=Summary(), flakes=(flake(42, A),))
    with pytest.raises(ValueError, match="42"):
        reference.apply(snapshot(), result)


def test_two_open_flakes_for_one_test_is_a_broken_snapshot():
    snap = snapshot([run(1, 1, A, "pass", ts(0))], flakes=(flake(1, A), flake(2, A)))
    with pytest.raises(ValueError, match="two open flakes"):
        reference.process_commit(snap, REPO, SHA)


def test_same_input_gives_same_rows_whenever_it_runs():
    runs = [run(1, 1, A, "failure", ts(0)), run(2, 1, A, "pass", ts(1))]
    early = reference.process_commit(snapshot(runs), REPO, SHA)
    later = reference.process_commit(snapshot(runs, now=NOW + timedelta(hours=3)), REPO, SHA)

    assert early == later
