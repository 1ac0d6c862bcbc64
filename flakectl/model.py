"""Data classes shared by the SQL wrapper, the reference and the tests.

They hold rows of the Codecov tables (only the columns flakectl uses) and the
summary row both entry points return. No behaviour lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime


@dataclass(frozen=True)
class Summary:
    """The one row `process_commit` / `process_uploads` return (SPEC counters)."""

    uploads_processed: int = 0
    uploads_skipped: int = 0
    testruns_considered: int = 0
    flakes_created: int = 0
    flakes_updated: int = 0
    flakes_expired: int = 0
    testruns_marked: int = 0

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class ReplaySummary:
    """The one row `replay` returns (SPEC rule 11)."""

    uploads_replayed: int = 0
    testruns_considered: int = 0
    flakes_live: int = 0
    flakes_replayed: int = 0
    flakes_identical: int = 0
    flakes_archived: int = 0
    flakes_inserted: int = 0
    testruns_marked: int = 0

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Commit:
    id: int
    commitid: str
    repoid: int
    branch: str | None = "main"
    merged: bool | None = True
    timestamp: datetime | None = None


@dataclass(frozen=True)
class CommitReport:
    id: int
    commit_id: int
    code: str | None = None
    report_type: str | None = "test_results"


@dataclass(frozen=True)
class Upload:
    id: int
    report_id: int
    state: str = "processed"
    created_at: datetime | None = None


@dataclass(frozen=True)
class TestRun:
    """One row of ta_timeseries_testrun. `key` names the row inside a snapshot
    (the table has no primary key); it is not a column."""

    __test__ = False  # not a pytest test class

    key: int
    timestamp: datetime
    test_id: bytes
    outcome: str | None
    repo_id: int
    upload_id: int | None
    commit_sha: str | None = None


@dataclass(frozen=True)
class Flake:
    """One row of test_analytics_flake; `id` is None for a flake not yet inserted."""

    id: int | None
    repoid: int
    test_id: bytes
    flags_id: bytes | None
    recent_passes_count: int
    count: int
    fail_count: int
    start_date: datetime
    end_date: datetime | None = None

    @property
    def is_open(self) -> bool:
        return self.end_date is None


@dataclass(frozen=True)
class ArchivedFlake:
    """One row of flakectl.flake_archive: a flake row as replay removed it."""

    flake: Flake
    archived_at: datetime


@dataclass(frozen=True)
class Snapshot:
    """Every row a call may read, as of the moment the call takes its lock."""

    now: datetime
    commits: tuple[Commit, ...] = ()
    reports: tuple[CommitReport, ...] = ()
    uploads: tuple[Upload, ...] = ()
    testruns: tuple[TestRun, ...] = ()
    flakes: tuple[Flake, ...] = ()
    ledger: frozenset[int] = frozenset()
    archive: tuple[ArchivedFlake, ...] = ()


@dataclass(frozen=True)
class Result:
    """What one call decides: the summary and the writes it makes.

    `flakes` holds every flake row the call writes, in its final state:
    updated rows keep their id, new rows have id None. `marked` holds the keys
    of the runs turned into flaky_fail; `ledger_added` the upload ids recorded.
    A dry run has the summary and no writes.
    """

    summary: Summary
    flakes: tuple[Flake, ...] = ()
    marked: frozenset[int] = frozenset()
    ledger_added: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class ReplayResult:
    """What one `replay` decides (SPEC rule 11).

    `live` is L (the compared live rows, by id) and `replayed` is R (id None),
    whatever dry_run says: they are the comparison a dry run shows. The
    writes: `archived` (rows of L without a pair, archived then deleted),
    `inserted` (rows of R without a pair, flags_id NULL, in insert order),
    `marked` (keys of the runs turned into flaky_fail) and `ledger_added`;
    a dry run has none of them.
    """

    summary: ReplaySummary
    live: tuple[Flake, ...] = ()
    replayed: tuple[Flake, ...] = ()
    archived: tuple[Flake, ...] = ()
    inserted: tuple[Flake, ...] = ()
    marked: frozenset[int] = frozenset()
    ledger_added: tuple[int, ...] = field(default=())
