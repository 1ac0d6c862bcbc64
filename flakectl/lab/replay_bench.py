"""Replay at scale: a repository's history replayed at once vs. processed commit by commit.

    python -m flakectl.lab.replay_bench --commits 900 --uploads 10 --tests 2000 --series 30,90,270

For each history length in the series (commits; the last is --commits), on a
fresh database of one throwaway server (flakectl.lab.pgserver), the history
of `flakectl demo` is generated (flakectl.lab.demo.generate: 1% flaky tests
failing with 2-30%, half of those failures retried, one broken commit, every
run of an upload sharing its timestamp), its commits spread evenly over the
30 days before now, then:

  R_apply  flakectl.replay(..., dry_run => false) on the unprocessed history
           (as after the old worker: no ledger, runs unmarked): it marks every
           failure and inserts every flake; rolled back; run twice, the
           second (warm cache) reported;
  S        every commit through flakectl.process_commit, in order, each in
           its own transaction: the sum of the calls replay stands for. Each
           call's lookback is its commit's age plus one day, so it reads what
           a worker calling it on the day reads: one day of runs per test
           (the runs of the day after the commit stand in for those of the
           day before, which an in-time call would read);
  R_dry    flakectl.replay(...) (a dry run) on the processed history: every
           row identical; run twice, the second reported; then its two parts
           alone: T0 (the earliest run of the uploads: every run read once)
           and the state machine from an empty state.

For each call: wall time, the backend's peak RssAnon (its private memory,
sampled every 2 ms from /proc), and the temporary file bytes it wrote
(pg_stat_database.temp_bytes). Memory bounded means: the peak does not grow
with the history. Timings are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta

import psycopg

from flakectl import api
from flakectl.dba import migrate
from flakectl.lab.bench import PeakMemory
from flakectl.lab.demo import REPO_ID, DemoSize, Truth, generate
from flakectl.lab.pgserver import ThrowawayServer

SPAN = timedelta(days=30)


@dataclass
class Measured:
    seconds: float
    peak_rss_kb: int | None
    temp_bytes: int


@dataclass
class Point:
    commits: int
    uploads: int
    tests: int
    runs: int
    copy_seconds: float  # the kept history copied, flakectl installed on the copy
    replay_apply: Measured
    process_sum: Measured  # seconds summed; peak and temp bytes the max / sum over calls
    process_max_call_seconds: float
    replay_dry: Measured
    t0_seconds: float  # T0's statement alone, from the client: planned unlike the function's (not shown)
    machine_seconds: float  # R_dry's state machine alone
    flakes: int
    summary_apply: dict
    summary_dry: dict


@contextlib.contextmanager
def _session(url: str) -> Iterator[tuple[psycopg.Connection, int]]:
    """A fresh backend (no server-side prepared statements) and its pid."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        yield conn, pid


def _temp_bytes(conn: psycopg.Connection) -> int:
    conn.execute("select pg_stat_force_next_flush()")
    conn.execute("select pg_stat_clear_snapshot()")
    (value,) = conn.execute(
        "select temp_bytes from pg_stat_database where datname = current_database()").fetchone()
    return value


def _timed(conn: psycopg.Connection, pid: int, call) -> tuple[Measured, object]:  # noqa: ANN001
    """`call()` timed, with the peak RssAnon of backend `pid` while it ran and
    the temporary file bytes the database wrote meanwhile."""
    before = _temp_bytes(conn)
    with PeakMemory(pid) as memory:
        started = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - started
    return Measured(seconds, memory.peak_kb, _temp_bytes(conn) - before), result


def _exists(admin: psycopg.Connection, name: str) -> bool:
    return admin.execute("select exists (select from pg_database where datname = %s)", (name,)).fetchone()[0]


