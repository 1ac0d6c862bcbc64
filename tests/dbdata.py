"""Write `Snapshot` rows into the Codecov tables, and compare database state
with what the reference says it should be."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import psycopg

from flakectl.dba import snapshot as snap
from flakectl.model import Flake, Snapshot


def insert(conn: psycopg.Connection, s: Snapshot) -> None:
    """Insert every row of `s` (ids as given; the ledger too)."""
    with conn.cursor() as cur:
        cur.executemany(
            "insert into commits (id, commitid, repoid, branch, merged, timestamp)"
            " values (%s, %s, %s, %s, %s, %s)",
            [(c.id, c.commitid, c.repoid, c.branch, c.merged, c.timestamp) for c in s.commits],
        )
        cur.executemany(
            "insert into reports_commitreport (id, commit_id, code, report_type) values (%s, %s, %s, %s)",
            [(r.id, r.commit_id, r.code, r.report_type) for r in s.reports],
        )
        cur.executemany(
            "insert into reports_upload (id, report_id, state, created_at)"
            " values (%s, %s, %s, coalesce(%s, now()))",
            [(u.id, u.report_id, u.state, u.created_at) for u in s.uploads],
        )
        if s.testruns:
            with cur.copy(
                "copy ta_timeseries_testrun (timestamp, test_id, outcome, repo_id, upload_id, commit_sha)"
                " from stdin"
            ) as copy:
                for r in s.testruns:
                    copy.write_row((r.timestamp, r.test_id, r.outcome, r.repo_id, r.upload_id, r.commit_sha))
        cur.executemany(
            "insert into test_analytics_flake"
            " (id, repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)"
            " values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(f.id, f.repoid, f.test_id, f.flags_id, f.recent_passes_count, f.count, f.fail_count,
              f.start_date, f.end_date) for f in s.flakes],
        )
        cur.executemany(
            "insert into flakectl.processed_upload (upload_id, repo_id) values (%s, 0)",
            [(u,) for u in sorted(s.ledger)],
        )


def all_flakes(conn: psycopg.Connection) -> list[Flake]:
    repos = [r for (r,) in conn.execute("select distinct repoid from test_analytics_flake")]
    return [f for repo in sorted(repos) for f in snap.read_flakes(conn, repo)]


def all_runs(conn: psycopg.Connection) -> Counter:
    rows = conn.execute(
        "select upload_id, test_id, timestamp, repo_id, outcome from ta_timeseries_testrun"
    ).fetchall()
    return Counter((u, bytes(t), ts, repo, o) for u, t, ts, repo, o in rows)


def ledger(conn: psycopg.Connection) -> frozenset[int]:
    return frozenset(u for (u,) in conn.execute("select upload_id from flakectl.processed_upload"))


def flake_state(flakes: list[Flake], known_ids: set[int]) -> tuple[dict, Counter]:
    """Flakes that existed before, by id; flakes created since, as a multiset
    without their (sequence-assigned) ids."""
    old = {f.id: f for f in flakes if f.id in known_ids}
    new = Counter(replace(f, id=None) for f in flakes if f.id not in known_ids)
    return old, new


def assert_state(conn: psycopg.Connection, expected: Snapshot, known_ids: set[int]) -> None:
    """The database holds exactly `expected`'s flakes, run outcomes and ledger."""
    got_old, got_new = flake_state(all_flakes(conn), known_ids)
    want_old, want_new = flake_state(list(expected.flakes), known_ids)
    assert got_old == want_old
    assert got_new == want_new
    assert all_runs(conn) == snap.run_outcomes(expected.testruns)
    assert ledger(conn) == expected.ledger
