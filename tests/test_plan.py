"""The function reads only the rows that matter (SPEC, last section), checked
on its plans, not its time: on a 200,000-run commit with failures in 1% of
the tests, its statements read fewer than 10% of the commit's runs.

The measure: auto_explain (log_nested_statements, ANALYZE, FORMAT JSON) logs
every statement the function runs; for each scan node on
ta_timeseries_testrun (sequential, index, index-only or bitmap heap scan) the
rows it looked at are the rows it returned plus those its filter and index
recheck removed, per loop, times its loops. Their sum over all statements
counts a run once per statement that reads it (the failures are read by the
test-set, the state-machine and the marking statements), so it is an upper
bound on the distinct runs read. Bitmap index scans are not counted apart:
their heap scan above them counts the same rows.
"""

from __future__ import annotations

import psycopg

from flakectl.lab import benchdata
from flakectl.lab.benchdata import COMMIT_SHA, REPO_ID, Workload
from flakectl.lab.plans import nested_plans, relation_rows

# 20 uploads x 10,000 tests, 100 of them flaky (1%), 200 open flakes, and
# 200,000 runs of other commits and repositories in the same table
WORKLOAD = Workload(shape="realistic", uploads=20, tests=10_000, open_flakes=200, other_rows=200_000)


def test_reads_under_a_tenth_of_the_commit(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        benchdata.create_schema(conn)
        benchdata.use_schema(conn)
        benchdata.generate(conn, WORKLOAD)
        runs = benchdata.runs_in_commit(conn)
        assert runs >= 200_000
        conn.execute("begin")
        try:
            with nested_plans(conn) as plans:
                row = conn.execute("select testruns_considered, testruns_marked"
                                   " from flakectl_bench.process_commit(%s, %s)", (REPO_ID, COMMIT_SHA)).fetchone()
        finally:
            conn.execute("rollback")
        benchdata.drop_schema(conn)

    considered, marked = row
    assert 0 < considered < runs / 20 and marked > 0  # the data is what the test claims
    read = relation_rows(plans, {"ta_timeseries_testrun"})["ta_timeseries_testrun"]
    assert read > 0
    assert read < runs / 10, (
        f"the function's statements read {read:,.0f} runs of a {runs:,}-run commit"
        f" ({read / runs:.1%}; it considers {considered:,})")
