"""The reference implementation of flakectl: the oracle the SQL function is tested against.

This module encodes SPEC "Semantics" in plain, sequential Python. It is written
to be obviously right, not fast: it walks the runs one by one, in the SPEC's
order, and keeps a dict of per-test state, exactly as the state machine in
rule 4 reads. It never touches a database; it reads a `Snapshot` (every row a
call may see) and returns a `Result` (the summary row and the writes the call
would make). `apply` turns a snapshot and a result into the snapshot after
those writes, so tests can chain calls.

Entry points mirror the SQL ones:

    process_commit(snapshot, repo_id, commit_sha, *, lookback, expire_after, dry_run)
    process_uploads(snapshot, repo_id, upload_ids, *, lookback, expire_after, dry_run)
    replay(snapshot, repo_id, upload_ids, *, expire_after, dry_run)
    apply(snapshot, result)            # a Result or a ReplayResult

`wait` is not modelled: a snapshot is already the state as of the lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from flakectl.errors import FlakectlError, InvalidArgument, NullArgument
from flakectl.model import (
    ArchivedFlake,
    Flake,
    ReplayResult,
    ReplaySummary,
    Result,
    Snapshot,
    Summary,
    TestRun,
)

__all__ = [
    "DEFAULT_EXPIRE_AFTER",
    "DEFAULT_LOOKBACK",
    "FAILURE_OUTCOMES",
    "MARKED_OUTCOMES",
    "MARKED_OUTCOME",
    "PASS_OUTCOME",
    "apply",
    "outcome_class",
    "process_commit",
    "process_uploads",
    "replay",
]

DEFAULT_LOOKBACK = timedelta(days=1)

# test_analytics_flake's integer columns (repoid, the counters)
_INTEGER = (-(2**31), 2**31 - 1)
DEFAULT_EXPIRE_AFTER = 30

# Rule 3: the outcome classes. Comparison is exact (case-sensitive): 'PASS' or
# 'Failure' are "unknown strings" and therefore ignored.
FAILURE_OUTCOMES = frozenset({"failure", "error", "flaky_fail"})
PASS_OUTCOME = "pass"
# Rule 5: only these are rewritten; a flaky_fail run already is one.
MARKED_OUTCOMES = frozenset({"failure", "error"})
MARKED_OUTCOME = "flaky_fail"

# Rule 1: which reports and uploads process_commit takes.
TEST_RESULTS_REPORT = "test_results"
PROCESSED_STATE = "processed"

FAILURE = "failure"
PASS = "pass"


def outcome_class(outcome: str | None) -> str | None:
    """Rule 3: 'failure', 'pass', or None for an outcome the state machine ignores."""
    if outcome in FAILURE_OUTCOMES:
        return FAILURE
    if outcome == PASS_OUTCOME:
        return PASS
    return None


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def process_commit(
    snapshot: Snapshot,
    repo_id: int,
    commit_sha: str,
    *,
    lookback: timedelta = DEFAULT_LOOKBACK,
    expire_after: int = DEFAULT_EXPIRE_AFTER,
    dry_run: bool = False,
) -> Result:
    """`flakectl.process_commit`: process the commit's qualifying uploads (rule 1)."""
    _check_arguments(
        [
            ("repo_id", repo_id),
            ("commit_sha", commit_sha),
            ("lookback", lookback),
            ("expire_after", expire_after),
            ("dry_run", dry_run),
        ],
        lookback,
        expire_after,
    )

    # Rule 1: uploads whose report belongs to the commit (matched by repo and
    # sha, not by commits.id), whose report is a test_results report and whose
    # upload is processed.
    commit_ids = {
        commit.id
        for commit in snapshot.commits
        if commit.repoid == repo_id and commit.commitid == commit_sha
    }
    report_ids = {
        report.id
        for report in snapshot.reports
        if report.commit_id in commit_ids and report.report_type == TEST_RESULTS_REPORT
    }
    qualifying = {
        upload.id
        for upload in snapshot.uploads
        if upload.report_id in report_ids and upload.state == PROCESSED_STATE
    }
    return _process(snapshot, repo_id, qualifying, lookback, expire_after, dry_run)


