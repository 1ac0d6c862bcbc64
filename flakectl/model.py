"""Data classes shared by the SQL wrapper, the reference and the tests.

They hold rows of the Codecov tables (only the columns flakectl uses) and the
summary row both entry points return. No behaviour lives here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone


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


class OutOfRange(datetime):
    """A timestamptz Python's datetime cannot hold: `infinity`, `-infinity`, or
    a finite value after year 9999 or before year 1 (PostgreSQL allows 4713 BC
    to 294276 AD). CI data can carry one (a run stamped `infinity`), and the
    function accepts it: a flake may start or end there.

    It orders beyond every datetime (infinity beyond any finite value), compares
    and hashes by the instant it stands for, and shows as PostgreSQL writes it
    (`isoformat()`, `str()`, any format spec): `infinity`, or the server's text.
    As a datetime it is datetime.max (datetime.min before year 1), in UTC.
    """

    _key: tuple
    text: str

    def __new__(cls, text: str) -> OutOfRange:
        key = _instant(text)
        base = datetime.max if key[0] > 0 else datetime.min
        self = super().__new__(cls, *base.timetuple()[:6], base.microsecond, tzinfo=timezone.utc)
        self._key, self.text = key, text
        return self

    def __reduce_ex__(self, protocol: object):  # noqa: ANN204 - copy and pickle rebuild from the text
        return (OutOfRange, (self.text,))

    def _cmp_key(self, other: object) -> tuple | None:
        if isinstance(other, OutOfRange):
            return other._key
        if isinstance(other, datetime):
            return (0, 0)
        return None

    def __eq__(self, other: object) -> bool:
        key = self._cmp_key(other)
        return NotImplemented if key is None else self._key == key

    def __ne__(self, other: object) -> bool:
        key = self._cmp_key(other)
        return NotImplemented if key is None else self._key != key

    def __lt__(self, other: object) -> bool:
        key = self._cmp_key(other)
        return NotImplemented if key is None else self._key < key

    def __le__(self, other: object) -> bool:
        key = self._cmp_key(other)
        return NotImplemented if key is None else self._key <= key

    def __gt__(self, other: object) -> bool:
        key = self._cmp_key(other)
        return NotImplemented if key is None else self._key > key

    def __ge__(self, other: object) -> bool:
        key = self._cmp_key(other)
        return NotImplemented if key is None else self._key >= key

    def __hash__(self) -> int:
        return hash(self._key)

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:  # noqa: ARG002
        return self.text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"OutOfRange({self.text!r})"

    def __format__(self, spec: str) -> str:
        return self.text


_PG_TIMESTAMPTZ = re.compile(
    r"(\d+)-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"(?:([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?)?( BC)?"
)


def _instant(text: str) -> tuple:
    """A sort key: (+1/-1, the instant in UTC microseconds from 1970; or
    +-inf for infinity). Finite ones are (sign, microseconds) with sign +1 after
    year 9999 and -1 before year 1, so they sort between datetimes and infinity."""
    if text == "infinity":
        return (1, math.inf)
    if text == "-infinity":
        return (-1, -math.inf)
    match = _PG_TIMESTAMPTZ.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a PostgreSQL timestamptz in ISO style: {text!r}")
    y, mo, d, h, mi, s, frac, sign, oh, om, os_, bc = match.groups()
    year = 1 - int(y) if bc else int(y)  # 1 BC is year 0
    offset = (int(oh or 0) * 3600 + int(om or 0) * 60 + int(os_ or 0)) * (-1 if sign == "-" else 1)
    seconds = _days_from_civil(year, int(mo), int(d)) * 86400 + int(h) * 3600 + int(mi) * 60 + int(s)
    micros = (seconds - offset) * 1_000_000 + int((frac or "0").ljust(6, "0"))
    return (1 if year > 9999 else -1, micros)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, any year (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


INFINITY = OutOfRange("infinity")
MINUS_INFINITY = OutOfRange("-infinity")
