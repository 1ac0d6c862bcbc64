"""Read the rows a call can see into a `Snapshot`, and the state a call leaves.

Used by `flakectl verify` (reference vs. function on real data, inside a
rolled-back transaction) and by the tests. Run it in the same transaction as
the call it is compared with, after taking the repository's lock, so both see
the same rows and the same now().
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace

import psycopg
from psycopg.adapt import Dumper
from psycopg.rows import class_row
from psycopg.types.datetime import TimestamptzBinaryLoader, TimestamptzLoader

from flakectl.model import Commit, CommitReport, Flake, OutOfRange, Snapshot, TestRun, Upload

FLAKE_COLUMNS = (
    "id, repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date"
)


class _TimestamptzLoader(TimestamptzLoader):
    """timestamptz as datetime, and as OutOfRange what datetime cannot hold
    (infinity, after year 9999): psycopg's own loader raises DataError there."""

    def load(self, data):  # noqa: ANN001, ANN201 - psycopg's signature
        try:
            return super().load(data)
        except psycopg.DataError:
            return OutOfRange(bytes(data).decode())


class _TimestamptzBinaryLoader(TimestamptzBinaryLoader):
    """Binary results (a `binary=True` cursor) are read as text for the out-of-range ones."""

    def load(self, data):  # noqa: ANN001, ANN201
        try:
            return super().load(data)
        except psycopg.DataError:
            micros = int.from_bytes(bytes(data), "big", signed=True)
            if micros in (2**63 - 1, -(2**63)):
                return OutOfRange("infinity" if micros > 0 else "-infinity")
            raise


class _OutOfRangeDumper(Dumper):
    """An OutOfRange goes back as the text it came as."""

    oid = psycopg.adapters.types["timestamptz"].oid

    def dump(self, obj: OutOfRange) -> bytes:
        return obj.text.encode()


def register_timestamps(context: psycopg.Connection | psycopg.Cursor) -> None:
    """Read every timestamptz on `context`, infinity and years past 9999 included
    (flakectl.model.OutOfRange); the CLI's connections have it, and every reader
    here registers it on the connection it is given."""
    context.adapters.register_loader("timestamptz", _TimestamptzLoader)
    context.adapters.register_loader("timestamptz", _TimestamptzBinaryLoader)
    context.adapters.register_dumper(OutOfRange, _OutOfRangeDumper)


def use_codecov_schema(conn: psycopg.Connection) -> str:
    """Put the Codecov schema the install recorded (`--codecov-schema`, default
    public) first on the search_path, for the current transaction only, so the
    readers' unqualified table names reach the tables the functions use; the
    schema's name."""
    from flakectl.dba.migrate import codecov_schema  # Alembic: only for the commands that read

    schema = codecov_schema(conn)
    conn.execute("select set_config('search_path', quote_ident(%s) || ', ' || current_setting('search_path'),"
                 " true)", (schema,))
    return schema


def _rows(conn: psycopg.Connection, cls: type, query: str, params: Sequence | dict = ()) -> list:
    with conn.cursor(row_factory=class_row(cls)) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def read_snapshot(
    conn: psycopg.Connection,
    repo_id: int,
    *,
    commit_sha: str | None = None,
    upload_ids: Iterable[int | None] | None = None,
    bounded: bool = False,
) -> Snapshot:
    """The rows `process_commit(repo_id, commit_sha)` (or `process_uploads`)
    can read: the commit's commits/reports/uploads rows, the runs of the
    candidate uploads, the repository's flakes and the ledger rows of those
    uploads. With neither commit_sha nor upload_ids: all rows of the repo.

    `bounded`: only what the reference needs (`read_scope_runs`): the
    candidates' failure-class runs, the passes of the tests that matter, and
    the repository's open flakes; not every run of a 1M-run commit."""
    register_timestamps(conn)
    if commit_sha is not None:
        commits = _rows(conn, Commit,
                        "select id, commitid, repoid, branch, merged, timestamp from commits"
                        " where repoid = %s and commitid = %s order by id", (repo_id, commit_sha))
    elif upload_ids is None:
        commits = _rows(conn, Commit,
                        "select id, commitid, repoid, branch, merged, timestamp from commits"
                        " where repoid = %s order by id", (repo_id,))
    else:
        commits = []
    commit_ids = [c.id for c in commits]
    reports = _rows(conn, CommitReport,
                    "select id, commit_id, code, report_type from reports_commitreport"
                    " where commit_id = any(%s) order by id", (commit_ids,))
    uploads = _rows(conn, Upload,
                    "select id, report_id, state, created_at from reports_upload"
                    " where report_id = any(%s) order by id", ([r.id for r in reports],))
    candidates = sorted({u for u in upload_ids if u is not None}) if upload_ids is not None else []
    candidates = sorted(set(candidates) | {u.id for u in uploads})
    flakes = read_flakes(conn, repo_id, open_only=bounded)
    if bounded:
        testruns, _ = read_scope_runs(conn, repo_id, candidates, {f.test_id for f in flakes})
    else:
        testruns = _runs(conn, "select timestamp, test_id, outcome, repo_id, upload_id, commit_sha"
                               "  from ta_timeseries_testrun where upload_id = any(%s)"
                               " order by upload_id, timestamp, test_id, outcome", (candidates,))
    with conn.cursor() as cur:
        cur.execute(
            "select upload_id from flakectl.processed_upload where upload_id = any(%s)",
            (candidates,),
        )
        ledger = frozenset(row[0] for row in cur.fetchall())
        cur.execute("select now()")
        (now,) = cur.fetchone()
    return Snapshot(
        now=now,
        commits=tuple(commits),
        reports=tuple(reports),
        uploads=tuple(uploads),
        testruns=tuple(testruns),
        flakes=tuple(flakes),
        ledger=ledger,
    )