def process_uploads(
    snapshot: Snapshot,
    repo_id: int,
    upload_ids: Sequence[int | None],
    *,
    lookback: timedelta = DEFAULT_LOOKBACK,
    expire_after: int = DEFAULT_EXPIRE_AFTER,
    dry_run: bool = False,
) -> Result:
    """`flakectl.process_uploads`: process the given upload ids as they are.

    The list is trusted: the reports, commits and uploads tables are not read,
    so an upload of another commit, in any state, or an id no table knows, is
    processed (and recorded in the ledger) like any other. NULLs and
    duplicates are dropped.
    """
    _check_arguments(
        [
            ("repo_id", repo_id),
            ("upload_ids", upload_ids),
            ("lookback", lookback),
            ("expire_after", expire_after),
            ("dry_run", dry_run),
        ],
        lookback,
        expire_after,
    )
    wanted = {upload_id for upload_id in upload_ids if upload_id is not None}
    return _process(snapshot, repo_id, wanted, lookback, expire_after, dry_run)


def apply(snapshot: Snapshot, result: Result | ReplayResult) -> Snapshot:
    """The snapshot after `result`'s writes, as if the call had committed.

    Updated flakes replace the row with their id; new flakes (id None) are
    appended with fresh ids max(existing id) + 1, + 2, ... in result order;
    marked runs get outcome 'flaky_fail'; the ledger gains `ledger_added`.
    `now` is unchanged: advance it with `dataclasses.replace` if a test needs to.
    A `ReplayResult`: see `_apply_replay`.
    """
    if isinstance(result, ReplayResult):
        return _apply_replay(snapshot, result)
    updated = {flake.id: flake for flake in result.flakes if flake.id is not None}
    unknown = set(updated) - {flake.id for flake in snapshot.flakes}
    if unknown:
        raise ValueError(f"result updates flakes not in the snapshot: {sorted(unknown)}")

    kept = [updated.get(flake.id, flake) for flake in snapshot.flakes]
    inserted = [flake for flake in result.flakes if flake.id is None]
    return _written(snapshot, kept, inserted, result.marked, result.ledger_added)


def _written(
    snapshot: Snapshot,
    kept: list[Flake],
    inserted: Iterable[Flake],
    marked: frozenset[int],
    ledger_added: Iterable[int],
    archived: Iterable[Flake] = (),
) -> Snapshot:
    """The snapshot with flakes `kept` plus `inserted` (ids max(every id the
    table and the archive hold) + 1, + 2, ... in order: a sequence never
    reuses one), the `marked` runs flaky_fail, the ledger and the archive grown."""
    used = [f.id for f in snapshot.flakes if f.id is not None] + [a.flake.id for a in snapshot.archive]
    first = max(used, default=0) + 1
    flakes = kept + [replace(flake, id=first + n) for n, flake in enumerate(inserted)]
    testruns = tuple(
        replace(run, outcome=MARKED_OUTCOME) if run.key in marked else run
        for run in snapshot.testruns
    )
    return replace(
        snapshot,
        flakes=tuple(flakes),
        testruns=testruns,
        ledger=snapshot.ledger | frozenset(ledger_added),
        archive=snapshot.archive + tuple(ArchivedFlake(f, snapshot.now) for f in archived),
    )


# --------------------------------------------------------------------------
# Argument checks (rule 10)
# --------------------------------------------------------------------------


def _check_arguments(
    named: Iterable[tuple[str, object]], lookback: timedelta | None, expire_after: int | None
) -> None:
    # NULLs first (22004), in parameter order, then bad values in parameter
    # order: repo_id outside integer (22003), a lookback whose window starts
    # after now() (22023; a timedelta has no months, so that is a negative
    # one), expire_after < 1 (22023).
    named = list(named)
    for name, value in named:
        if value is None:
            raise NullArgument(f"{name} must not be NULL, got NULL")
    repo_id = dict(named)["repo_id"]
    if not _INTEGER[0] <= repo_id <= _INTEGER[1]:
        raise InvalidArgument(f"repo_id must be within integer (the range of test_analytics_flake.repoid),"
                              f" got {repo_id}", sqlstate="22003")
    if lookback < timedelta(0):
        raise InvalidArgument(f"lookback must not be negative, got {lookback}")
    if expire_after < 1:
        raise InvalidArgument(f"expire_after must be at least 1, got {expire_after}")