def history(server_url: str, url_for, commits: int, uploads: int, tests: int, err) -> str:  # noqa: ANN001
    """The generated history's database (Codecov's tables only, revision 0001),
    kept as a template: made once per size on a server, reused by later runs."""
    name = f"replay_bench_gen_{commits}x{uploads}x{tests}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        if _exists(admin, name):
            err.write(f"replay_bench: {commits} commits: reusing database {name}\n")
            return name
        admin.execute(f"create database {name}_partial")
    url = url_for(f"{name}_partial")
    migrate.upgrade(url, "0001")
    size = DemoSize(commits=commits, uploads=uploads, tests=tests, flaky_share=0.01, seed=1)
    with _session(url) as (conn, _):
        started = time.perf_counter()
        _, _, runs = generate(conn, size, Truth.draw(size), span=SPAN)
        conn.execute("vacuum analyze")
        err.write(f"replay_bench: {commits} commits: {runs:,} runs generated in"
                  f" {time.perf_counter() - started:.0f} s\n")
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"alter database {name}_partial rename to {name}")
    return name


def measure(server_url: str, url_for, commits: int, uploads: int, tests: int, expire_after: int,  # noqa: ANN001
            err) -> Point:  # noqa: ANN001
    template = history(server_url, url_for, commits, uploads, tests, err)
    name = f"replay_bench_{commits}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"drop database if exists {name}")
        started = time.perf_counter()
        admin.execute(f"create database {name} template {template}")
    url = url_for(name)
    migrate.upgrade(url)  # flakectl installed on the copy: the bodies being measured
    generated = time.perf_counter() - started
    with _session(url) as (conn, _):
        conn.execute("vacuum analyze")
        (runs,) = conn.execute("select count(*) from ta_timeseries_testrun").fetchone()
        shas = [sha for (sha,) in conn.execute(
            "select commitid from commits where repoid = %s order by id", (REPO_ID,))]
        uploads_ids = [u for (u,) in conn.execute(
            "select u.id from reports_upload u join reports_commitreport r on r.id = u.report_id"
            " join commits c on c.id = r.commit_id where c.repoid = %s order by u.id", (REPO_ID,))]
        ages = dict(conn.execute("select commitid, now() - timestamp from commits where repoid = %s",
                                 (REPO_ID,)).fetchall())

    # each phase on a fresh backend: its peak RssAnon is its own, not the generator's
    for _ in range(2):  # the first reads the history into the cache; the second is timed
        with _session(url) as (conn, pid):
            conn.execute("begin")
            try:
                apply, summary_apply = _timed(conn, pid, lambda: api.replay(
                    conn, REPO_ID, uploads_ids, expire_after=expire_after, dry_run=False))
            finally:
                conn.execute("rollback")
            conn.execute("vacuum ta_timeseries_testrun, test_analytics_flake")
    err.write(f"replay_bench: {commits} commits: replay applied in {apply.seconds:.1f} s\n")

    total, peak, temp, slowest = 0.0, 0, 0, 0.0
    with _session(url) as (conn, pid):
        for sha in shas:
            one, _ = _timed(conn, pid, lambda sha=sha: api.process_commit(
                conn, REPO_ID, sha, lookback=ages[sha] + timedelta(days=1), expire_after=expire_after))
            total += one.seconds
            slowest = max(slowest, one.seconds)
            peak = max(peak, one.peak_rss_kb or 0)
            temp += one.temp_bytes
        conn.execute("vacuum analyze ta_timeseries_testrun, test_analytics_flake")
    err.write(f"replay_bench: {commits} commits: processed one by one in {total:.1f} s\n")

    for _ in range(2):
        with _session(url) as (conn, pid):
            dry, summary_dry = _timed(conn, pid, lambda: api.replay(
                conn, REPO_ID, uploads_ids, expire_after=expire_after))
    err.write(f"replay_bench: {commits} commits: dry-run replay in {dry.seconds:.1f} s\n")
    # where R_dry's time goes: T0 (every run of the uploads read once) and
    # the state machine from an empty state, each alone, as the function runs them
    with _session(url) as (conn, pid):
        t0, _ = _timed(conn, pid, lambda: conn.execute(
            "select min(r.timestamp) from ta_timeseries_testrun r"
            " where r.upload_id = any(%s) and r.repo_id = %s", (uploads_ids, REPO_ID)).fetchone())
    with _session(url) as (conn, pid):
        machine, _ = _timed(conn, pid, lambda: conn.execute(
            "select testruns_considered from flakectl.state_machine(%s, %s, '-infinity', %s, true, false)",
            (REPO_ID, uploads_ids, expire_after)).fetchone())
        (flakes,) = conn.execute("select count(*) from test_analytics_flake").fetchone()
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"drop database {name} with (force)")
    return Point(commits, uploads, tests, runs, round(generated, 1), apply,
                 Measured(total, peak or None, temp), slowest, dry, t0.seconds, machine.seconds, flakes,
                 asdict(summary_apply), asdict(summary_dry))


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MB"


