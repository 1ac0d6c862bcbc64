"""The function, unchanged, on a ta_timeseries_testrun range-partitioned by
timestamp (daily, like TimescaleDB chunks): same results as the reference,
and only the partitions inside the window are read."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from flakectl import api, reference
from flakectl.lab.plans import nested_plans
from flakectl.dba.snapshot import read_snapshot, run_outcomes

from builders import Repo
from dbdata import all_flakes, all_runs, flake_state, ledger

DAYS_BACK, DAYS_AHEAD = 10, 2
PARTITION = re.compile(r"^ta_timeseries_testrun_p(\d{8})$")


def partition_by_day(conn: psycopg.Connection) -> datetime:
    """Replace the (empty) testrun table by one partitioned by day, with the same
    columns and indexes; the UTC midnight starting today's partition."""
    indexes = [d for (d,) in conn.execute(
        "select pg_get_indexdef(indexrelid) from pg_index"
        " where indrelid = 'public.ta_timeseries_testrun'::regclass")]
    assert len(indexes) == 3
    conn.execute("alter table ta_timeseries_testrun rename to ta_timeseries_testrun_old")
    conn.execute("create table ta_timeseries_testrun (like ta_timeseries_testrun_old"
                 " including defaults including constraints) partition by range (timestamp)")
    conn.execute("drop table ta_timeseries_testrun_old")
    for definition in indexes:
        conn.execute(definition)
    (today,) = conn.execute("select date_trunc('day', now() at time zone 'UTC')").fetchone()
    today = today.replace(tzinfo=timezone.utc)
    for offset in range(-DAYS_BACK, DAYS_AHEAD + 1):
        start = today + timedelta(days=offset)
        conn.execute(
            f"create table ta_timeseries_testrun_p{start:%Y%m%d} partition of ta_timeseries_testrun"
            f" for values from ('{start.isoformat()}') to ('{(start + timedelta(days=1)).isoformat()}')")
    conn.commit()
    return today


def populate(repo: Repo, now: datetime) -> list[str]:
    """A commit whose uploads have runs in the window and (re-sent) runs days
    older, flakes open and expired, and older commits spread over every day."""
    tests = [f"t{i:02d}" for i in range(12)]
    recent = now - timedelta(hours=2)
    for i, test in enumerate(tests[:4]):
        repo.flake(test, rpc=27 + i, count=30 + i, fail_count=3)
    repo.flake("t05", rpc=30, count=40, fail_count=10, end=now - timedelta(days=4))
    uploads = [repo.upload("sha1") for _ in range(3)]
    for u, upload in enumerate(uploads):
        ts = recent + timedelta(minutes=u)
        runs = [(t, "pass", ts) for t in tests]
        runs += [("t05", "failure", ts), ("t06", "error" if u else "failure", ts)]
        runs += [("t07", "flaky_fail", ts), ("t08", "skip", ts)]
        if u == 1:
            runs += [("t00", "failure", ts), ("t09", "failure", ts)]
        repo.runs(upload, *runs)
        # older runs of the same upload, outside the window: neither considered nor marked
        repo.runs(upload, ("t10", "failure", now - timedelta(days=3)), ("t00", "pass", now - timedelta(days=5)))
    for day in range(1, DAYS_BACK):
        old = repo.upload(f"old{day}")
        ts = now - timedelta(days=day, hours=1)
        repo.runs(old, *[(t, "failure" if t == "t11" else "pass", ts) for t in tests])
    repo.conn.commit()
    return tests


def test_partitioned_results_equal_reference(conn):
    partition_by_day(conn)
    (now,) = conn.execute("select now()").fetchone()
    repo = Repo(conn)
    populate(repo, now)
    conn.execute("analyze")
    conn.commit()

    everything = all_runs(conn)
    before = read_snapshot(conn, repo.id, commit_sha="sha1")
    want = reference.process_commit(before, repo.id, "sha1")
    got = api.process_commit(conn, repo.id, "sha1")
    conn.commit()
    assert got == want.summary
    assert got.testruns_marked > 0 and got.flakes_created > 0 and got.flakes_expired > 0
    expected = reference.apply(before, want)
    # the snapshot holds the commit's runs; the other commits' runs stay as they were
    others = everything - run_outcomes(before.testruns)
    assert sum(others.values()) > 0
    known = {f.id for f in before.flakes}
    assert flake_state(all_flakes(conn), known) == flake_state(list(expected.flakes), known)
    assert all_runs(conn) == others + run_outcomes(expected.testruns)
    assert ledger(conn) == expected.ledger


def _day(name: str) -> datetime:
    match = PARTITION.match(name)
    assert match, name
    return datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("lookback", [timedelta(days=1), timedelta(hours=30)])
def test_partitioned_reads_only_the_window(conn, lookback):
    today = partition_by_day(conn)
    (now,) = conn.execute("select now()").fetchone()
    populate(Repo(conn), now)
    conn.execute("analyze")
    conn.commit()

    with conn.transaction(force_rollback=True):
        with nested_plans(conn) as plans:
            summary = api.process_commit(conn, 1, "sha1", lookback=lookback)
    assert summary.testruns_considered > 0

    named, executed = set(), set()
    for plan in plans:
        for node in plan.nodes():
            name = node.get("Relation Name", "")
            if name.startswith("ta_timeseries_testrun"):
                named.add(name)
                if node.get("Actual Loops", 0) > 0:
                    executed.add(name)
    assert "ta_timeseries_testrun" in named  # the UPDATE's target
    partitions = {n for n in named if n != "ta_timeseries_testrun"}
    assert executed - {"ta_timeseries_testrun"}, "no partition was read: the check proves nothing"
    # every partition in any plan (pruned at plan time or not) ends after the cutoff
    cutoff = now - lookback
    outside = sorted(p for p in partitions if _day(p) + timedelta(days=1) <= cutoff)
    assert not outside, f"partitions outside the window in the plans: {outside}"
    # and the window's past partitions are the ones read
    assert {_day(p) for p in executed - {"ta_timeseries_testrun"}} <= {
        today + timedelta(days=d) for d in range(-2, DAYS_AHEAD + 1)}