def _window_start(now: datetime, lookback: timedelta) -> datetime | None:
    """Rule 10: the window's start, or None (no lower bound) when it lies
    before the earliest timestamp. The reference's earliest is datetime's (year
    1), PostgreSQL's is 4713 BC: the same for every run stored at or after
    year 1."""
    try:
        return now - lookback
    except OverflowError:
        return None


# --------------------------------------------------------------------------
# The shared body: rules 2-7
# --------------------------------------------------------------------------


@dataclass
class _Tracked:
    """A flake the call holds as state (or has held): its current values and
    what the call has done to it."""

    flake: Flake
    is_new: bool  # opened by this call
    changed: bool = False  # touched by this call (always True for a new one)


def _process(
    snapshot: Snapshot,
    repo_id: int,
    upload_ids: set[int],
    lookback: timedelta | None,
    expire_after: int,
    dry_run: bool,
) -> Result:
    # Rule 7: uploads already in the ledger are skipped (each counted once;
    # `upload_ids` is a set); the rest are processed in ascending id order.
    skipped = sorted(u for u in upload_ids if u in snapshot.ledger)
    processed = sorted(u for u in upload_ids if u not in snapshot.ledger)
    processed_set = set(processed)
    upload_rank = {upload_id: rank for rank, upload_id in enumerate(processed)}

    # Rule 2: runs of the processed uploads, in the window, of this repo.
    # Runs whose outcome is neither class are dropped here (rule 3): they are
    # neither considered nor marked. lookback None (replay): no window.
    cutoff = None if lookback is None else _window_start(snapshot.now, lookback)
    runs = [
        run
        for run in snapshot.testruns
        if run.upload_id in processed_set
        and run.repo_id == repo_id
        and (cutoff is None or run.timestamp >= cutoff)
        and outcome_class(run.outcome) is not None
    ]

    # Rule 2's order: upload id, then timestamp, then failures before passes
    # (a retry follows the failure it retries). The run key only makes the
    # order total; runs of equal class at an equal timestamp have the same
    # effect in either order.
    def order(run: TestRun) -> tuple[int, datetime, int, int]:
        return (
            upload_rank[run.upload_id],
            run.timestamp,
            0 if outcome_class(run.outcome) == FAILURE else 1,
            run.key,
        )

    runs.sort(key=order)

    # Rule 6: the state is the repo's open flakes; expired rows are history
    # and are never loaded (trap: loading them updates history rows).
    open_flake: dict[bytes, _Tracked] = {}
    for flake in snapshot.flakes:
        if flake.repoid == repo_id and flake.end_date is None:
            if flake.test_id in open_flake:
                raise ValueError(
                    f"snapshot has two open flakes for repo {repo_id}, test {flake.test_id!r}"
                )
            open_flake[flake.test_id] = _Tracked(flake, is_new=False)
    # Every flake that is or was state in this call, in the order it became
    # state: pre-existing ones first, then new ones as they open.
    tracked: list[_Tracked] = list(open_flake.values())

    # The tests that matter (SPEC "Set-wise"): those failing in the call and
    # those holding an open flake before it. A pass of any other test cannot
    # change anything and is not counted as considered.
    failing_tests = {run.test_id for run in runs if outcome_class(run.outcome) == FAILURE}
    tests_that_matter = failing_tests | set(open_flake)

    considered = 0
    marked: set[int] = set()

    # Rule 4: the state machine, run by run.
    for run in runs:
        kind = outcome_class(run.outcome)
        if kind == PASS and run.test_id not in tests_that_matter:
            continue
        considered += 1
        state = open_flake.get(run.test_id)

        if kind == FAILURE:
            # Rule 5: failure and error runs become flaky_fail; a flaky_fail
            # run already is one and is not rewritten.
            if run.outcome in MARKED_OUTCOMES:
                marked.add(run.key)
            if state is None:
                # No open flake (never had one, or it expired earlier, even in
                # this call): open a NEW row. Dates come from the data.
                state = _Tracked(
                    Flake(
                        id=None,
                        repoid=repo_id,
                        test_id=run.test_id,
                        flags_id=None,
                        recent_passes_count=0,
                        count=1,
                        fail_count=1,
                        start_date=run.timestamp,
                        end_date=None,
                    ),
                    is_new=True,
                    changed=True,
                )
                open_flake[run.test_id] = state
                tracked.append(state)
            else:
                state.flake = replace(
                    state.flake,
                    count=state.flake.count + 1,
                    fail_count=state.flake.fail_count + 1,
                    recent_passes_count=0,
                )
                state.changed = True
        else:
            if state is None:
                # No open flake: the pass is considered (its test matters)
                # but changes nothing.
                continue
            flake = replace(
                state.flake,
                count=state.flake.count + 1,
                recent_passes_count=state.flake.recent_passes_count + 1,
            )
            # `>=`, not `==`: a row that starts at or above expire_after
            # expires on its first pass (trap).
            if flake.recent_passes_count >= expire_after:
                flake = replace(flake, end_date=run.timestamp)
                # No longer state: later passes are ignored until a failure
                # opens a new flake.
                del open_flake[run.test_id]
            state.flake = flake
            state.changed = True

    # Rule 4's last point: every field of every touched flake is written,
    # expired ones included (trap: writing only end_date loses count and rpc).
    touched = [t for t in tracked if t.changed]
    # Rule 10: counters computed without overflow (Python ints); a result that
    # does not fit its integer column fails the call, naming the flake.
    for t in touched:
        values = (t.flake.count, t.flake.fail_count, t.flake.recent_passes_count)
        if not all(_INTEGER[0] <= v <= _INTEGER[1] for v in values):
            who = "a new flake" if t.flake.id is None else f"flake {t.flake.id}"
            raise FlakectlError(
                f"flakectl: a counter of {who} (test \\x{t.flake.test_id.hex()}): count {values[0]},"
                f" fail_count {values[1]}, recent_passes_count {values[2]} does not fit integer;"
                " nothing was changed", sqlstate="22003")
    summary = Summary(
        uploads_processed=len(processed),
        uploads_skipped=len(skipped),
        testruns_considered=considered,
        flakes_created=sum(1 for t in touched if t.is_new),
        flakes_updated=sum(1 for t in touched if not t.is_new),
        # Every tracked flake was open when it became state, so a set end_date
        # means it expired in this call.
        flakes_expired=sum(1 for t in touched if t.flake.end_date is not None),
        testruns_marked=len(marked),
    )
    if dry_run:
        return Result(summary=summary)

    # Deterministic order: by test id, then the order each flake became state
    # (the pre-existing one, then new ones as opened). sort() is stable.
    touched.sort(key=lambda t: t.flake.test_id)
    return Result(
        summary=summary,
        flakes=tuple(t.flake for t in touched),
        marked=frozenset(marked),
        ledger_added=tuple(processed),
    )