def table(points: list[Point]) -> list[str]:
    head = ("| commits | runs | flakes | S: process_commit x commits | R_apply (unprocessed) | R_apply / S"
            " | R_dry (processed) | its state machine alone | peak RssAnon S / R_apply / R_dry"
            " | temp bytes S / R_apply / R_dry |")
    lines = [head, "|" + "---|" * 10]
    for p in points:
        lines.append(
            f"| {p.commits} | {p.runs:,} | {p.flakes:,} | {p.process_sum.seconds:.1f} s"
            f" (slowest call {p.process_max_call_seconds * 1000:.0f} ms) | {p.replay_apply.seconds:.1f} s"
            f" | {p.replay_apply.seconds / p.process_sum.seconds:.2f} | {p.replay_dry.seconds:.1f} s"
            f" | {p.machine_seconds:.1f} s"
            f" | {_mb(p.process_sum.peak_rss_kb)} / {_mb(p.replay_apply.peak_rss_kb)} /"
            f" {_mb(p.replay_dry.peak_rss_kb)}"
            f" | {p.process_sum.temp_bytes:,} / {p.replay_apply.temp_bytes:,} / {p.replay_dry.temp_bytes:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flakectl.lab.replay_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=900, help="the longest history (default 900)")
    parser.add_argument("--uploads", type=int, default=10, help="uploads per commit (default 10)")
    parser.add_argument("--tests", type=int, default=2000, help="tests per upload (default 2000)")
    parser.add_argument("--series", default="", help="shorter histories first, e.g. 30,90,270")
    parser.add_argument("--expire-after", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dsn", help="a server to use (a superuser's URL) instead of a throwaway one; the"
                                      " generated histories stay there as databases replay_bench_gen_*,"
                                      " reused by later runs")
    parser.add_argument("--generate-only", action="store_true", help="only make the kept histories")
    args = parser.parse_args(argv)
    lengths = sorted({int(n) for n in args.series.split(",") if n.strip()} | {args.commits})
    points = []
    with contextlib.ExitStack() as stack:
        if args.dsn:
            server_url = args.dsn
            base = psycopg.conninfo.conninfo_to_dict(args.dsn)
            url_for = lambda db: psycopg.conninfo.make_conninfo(**{**base, "dbname": db})  # noqa: E731
        else:
            server = stack.enter_context(ThrowawayServer())
            server_url, url_for = server.url, server.url_for
        with psycopg.connect(server_url, autocommit=True) as admin:
            (version,) = admin.execute("show server_version").fetchone()
        for commits in lengths:
            if args.generate_only:
                history(server_url, url_for, commits, args.uploads, args.tests, sys.stderr)
            else:
                points.append(measure(server_url, url_for, commits, args.uploads, args.tests,
                                      args.expire_after, sys.stderr))
    if args.json:
        print(json.dumps({"server_version": version, "points": [asdict(p) for p in points]}, indent=2))
    else:
        print(f"PostgreSQL {version}, {args.uploads} uploads x {args.tests} tests per commit,"
              f" expire_after {args.expire_after}")
        for line in table(points):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
