"""Path B of the benchmark: the worker's flake processing as upstream does it today.

Codecov's worker (`apps/worker/services/test_analytics/ta_process_flakes.py`)
fetches the commit's uploads and the repository's flakes, then for each
upload fetches every run of that upload, walks them in Python and rewrites
the upload's failures with one targeted UPDATE, and finally upserts the
flakes in one statement. This module does the same with psycopg, with the
reference's state machine (flakectl.reference, SPEC rule 4: open flakes only
as state, `>=` expiry, dates from the data, every field persisted), so its
final state must equal the function's: the benchmark checks that.

It runs in the caller's transaction and does not touch the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from flakectl.reference import FAILURE_OUTCOMES, PASS_OUTCOME

_UPLOADS = """
select u.id
  from commits c
  join reports_commitreport r on r.commit_id = c.id
  join reports_upload u on u.report_id = r.id
 where c.repoid = %(repo)s and c.commitid = %(sha)s
   and r.report_type = 'test_results' and u.state = 'processed'
 order by u.id
"""
_CUTOFF = "select (now() at time zone 'UTC' - %(lookback)s::interval) at time zone 'UTC'"
_FLAKES = """
select id, test_id, count, fail_count, recent_passes_count, start_date, end_date
  from test_analytics_flake where repoid = %(repo)s
"""
# SPEC rule 2's order inside an upload: timestamp, then failure-class before passes
_RUNS = """
select test_id, outcome, timestamp
  from ta_timeseries_testrun
 where upload_id = %(upload)s and repo_id = %(repo)s and timestamp >= %(cutoff)s
 order by timestamp, outcome = 'pass'
"""
_MARK = """
update ta_timeseries_testrun set outcome = 'flaky_fail'
 where upload_id = %(upload)s and outcome in ('failure', 'error')
   and repo_id = %(repo)s and timestamp >= %(cutoff)s
"""
_UPSERT = """
insert into test_analytics_flake
  (id, repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
select coalesce(c.id, nextval(pg_get_serial_sequence('test_analytics_flake', 'id'))), %(repo)s,
       c.test_id, null, c.rpc, c.count, c.fail_count, c.start_date, c.end_date
  from unnest(%(ids)s::bigint[], %(test_ids)s::bytea[], %(rpc)s::int[], %(count)s::int[],
              %(fail_count)s::int[], %(start_date)s::timestamptz[], %(end_date)s::timestamptz[])
       with ordinality as c(id, test_id, rpc, count, fail_count, start_date, end_date, n)
 order by c.id is null, c.n  -- expire old rows before a test's new one opens
on conflict (id) do update
   set recent_passes_count = excluded.recent_passes_count, count = excluded.count,
       fail_count = excluded.fail_count, end_date = excluded.end_date
"""


@dataclass
class _Flake:
    id: int | None
    test_id: bytes
    count: int
    fail_count: int
    rpc: int
    start_date: datetime
    end_date: datetime | None = None


@dataclass
class WorkerResult:
    uploads: int = 0
    rows_fetched: int = 0
    flakes_created: int = 0
    flakes_updated: int = 0
    flakes_expired: int = 0
    testruns_marked: int = 0
    flakes: list[_Flake] = field(default_factory=list, repr=False)


def process_commit(conn: psycopg.Connection, repo_id: int, commit_sha: str, *,
                   lookback: str = "1 day", expire_after: int = 30) -> WorkerResult:
    """Process the commit the worker's way, in the caller's transaction."""
    p = {"repo": repo_id, "sha": commit_sha, "lookback": lookback}
    result = WorkerResult()
    with conn.cursor() as cur:
        uploads = [u for (u,) in cur.execute(_UPLOADS, p).fetchall()]
        (p["cutoff"],) = cur.execute(_CUTOFF, p).fetchone()
        state: dict[bytes, _Flake] = {}
        for fid, test_id, count, fail_count, rpc, start, end in cur.execute(_FLAKES, p).fetchall():
            if end is None:  # expired rows are history, never state
                state[bytes(test_id)] = _Flake(fid, bytes(test_id), count, fail_count, rpc, start)
        touched: dict[int, _Flake] = {}  # by id(); insertion order
        for upload in uploads:
            p["upload"] = upload
            rows = cur.execute(_RUNS, p).fetchall()
            result.rows_fetched += len(rows)
            for test_id, outcome, ts in rows:
                if outcome in FAILURE_OUTCOMES:
                    test_id = bytes(test_id)
                    flake = state.get(test_id)
                    if flake is None:
                        flake = state[test_id] = _Flake(None, test_id, 1, 1, 0, ts)
                    else:
                        flake.count += 1
                        flake.fail_count += 1
                        flake.rpc = 0
                    touched[id(flake)] = flake
                elif outcome == PASS_OUTCOME:
                    flake = state.get(bytes(test_id))
                    if flake is None:
                        continue
                    flake.count += 1
                    flake.rpc += 1
                    if flake.rpc >= expire_after:
                        flake.end_date = ts
                        del state[flake.test_id]
                    touched[id(flake)] = flake
            cur.execute(_MARK, p)
            result.testruns_marked += cur.rowcount
        flakes = list(touched.values())
        if flakes:
            cur.execute(_UPSERT, {
                "repo": repo_id,
                "ids": [f.id for f in flakes], "test_ids": [f.test_id for f in flakes],
                "rpc": [f.rpc for f in flakes], "count": [f.count for f in flakes],
                "fail_count": [f.fail_count for f in flakes],
                "start_date": [f.start_date for f in flakes], "end_date": [f.end_date for f in flakes],
            })
    result.uploads = len(uploads)
    result.flakes = flakes
    result.flakes_created = sum(1 for f in flakes if f.id is None)
    result.flakes_updated = len(flakes) - result.flakes_created
    result.flakes_expired = sum(1 for f in flakes if f.end_date is not None)
    return result


__all__ = ["WorkerResult", "process_commit"]