def read_scope_runs(
    conn: psycopg.Connection, repo_id: int, uploads: Sequence[int], open_tests: Iterable[bytes],
    tests: Sequence[bytes] | None = None,
) -> tuple[list[TestRun], list[bytes]]:
    """The runs of `uploads` a call's result depends on, and the tests that
    matter: every failure-class run (any repository, any time: the reference
    filters), and the passes of this repository of the tests that fail in them
    or hold an open flake (`open_tests`), each test's read by one descent of
    the (repo_id, test_id, timestamp) index. Passes of other tests cannot change
    the result (SPEC "Set-wise"), so memory grows with the failures, not with
    the commit. `tests` given (the list a first read returned): read the
    passes of exactly those, to compare the same rows after a call."""
    from flakectl.reference import FAILURE_OUTCOMES, PASS_OUTCOME

    register_timestamps(conn)
    failures = _runs(conn, "select timestamp, test_id, outcome, repo_id, upload_id, commit_sha"
                           "  from ta_timeseries_testrun where upload_id = any(%s) and outcome = any(%s)",
                     (list(uploads), sorted(FAILURE_OUTCOMES)))
    if tests is None:
        tests = sorted({r.test_id for r in failures} | set(open_tests))
    passes = _runs(conn, """
        select r.timestamp, r.test_id, r.outcome, r.repo_id, r.upload_id, r.commit_sha
          from unnest(%(tests)s::bytea[]) as t(test_id)
          cross join lateral (
            select * from ta_timeseries_testrun r
             where r.repo_id = %(repo)s and r.test_id = t.test_id
               and r.upload_id = any(%(uploads)s) and r.outcome = %(pass)s
            offset 0) r""", {"tests": list(tests), "repo": repo_id, "uploads": list(uploads),
                             "pass": PASS_OUTCOME})
    runs = sorted(failures + passes, key=lambda r: (r.upload_id, r.timestamp, r.test_id, r.outcome))
    return [replace(r, key=key) for key, r in enumerate(runs)], list(tests)


def _runs(conn: psycopg.Connection, query: str, params: Sequence | dict) -> list[TestRun]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return [TestRun(key, ts, bytes(test_id), outcome, repo, upload, sha)
                for key, (ts, test_id, outcome, repo, upload, sha) in enumerate(cur)]


def read_flakes(conn: psycopg.Connection, repo_id: int, *, open_only: bool = False) -> list[Flake]:
    register_timestamps(conn)
    flakes = _rows(conn, Flake,
                   f"select {FLAKE_COLUMNS} from test_analytics_flake where repoid = %s"
                   f"{' and end_date is null' if open_only else ''} order by id",
                   (repo_id,))
    return [flake_with_bytes(f) for f in flakes]


def flake_with_bytes(flake: Flake) -> Flake:
    # psycopg returns bytea as bytes already; memoryview appears with some loaders
    return replace(
        flake,
        test_id=bytes(flake.test_id),
        flags_id=None if flake.flags_id is None else bytes(flake.flags_id),
    )


def run_outcomes(runs: Iterable[TestRun]) -> Counter:
    """Runs as a multiset of (upload_id, test_id, timestamp, repo_id, outcome):
    the table has no key, so runs are compared by content."""
    return Counter((r.upload_id, r.test_id, r.timestamp, r.repo_id, r.outcome) for r in runs)
