"""Small builders for hand-written database tests: a repository's commits,
uploads, runs and flakes, with timestamps relative to one base time."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import psycopg

from flakectl.model import Flake
from flakectl.dba.snapshot import read_flakes

_ids = itertools.count(1)
BASE = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=6)


def at(minutes: float) -> datetime:
    """A timestamp `minutes` after the base (six hours ago, inside the window)."""
    return BASE + timedelta(minutes=minutes)


class Repo:
    def __init__(self, conn: psycopg.Connection, repo_id: int = 1):
        self.conn = conn
        self.id = repo_id

    def commit(self, sha: str) -> int:
        (cid,) = self.conn.execute(
            "insert into commits (commitid, repoid) values (%s, %s) returning id", (sha, self.id)
        ).fetchone()
        return cid

    def upload(self, sha: str, *, state: str = "processed", report_type: str | None = "test_results",
               upload_id: int | None = None) -> int:
        row = self.conn.execute(
            "select id from commits where repoid = %s and commitid = %s", (self.id, sha)
        ).fetchone()
        cid = row[0] if row else self.commit(sha)
        (rid,) = self.conn.execute(
            "insert into reports_commitreport (commit_id, report_type) values (%s, %s) returning id",
            (cid, report_type),
        ).fetchone()
        uid = upload_id if upload_id is not None else 1000 * self.id + next(_ids)
        self.conn.execute(
            "insert into reports_upload (id, report_id, state) values (%s, %s, %s)", (uid, rid, state)
        )
        return uid

    def runs(self, upload_id: int, *runs: tuple[str, str, datetime], repo_id: int | None = None) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(
                "insert into ta_timeseries_testrun (timestamp, test_id, outcome, repo_id, upload_id)"
                " values (%s, %s, %s, %s, %s)",
                [(ts, test.encode(), outcome, repo_id or self.id, upload_id) for test, outcome, ts in runs],
            )

    def flake(self, test: str, *, rpc: int = 0, count: int = 1, fail_count: int = 1,
              start: datetime | None = None, end: datetime | None = None,
              flags_id: bytes | None = None) -> int:
        (fid,) = self.conn.execute(
            "insert into test_analytics_flake (repoid, test_id, flags_id, recent_passes_count, count,"
            " fail_count, start_date, end_date) values (%s, %s, %s, %s, %s, %s, %s, %s) returning id",
            (self.id, test.encode(), flags_id, rpc, count, fail_count, start or at(-600), end),
        ).fetchone()
        return fid

    def flakes(self) -> list[Flake]:
        return read_flakes(self.conn, self.id)

    def outcomes(self, upload_id: int) -> list[tuple[str, str]]:
        rows = self.conn.execute(
            "select test_id, outcome from ta_timeseries_testrun where upload_id = %s"
            " order by test_id, timestamp, outcome", (upload_id,)
        ).fetchall()
        return [(bytes(t).decode(), o) for t, o in rows]