# --------------------------------------------------------------------------
# Rule 11: replay
# --------------------------------------------------------------------------



def _compared(flake: Flake) -> tuple:
    """What makes a live row and a replayed row identical (rule 11): flags_id
    and id are not compared; two NULL end_dates are equal (None == None)."""
    return (flake.test_id, flake.count, flake.fail_count, flake.recent_passes_count,
            flake.start_date, flake.end_date)


def replay(
    snapshot: Snapshot,
    repo_id: int,
    upload_ids: Sequence[int | None],
    *,
    expire_after: int = DEFAULT_EXPIRE_AFTER,
    dry_run: bool = True,
) -> ReplayResult:
    """`flakectl.replay`: recompute the repository's flakes from the runs of
    the given uploads, compare them with the live rows they determine, and
    (dry_run False) replace the live rows that differ.

    The plain way, step by step as rule 11 reads:
      R: rules 2-4 and 6 from an empty state (no flake of the repo, empty
         ledger, no lookback), by the same state machine as process_*;
      T0: the earliest timestamp of the repo's runs of any outcome in the uploads;
      L: the repo's rows with start_date >= T0, plus its open rows of a test
         with a row in R (none when the uploads hold no run of the repo);
      pairs: identical rows matched one to one. Which of several identical
         live rows is paired is unspecified by the SPEC; flakectl (the SQL and
         this reference alike) pairs the lowest ids first.
    """
    # rule 10 as for the other entry points (no lookback: a zero one passes)
    _check_arguments(
        [("repo_id", repo_id), ("upload_ids", upload_ids), ("expire_after", expire_after),
         ("dry_run", dry_run)],
        timedelta(0),
        expire_after,
    )

    uploads = sorted({u for u in upload_ids if u is not None})
    wanted = set(uploads)

    # R: the shared state machine from an empty state: the repo's flakes and
    # the ledger removed, no lookback. Its result rows are all new (id None).
    empty = replace(
        snapshot,
        flakes=tuple(f for f in snapshot.flakes if f.repoid != repo_id),
        ledger=frozenset(),
    )
    computed = _process(empty, repo_id, wanted, None, expire_after, dry_run=False)
    replayed = computed.flakes  # sorted by test id, then opening order

    # T0 and L.
    stamps = [r.timestamp for r in snapshot.testruns
              if r.upload_id in wanted and r.repo_id == repo_id]
    if stamps:
        t0 = min(stamps)
        replayed_tests = {f.test_id for f in replayed}
        live = tuple(
            f for f in snapshot.flakes
            if f.repoid == repo_id
            and (f.start_date >= t0 or (f.end_date is None and f.test_id in replayed_tests))
        )
    else:
        live = ()
    live = tuple(sorted(live, key=lambda f: f.id))

    # Pairing, one to one: each replayed row takes the lowest-id identical
    # live row still free.
    free: dict[tuple, list[Flake]] = {}
    for f in live:
        free.setdefault(_compared(f), []).append(f)
    inserted = []
    for f in replayed:
        candidates = free.get(_compared(f))
        if candidates:
            candidates.pop(0)
        else:
            inserted.append(f)
    archived = tuple(sorted((f for rows in free.values() for f in rows), key=lambda f: f.id))
    identical = len(replayed) - len(inserted)

    summary = ReplaySummary(
        uploads_replayed=len(uploads),
        testruns_considered=computed.summary.testruns_considered,
        flakes_live=len(live),
        flakes_replayed=len(replayed),
        flakes_identical=identical,
        flakes_archived=len(archived),
        flakes_inserted=len(inserted),
        testruns_marked=computed.summary.testruns_marked,
    )
    if dry_run:
        return ReplayResult(summary=summary, live=live, replayed=replayed)
    return ReplayResult(
        summary=summary,
        live=live,
        replayed=replayed,
        archived=archived,
        # insert order: by test id, then start date (the order R is in)
        inserted=tuple(inserted),
        marked=computed.marked,
        ledger_added=tuple(u for u in uploads if u not in snapshot.ledger),
    )


def _apply_replay(snapshot: Snapshot, result: ReplayResult) -> Snapshot:
    """A replay's writes: archived rows move to the archive (archived_at =
    snapshot.now) and leave the flakes; inserted rows get new ids in result
    order; marked runs become flaky_fail; the ledger gains ledger_added."""
    gone = {f.id for f in result.archived}
    unknown = gone - {f.id for f in snapshot.flakes}
    if unknown:
        raise ValueError(f"replay archives flakes not in the snapshot: {sorted(unknown)}")
    kept = [f for f in snapshot.flakes if f.id not in gone]
    return _written(snapshot, kept, result.inserted, result.marked, result.ledger_added, result.archived)
