"""`flakectl bench`: the function (A) against the worker's Python path (B),
the read floor (C) and the write floor (W), on one large generated commit.

    python -m flakectl.lab.bench --shape realistic --uploads 50 --tests 20000
    python -m flakectl.lab.bench --sizes

By default on a throwaway server tuned for a benchmark; with `--dsn` in a
scratch schema of the user's database (flakectl must be installed there; see
flakectl.lab.benchdata). Each call runs in its own transaction, rolled back:

* A: `select * from flakectl_bench.process_commit(repo, sha)`, head's bodies
  installed in the scratch schema (benchdata.install_functions);
* B: flakectl.lab.workerpath, the worker's path as upstream has it;
* C: one `select count(*)` over exactly the rows A must read: the uploads'
  failure-class runs in the window, plus their passes of the tests that fail
  or hold an open flake (its count should equal A's testruns_considered);
* W: the write floor (SPEC, last section): C, then the marking UPDATE alone
  (`outcome = 'flaky_fail'` on the uploads' failures, the statement A and B
  both run), in one transaction; its marked count must equal A's.

The protocol (printed with the results): A, B, C and W alternate, each on
its own connection; every connection has psycopg's automatic preparation
off (`prepare_threshold=None`), so every timed statement is planned for its
own values (psycopg prepares a statement after its fifth execution, and a
generic plan of the floor query with bound arrays ran 2-3x slower). A is
called at least ten times on one connection (a PL/pgSQL plan can turn
generic after five calls: the per-call list shows a step if it does); the
first call of each path is an untimed warm-up, the timed calls are the next
`--repeat` of A, C and W and `--worker-repeat` of B (B is ~100x slower). Inside every A and B transaction, before the
rollback, the flakes and the run outcomes are hashed: A and B must leave the
same state (exit status 1 otherwise). Per call it records the wall time at
the client, buffer accesses of the bench's tables (pg_stat_get_xact_blocks_*,
this transaction's own counters) and the backend's peak private memory
(RssAnon of /proc/<pid>/status, sampled every 2 ms; only when the server
runs on this machine). Between calls the tables are vacuumed (untimed), so
one call's rolled-back rows do not slow the next: every path's call is
followed by the same untimed VACUUM. It prints; it asserts no times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TextIO

import psycopg

from flakectl.dba import migrate
from flakectl.lab import benchdata, benchfleet, workerpath
from flakectl.lab.benchdata import COMMIT_SHA, REPO_ID, SCHEMA, Workload
from flakectl.lab.plans import nested_plans
from flakectl.lab.pgserver import ThrowawayServer

#: A benchmark server: room in shared_buffers for the commit, no durability.
SERVER_SETTINGS = {
    "shared_buffers": "512MB",
    # --statements reads planning and execution per statement from
    # pg_stat_statements; loaded always, tracking nothing unless asked
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "none",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
    "autovacuum": "off",  # the bench vacuums itself, between calls
}
MIN_FUNCTION_CALLS = 10
WORKER_REPEAT = 3
#: --sizes: tests per upload at 50 uploads (10k, 100k, 1M, 2M runs); the
#: relevant rows are held fixed: 50 flaky tests and 50 open flakes.
SIZES = (200, 2_000, 20_000, 40_000)
SIZES_FLAKY, SIZES_OPEN = 50, 50
#: --suite: the shapes of issue 13's targets, (shape, uploads, tests)
SUITE = (("realistic", 50, 20_000), ("uniform", 50, 20_000), ("storm", 50, 2_000),
         ("realistic", 5, 5_000), ("realistic", 2, 1_000))
PATHS = ("A", "B", "C", "W")
PATH_NAMES = {"A": "A function", "B": "B worker path", "C": "C read floor", "W": "W write floor"}
PROTOCOL = (
    "protocol: A, B, C, W alternate, each on a connection of its own, each call in a transaction"
    " rolled back and followed by an untimed VACUUM of the bench's tables; psycopg's automatic"
    " preparation off (prepare_threshold=None), so every timed statement is planned for its own"
    " values; first call of each path untimed; medians of the timed calls")

# head's bodies, installed in the scratch schema (benchdata.install_functions)
_FUNCTION = f"select * from {SCHEMA}.process_commit(%(repo)s, %(sha)s)"
_FLOOR = """
with fail as (
  select r.test_id
    from ta_timeseries_testrun r
   where r.upload_id = any(%(uploads)s) and r.outcome in ('failure', 'error', 'flaky_fail')
     and r.repo_id = %(repo)s and r.timestamp >= (now() at time zone 'UTC' - interval '1 day') at time zone 'UTC'
),
tests as (
  select test_id from fail
  union
  select test_id from test_analytics_flake where repoid = %(repo)s and end_date is null
)
select (select count(*) from fail)
     + (select count(*)
          from ta_timeseries_testrun r
         where r.upload_id = any(%(uploads)s) and r.outcome = 'pass'
           and r.test_id = any(array(select test_id from tests))
           and r.repo_id = %(repo)s
           and r.timestamp >= (now() at time zone 'UTC' - interval '1 day') at time zone 'UTC')
"""
# the write floor's second statement: the marking UPDATE as A and B run it
_MARK = """
update ta_timeseries_testrun r
   set outcome = 'flaky_fail'
 where r.upload_id = any(%(uploads)s) and r.outcome in ('failure', 'error')
   and r.repo_id = %(repo)s and r.timestamp >= (now() at time zone 'UTC' - interval '1 day') at time zone 'UTC'
"""
# order-independent hashes of the state a call leaves: the flakes (new ones without
# their sequence-assigned ids) and every run that is not a pass (no call makes or
# unmakes a pass, so any outcome change shows here)
_STATE = """
select (select md5(coalesce(string_agg(x, ',' order by x), ''))
          from (select concat_ws('|', case when id <= %(max_id)s then id end, repoid,
                                 encode(test_id, 'hex'), encode(flags_id, 'hex'), recent_passes_count,
                                 count, fail_count, start_date, end_date) as x
                  from test_analytics_flake) f),
       (select count(*) || ':' || coalesce(sum(hashtextextended(concat_ws('|', upload_id,
                  encode(test_id, 'hex'), timestamp, repo_id, outcome), 0)::numeric), 0)
          from ta_timeseries_testrun where outcome <> 'pass')
"""
_BUFFERS = """
select coalesce(sum(pg_stat_get_xact_blocks_fetched(o)), 0)::bigint,
       coalesce(sum(pg_stat_get_xact_blocks_hit(o)), 0)::bigint
  from unnest(%s::oid[]) as o
"""


@dataclass
class Call:
    path: str
    seconds: float
    rows: int
    buffers: int  # shared buffer accesses of the bench's relations (hit + read)
    read: int  # of which not in shared buffers
    peak_kb: int | None  # backend's peak RssAnon
    state: tuple | None = None
    summary: dict | None = None
    timed: bool = True
    mark_seconds: float | None = None  # W: its marking UPDATE alone
    cpu: float | None = None  # seconds on a CPU: the backend's plus the client thread's
    queued: float | None = None  # seconds the backend was runnable but waited for a CPU


@dataclass
class Stats:
    path: str
    calls: list[Call]

    @property
    def timed(self) -> list[Call]:
        return [c for c in self.calls if c.timed]

    def median(self, attr: str = "seconds") -> float:
        return statistics.median(getattr(c, attr) for c in self.timed)

    @property
    def has_cpu(self) -> bool:
        return all(c.cpu is not None for c in self.timed)

    @property
    def peak_kb(self) -> int | None:
        peaks = [c.peak_kb for c in self.timed if c.peak_kb is not None]
        return max(peaks) if peaks else None

    def as_json(self) -> dict:
        t = self.timed
        extra = {}
        if self.path == "W":
            extra["mark_median_s"] = self.median("mark_seconds")
            extra["marked"] = t[-1].summary["testruns_marked"]
        if self.has_cpu:
            extra["cpu_median_s"] = self.median("cpu")
            extra["queued_median_s"] = self.median("queued")
        return {
            **extra,
            "median_s": self.median(), "min_s": min(c.seconds for c in t),
            "max_s": max(c.seconds for c in t), "rows": t[-1].rows,
            "buffers": round(self.median("buffers")), "buffers_read": round(self.median("read")),
            "peak_kb": self.peak_kb,
            "seconds_per_call": [round(c.seconds, 5) for c in self.calls],
        }


@dataclass
class Outcome:
    workload: Workload
    runs: int  # runs of the commit
    stats: dict[str, Stats]
    summary: dict
    agree: bool
    problems: list[str] = field(default_factory=list)
    explain: list[str] = field(default_factory=list)
    statements: list[dict] = field(default_factory=list)

    @property
    def b_over_a(self) -> float:
        return self.stats["B"].median() / self.stats["A"].median()

    @property
    def a_over_c(self) -> float:
        return self.stats["A"].median() / self.stats["C"].median()

    @property
    def a_over_w(self) -> float:
        return self.stats["A"].median() / self.stats["W"].median()

    @property
    def w_over_c(self) -> float:
        return self.stats["W"].median() / self.stats["C"].median()

    def cpu_ratio(self, x: str, y: str) -> float | None:
        if not (self.stats[x].has_cpu and self.stats[y].has_cpu):
            return None
        return self.stats[x].median("cpu") / self.stats[y].median("cpu")

    def as_json(self) -> dict:
        return {
            "workload": self.workload.as_json(), "runs_in_commit": self.runs,
            "summary": self.summary, "agree": self.agree, "problems": self.problems,
            "b_over_a": round(self.b_over_a, 2), "a_over_c": round(self.a_over_c, 2),
            "a_over_w": round(self.a_over_w, 3), "w_over_c": round(self.w_over_c, 2),
            **({"cpu_b_over_a": round(self.cpu_ratio("B", "A"), 2),
                "cpu_a_over_w": round(self.cpu_ratio("A", "W"), 3)} if self.cpu_ratio("A", "W") else {}),
            "paths": {p: s.as_json() for p, s in self.stats.items()},
            **({"explain": self.explain} if self.explain else {}),
            **({"statements": self.statements} if self.statements else {}),
        }


class PeakMemory:
    """The highest RssAnon of a process while the block runs, sampled every 2 ms."""

    def __init__(self, pid: int | None):
        self.path = f"/proc/{pid}/status" if pid else None
        self.peak_kb: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        try:
            with open(self.path) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        kb = int(line.split()[1])
                        self.peak_kb = max(self.peak_kb or 0, kb)
                        return
        except OSError:
            self.path = None

    def _loop(self) -> None:
        while not self._stop.wait(0.002) and self.path:
            self._sample()

    def __enter__(self) -> "PeakMemory":
        if self.path:
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.path:
            self._stop.set()
            self._thread.join()
            self._sample()


class Session:
    """One connection to the bench schema, running A, B, C and W in rolled-back transactions."""

    def __init__(self, url: str, *, local: bool):
        # prepare_threshold=None: never a server-side prepared statement, so every
        # statement is planned for its own values, as the function's are
        self.conn = psycopg.connect(url, autocommit=True, prepare_threshold=None)
        benchdata.use_schema(self.conn)
        (pid,) = self.conn.execute("select pg_backend_pid()").fetchone()
        self.pid = pid if local and _is_postgres(pid) else None
        self.params = {"repo": REPO_ID, "sha": COMMIT_SHA}
        (self.oids,) = self.conn.execute(
            """
            select array_agg(c.oid) || array_agg(c.reltoastrelid) filter (where c.reltoastrelid <> 0)
              from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname in (%s, 'flakectl') and c.relkind in ('r', 'i', 'p', 'I')
            """, (SCHEMA,)).fetchone()
        self.function_calls = 0

    def close(self) -> None:
        self.conn.close()

    def prepare(self, workload: Workload) -> None:
        self.params["uploads"] = workload.upload_ids
        (self.params["max_id"],) = self.conn.execute(
            "select coalesce(max(id), 0) from test_analytics_flake").fetchone()

    def _buffers(self) -> tuple[int, int]:
        return self.conn.execute(_BUFFERS, (self.oids,)).fetchone()

    def call(self, path: str, *, timed: bool) -> Call:
        run: Callable[[], tuple[int, dict | None]] = {
            "A": self._function, "B": self._worker, "C": self._floor, "W": self._write_floor}[path]
        self._mark_seconds = None
        self.conn.execute("begin")
        try:
            fetched0, hit0 = self._buffers()
            with PeakMemory(self.pid) as memory:
                sched0, thread0 = _schedstat(self.pid), time.thread_time()
                started = time.perf_counter()
                rows, summary = run()
                seconds = time.perf_counter() - started
                sched1, thread1 = _schedstat(self.pid), time.thread_time()
            fetched1, hit1 = self._buffers()
            state = tuple(self.conn.execute(_STATE, self.params).fetchone()) if path in "AB" else None
        finally:
            self.conn.execute("rollback")
        # every path, the same untimed vacuum: no call pays for an earlier one's dead rows
        self.conn.execute(f"vacuum {SCHEMA}.ta_timeseries_testrun, {SCHEMA}.test_analytics_flake")
        fetched, hit = fetched1 - fetched0, hit1 - hit0
        cpu = queued = None
        if sched0 and sched1:
            cpu = (sched1[0] - sched0[0]) / 1e9 + (thread1 - thread0)
            queued = (sched1[1] - sched0[1]) / 1e9
        return Call(path, seconds, rows, fetched, fetched - hit, memory.peak_kb, state, summary, timed,
                    self._mark_seconds, cpu, queued)

    def _function(self) -> tuple[int, dict]:
        with self.conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            row = cur.execute(_FUNCTION, self.params).fetchone()
        self.function_calls += 1
        return row["testruns_considered"], dict(row)

    def _worker(self) -> tuple[int, dict]:
        r = workerpath.process_commit(self.conn, REPO_ID, COMMIT_SHA)
        return r.rows_fetched, {
            "uploads_processed": r.uploads, "flakes_created": r.flakes_created,
            "flakes_updated": r.flakes_updated, "flakes_expired": r.flakes_expired,
            "testruns_marked": r.testruns_marked}

    def _floor(self) -> tuple[int, None]:
        (n,) = self.conn.execute(_FLOOR, self.params).fetchone()
        return n, None

    def _write_floor(self) -> tuple[int, dict]:
        (n,) = self.conn.execute(_FLOOR, self.params).fetchone()
        started = time.perf_counter()
        marked = self.conn.execute(_MARK, self.params).rowcount
        self._mark_seconds = time.perf_counter() - started
        return n, {"testruns_marked": marked}

    def statement_stats(self, calls: int) -> list[dict]:
        """Planning and execution per statement over `calls` function calls
        (pg_stat_statements, track = all, track_planning = on), rolled back."""
        self.conn.execute("create extension if not exists pg_stat_statements with schema public")
        self.conn.execute("set pg_stat_statements.track = 'all'")
        self.conn.execute("set pg_stat_statements.track_planning = on")
        try:
            self.conn.execute("select public.pg_stat_statements_reset()")
            for _ in range(calls):
                self.conn.execute("begin")
                try:
                    self.conn.execute(_FUNCTION, self.params).fetchone()
                finally:
                    self.conn.execute("rollback")
                self.conn.execute("set pg_stat_statements.track = 'none'")
                self.conn.execute(f"vacuum {SCHEMA}.ta_timeseries_testrun, {SCHEMA}.test_analytics_flake")
                self.conn.execute("set pg_stat_statements.track = 'all'")
            self.conn.execute("set pg_stat_statements.track = 'none'")
            rows = self.conn.execute(
                """
                select s.toplevel, s.calls, s.plans, s.total_plan_time / greatest(s.plans, 1),
                       s.total_exec_time / greatest(s.calls, 1), s.rows / greatest(s.calls, 1),
                       regexp_replace(left(s.query, 400), '[[:space:]]+', ' ', 'g')
                  from public.pg_stat_statements s
                 where s.dbid = (select oid from pg_database where datname = current_database())
                   and s.userid = current_user::regrole
                   and s.query !~* '^[[:space:]]*(set|select public.pg_stat_statements_reset|begin|rollback)'
                 order by s.total_exec_time desc
                """).fetchall()
        finally:
            self.conn.execute("reset pg_stat_statements.track")
            self.conn.execute("reset pg_stat_statements.track_planning")
        return [{"toplevel": t, "calls": c, "plans": p, "plan_ms": round(pm, 3), "exec_ms": round(em, 3),
                 "rows": r, "query": q} for t, c, p, pm, em, r, q in rows]

    def explain_function(self) -> list[str]:
        """The function's statements as they ran (auto_explain, ANALYZE, BUFFERS), rolled back."""
        self.conn.execute("begin")
        try:
            with nested_plans(self.conn, fmt="text") as plans:
                self.conn.execute(_FUNCTION, self.params).fetchone()
        finally:
            self.conn.execute("rollback")
        return [f"-- {p.duration_ms:.1f} ms\n{_shorten(p.text)}" for p in plans]


def _shorten(text: str) -> str:
    """Plans with the array constants of a large call folded: '{<5000 elements>}'."""
    return re.sub(r"'\{([^}]{200,})\}'",
                  lambda m: "'{<%d elements>}'" % (m.group(1).count(",") + 1), text)


def _schedstat(pid: int | None) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of a local process."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None


def _is_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() in ("postgres", "postmaster")
    except OSError:
        return False


def measure(url: str, workload: Workload, repeat: int, *, local: bool, explain: bool = False,
            worker_repeat: int = WORKER_REPEAT, statements: int = 0,
            progress: Callable[[str], None] = lambda s: None) -> Outcome:
    """Run A, B, C and W alternating, each path on a connection of its own (its
    backend's peak memory is its own), and compare A's and B's states."""
    sessions = {p: Session(url, local=local) for p in PATHS}
    try:
        return _measure(sessions, workload, repeat, worker_repeat=worker_repeat, explain=explain,
                        statements=statements, progress=progress)
    finally:
        for session in sessions.values():
            session.close()


def _measure(sessions: dict[str, Session], workload: Workload, repeat: int, *, worker_repeat: int,
             explain: bool, statements: int, progress: Callable[[str], None]) -> Outcome:
    for session in sessions.values():
        session.prepare(workload)
    warmup = max(1, MIN_FUNCTION_CALLS - repeat)
    calls: dict[str, list[Call]] = {p: [] for p in PATHS}
    for i in range(warmup + repeat):
        for path in PATHS:
            if path != "A" and 0 < i < warmup:
                continue  # one warm-up call of B, C, W is enough; A's are the plan-cache guard check
            if path == "B" and i >= warmup + worker_repeat:
                continue
            progress(f"{path} call {len(calls[path]) + 1}")
            calls[path].append(sessions[path].call(path, timed=i >= warmup))
    stats = {p: Stats(p, c) for p, c in calls.items()}
    a, b = calls["A"], calls["B"]
    problems = []
    if len({c.state for c in a}) != 1:
        problems.append("A left different states in different calls")
    if len({c.state for c in b}) != 1:
        problems.append("B left different states in different calls")
    if a[0].state != b[0].state:
        problems.append(f"A and B left different states: A {a[0].state}, B {b[0].state}")
    for key, value in b[0].summary.items():
        if a[0].summary[key] != value:
            problems.append(f"{key}: A {a[0].summary[key]}, B {value}")
    agree = not problems
    if calls["C"][0].rows != a[0].rows:
        problems.append(f"C counted {calls['C'][0].rows} rows, A considered {a[0].rows}"
                        " (the floor query does not match the function's rows)")
    if calls["W"][0].summary["testruns_marked"] != a[0].summary["testruns_marked"]:
        problems.append(f"W marked {calls['W'][0].summary['testruns_marked']} runs,"
                        f" A {a[0].summary['testruns_marked']}")
    outcome = Outcome(workload, benchdata.runs_in_commit(sessions["A"].conn), stats, a[0].summary,
                      agree, problems)
    if explain:
        outcome.explain = sessions["A"].explain_function()
    if statements:
        outcome.statements = sessions["A"].statement_stats(statements)
    return outcome


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:,.1f} MB"


def describe(o: Outcome) -> list[str]:
    w = o.workload
    s = o.summary
    out = [f"{w.shape}: {w.uploads} uploads x {w.tests:,} tests = {o.runs:,} runs in the commit"
           f" (+{w.other_rows:,} other rows; {w.flaky} flaky tests, {w.open_flakes} open flakes;"
           f" seed {w.seed})",
           f"function summary: {s['uploads_processed']} uploads, {s['testruns_considered']:,} runs"
           f" considered, {s['flakes_created']:,} flakes created, {s['flakes_updated']:,} updated,"
           f" {s['flakes_expired']:,} expired, {s['testruns_marked']:,} runs marked",
           "A and B agree (flakes, run outcomes, counters)" if o.agree else "A AND B DISAGREE",
           *[f"  ! {p}" for p in o.problems], "",
           "| path | median | min | max | rows | buffers | not in shared buffers | peak backend memory |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in PATHS:
        st = o.stats[p]
        t = [c.seconds for c in st.timed]
        out.append(f"| {PATH_NAMES[p]} | {_ms(st.median())} | {_ms(min(t))} | {_ms(max(t))}"
                   f" | {st.timed[-1].rows:,} | {round(st.median('buffers')):,}"
                   f" | {round(st.median('read')):,} | {_mb(st.peak_kb)} |")
    if all(o.stats[p].has_cpu for p in PATHS):
        out += ["", "on a CPU (the backend's time on a CPU, from /proc/<pid>/schedstat, plus the client"
                " thread's: what the call cost, whatever the load) and waiting for one:", "",
                "| path | CPU median | CPU min | waiting for a CPU (median) |", "|---|---:|---:|---:|"]
        for p in PATHS:
            st = o.stats[p]
            out.append(f"| {PATH_NAMES[p]} | {_ms(st.median('cpu'))} | {_ms(min(c.cpu for c in st.timed))}"
                       f" | {_ms(st.median('queued'))} |")
        out += ["", f"by CPU: B/A = {o.cpu_ratio('B', 'A'):,.1f}x    A/C = {o.cpu_ratio('A', 'C'):,.2f}"
                f"    A/W = {o.cpu_ratio('A', 'W'):,.2f}    W/C = {o.cpu_ratio('W', 'C'):,.2f}"]
    w = o.stats["W"]
    out += ["", f"B/A = {o.b_over_a:,.1f}x    A/C = {o.a_over_c:,.2f}    A/W = {o.a_over_w:,.2f}"
            f"    W/C = {o.w_over_c:,.2f}",
            f"W's marking UPDATE alone: median {_ms(w.median('mark_seconds'))}"
            f" ({w.timed[-1].summary['testruns_marked']:,} runs)"]
    for p in ("A", "C", "W"):
        calls = ", ".join(f"{c.seconds * 1000:.1f}" for c in o.stats[p].calls)
        out.append(f"{p}, every call in order (ms; the first untimed): {calls}")
    if o.statements:
        out += ["", "per statement (pg_stat_statements, track = all, track_planning = on; means per"
                f" execution over {o.statements[0]['calls']} more calls of A; plans = calls: planned"
                " for its own values every time, no generic plan):", "",
                "| plan ms | exec ms | calls | plans | rows | statement |", "|---:|---:|---:|---:|---:|---|"]
        for st in o.statements:
            text = st["query"].replace("|", "\\|")
            out.append(f"| {st['plan_ms']:.3f} | {st['exec_ms']:.3f} | {st['calls']} | {st['plans']} | {st['rows']:,}"
                       f" | {text[:160]} |")
    return out


def suite_table(outcomes: list[Outcome]) -> list[str]:
    out = ["| commit | runs | A ms | C ms | W ms | B ms | B/A | A/C | A/W | by CPU: A ms | C ms | W ms"
           " | B ms | B/A | A/C | A/W |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for o in outcomes:
        w = o.workload
        med = {p: o.stats[p].median() * 1000 for p in PATHS}
        line = (f"| {w.shape} {w.uploads} x {w.tests:,} | {o.runs:,} | {med['A']:,.1f} | {med['C']:,.1f}"
                f" | {med['W']:,.1f} | {med['B']:,.1f} | {o.b_over_a:,.1f}x | {o.a_over_c:.2f}"
                f" | {o.a_over_w:.2f} |")
        if all(o.stats[p].has_cpu for p in PATHS):
            cpu = {p: o.stats[p].median("cpu") * 1000 for p in PATHS}
            line += (f" {cpu['A']:,.1f} | {cpu['C']:,.1f} | {cpu['W']:,.1f} | {cpu['B']:,.1f}"
                     f" | {o.cpu_ratio('B', 'A'):,.1f}x | {o.cpu_ratio('A', 'C'):.2f} | {o.cpu_ratio('A', 'W'):.2f} |")
        else:
            line += " n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
        out.append(line)
    return out


def sizes_table(outcomes: list[Outcome]) -> list[str]:
    out = ["| runs in commit | tests x uploads | rows considered | A median | A vs previous"
           " | B median | C median | W median | B/A | A/C | A/W | A buffers | A peak memory |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    previous = None
    for o in outcomes:
        a = o.stats["A"].median()
        ratio = f"{a / previous:.2f}x" if previous else "-"
        previous = a
        out.append(f"| {o.runs:,} | {o.workload.tests:,} x {o.workload.uploads} |"
                   f" {o.summary['testruns_considered']:,} | {_ms(a)} | {ratio} |"
                   f" {_ms(o.stats['B'].median())} | {_ms(o.stats['C'].median())} |"
                   f" {_ms(o.stats['W'].median())} | {o.b_over_a:,.1f}x | {o.a_over_c:.2f} |"
                   f" {o.a_over_w:.2f} |"
                   f" {round(o.stats['A'].median('buffers')):,} | {_mb(o.stats['A'].peak_kb)} |")
    return out


# --------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="benchmark in a scratch schema (flakectl_bench) of this database,"
                        " which must have flakectl installed; default: a throwaway server")
    parser.add_argument("--shape", choices=benchdata.SHAPES, default="realistic",
                        help="failure model (default realistic)")
    parser.add_argument("--uploads", type=int, default=50, help="uploads in the commit (default 50)")
    parser.add_argument("--tests", type=int, default=20_000, help="tests per upload (default 20000)")
    parser.add_argument("--flaky-tests", type=int, default=None,
                        help="realistic: flaky tests (default 1%% of tests)")
    parser.add_argument("--open-flakes", type=int, default=200, help="open flakes before the call (default 200)")
    parser.add_argument("--other-rows", type=int, default=1_000_000,
                        help="runs of other commits and repositories in the table (default 1000000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed calls of A, C and W (default 10)")
    parser.add_argument("--worker-repeat", type=int, default=WORKER_REPEAT,
                        help=f"timed calls of B, the slow one (default {WORKER_REPEAT})")
    parser.add_argument("--sizes", action="store_true",
                        help="scaling table: 50 uploads x 200/2000/20000/40000 tests, 50 flaky tests,"
                             " 50 open flakes (10k to 2M runs)")
    parser.add_argument("--suite", action="store_true",
                        help="issue 13's shapes in one run: realistic and uniform 50 x 20000,"
                             " storm 50 x 2000, realistic 5 x 5000 and 2 x 1000 (--other-rows each)")
    parser.add_argument("--fleet", action="store_true",
                        help="K worker processes (--fleet-k) over a stream of --fleet-commits commits of"
                             " mixed sizes, one repository each, with A and with B: commits/s,"
                             " latency percentiles, lock waits between repositories")
    parser.add_argument("--fleet-commits", type=int, default=100,
                        help="commits in the fleet's stream (default 100)")
    parser.add_argument("--fleet-k", type=_ks, default=",".join(map(str, benchfleet.FLEET_K)),
                        help="worker counts, comma-separated (default 1,2,4,8)")
    parser.add_argument("--explain", action="store_true",
                        help="also print the function's statements as they ran (auto_explain)")
    parser.add_argument("--statements", type=int, default=0, metavar="N",
                        help="also print planning and execution time per statement over N more"
                             " calls of A (pg_stat_statements, which must be preloaded; the"
                             " throwaway server preloads it)")
    parser.add_argument("--keep", action="store_true", help="with --dsn: keep the scratch schema")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of worker counts: {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be at least 1: {text!r}")
    return ks


def workloads(args: argparse.Namespace) -> list[Workload]:
    base = Workload(shape=args.shape, uploads=args.uploads, tests=args.tests,
                    flaky_tests=args.flaky_tests, open_flakes=args.open_flakes,
                    other_rows=args.other_rows, seed=args.seed)
    if args.suite:
        return [replace(base, shape=shape, uploads=u, tests=t) for shape, u, t in SUITE]
    if not args.sizes:
        return [base]
    return [replace(base, tests=t, flaky_tests=SIZES_FLAKY, open_flakes=SIZES_OPEN) for t in SIZES]


class BenchError(Exception):
    pass


def _check_installed(conn: psycopg.Connection) -> None:
    if conn.execute("select to_regproc('flakectl.process_commit') is null").fetchone()[0]:
        raise BenchError("flakectl is not installed in this database (run `flakectl db upgrade`"
                         " first), or run the bench without --dsn on a throwaway server")
    schema = migrate.codecov_schema(conn)
    missing = [t for t in benchdata.TABLES
               if conn.execute("select to_regclass(format('%%I.%%I', %s::text, %s::text)) is null",
                               (schema, t)).fetchone()[0]]
    if missing:
        raise BenchError(f"{schema}.{missing[0]} is missing: the scratch schema copies the Codecov tables")
    clash = conn.execute("select count(*) from flakectl.processed_upload where upload_id >= %s",
                         (benchdata.UPLOAD_BASE,)).fetchone()[0]
    if clash:
        raise BenchError(f"flakectl.processed_upload holds upload ids >= {benchdata.UPLOAD_BASE},"
                         " the range the bench uses; refusing")


def _is_local(url: str) -> bool:
    host = str(psycopg.conninfo.conninfo_to_dict(url).get("host") or "")
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def bench(url: str, args: argparse.Namespace, *, local: bool, err: TextIO) -> tuple[list[Outcome], dict, tuple | None]:
    def say(text: str) -> None:
        err.write(f"flakectl bench: {text}\n")
        err.flush()

    with psycopg.connect(url, autocommit=True) as admin:
        _check_installed(admin)
        env = {
            "server_version": admin.execute("show server_version").fetchone()[0],
            "nproc": os.cpu_count(), "memory_gb": _memory_gb(), "machine": platform.machine(),
            "settings": dict(admin.execute(
                "select name, current_setting(name) from pg_settings where name = any(%s)",
                (["shared_buffers", "work_mem", "max_wal_size", "fsync", "jit", "maintenance_work_mem"],)
            ).fetchall()),
        }
        benchdata.create_schema(admin, migrate.codecov_schema(admin))
        benchdata.use_schema(admin)
        outcomes = []
        try:
            if args.fleet:
                commits = benchfleet.stream(args.fleet_commits, args.seed)
                say(f"generating the fleet: {len(commits)} commits, {sum(c.runs for c in commits):,} runs"
                    f" + {args.other_rows:,} other rows")
                started = time.perf_counter()
                benchdata.generate_fleet(admin, commits, args.other_rows, args.seed)
                say(f"generated in {time.perf_counter() - started:.1f} s")
                ks = args.fleet_k if isinstance(args.fleet_k, tuple) else _ks(args.fleet_k)  # a default
                runs = benchfleet.fleet(url, commits, ks, say=say)
                return [], env, (commits, runs)
            for w in workloads(args):
                say(f"generating {w.shape}: {w.uploads} uploads x {w.tests:,} tests"
                    f" + {w.other_rows:,} other rows")
                started = time.perf_counter()
                benchdata.generate(admin, w)
                say(f"generated in {time.perf_counter() - started:.1f} s; running A, B, C, W")
                outcomes.append(measure(url, w, args.repeat, local=local, explain=args.explain,
                                        worker_repeat=min(args.worker_repeat, args.repeat),
                                        statements=args.statements))
                say(describe(outcomes[-1])[2])
        finally:
            if not (args.keep and args.dsn):
                benchdata.drop_schema(admin)
    return outcomes, env, None


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if args.repeat < 1 or args.worker_repeat < 1:
        err.write("flakectl bench: --repeat and --worker-repeat must be at least 1\n")
        return 2
    try:
        if args.dsn:
            outcomes, env, fleet = bench(args.dsn, args, local=_is_local(args.dsn), err=err)
        else:
            err.write("flakectl bench: starting a throwaway PostgreSQL\n")
            with ThrowawayServer(settings=SERVER_SETTINGS) as server:
                migrate.upgrade(server.url)
                outcomes, env, fleet = bench(server.url, args, local=True, err=err)
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:  # pg_stat_statements not preloaded
        err.write(f"flakectl: error: --statements: {str(exc).splitlines()[0]}\n")
        return 1
    except (BenchError, ValueError) as exc:
        err.write(f"flakectl: error: {exc}\n")
        return 1
    if fleet:
        return _report_fleet(args, env, *fleet, out=out)
    if args.json:
        out.write(json.dumps({"environment": env, "protocol": PROTOCOL, "repeat": args.repeat,
                              "worker_repeat": min(args.worker_repeat, args.repeat),
                              "results": [o.as_json() for o in outcomes]}, indent=2) + "\n")
    else:
        s = env["settings"]
        lines = [f"flakectl bench: PostgreSQL {env['server_version']}, {env['nproc']} CPUs,"
                 f" {env['memory_gb']} GB RAM; shared_buffers {s.get('shared_buffers')},"
                 f" work_mem {s.get('work_mem')}, jit {s.get('jit')}; {args.repeat} timed calls"
                 f" of A, C, W and {min(args.worker_repeat, args.repeat)} of B (medians),"
                 f" A called {MIN_FUNCTION_CALLS}+ times per session", ""]
        for o in outcomes:
            lines += describe(o) + [""]
            lines += o.explain + ([""] if o.explain else [])
        if args.sizes:
            lines += ["scaling (relevant rows held fixed):", "", *sizes_table(outcomes)]
        if args.suite:
            lines += ["", "medians, side by side per shape:", "", *suite_table(outcomes), ""]
        lines.append(PROTOCOL + ".")
        out.write("\n".join(lines) + "\n")
    return 0 if all(o.agree for o in outcomes) else 1


def _report_fleet(args: argparse.Namespace, env: dict, commits: list, runs: list, *, out: TextIO) -> int:
    problems = benchfleet.problems(runs)
    if args.json:
        out.write(json.dumps({"environment": env, "fleet": {
            "commits": [asdict(c) for c in commits], "other_rows": args.other_rows, "seed": args.seed,
            "runs": [r.as_json() for r in runs], "problems": problems}}, indent=2) + "\n")
    else:
        s = env["settings"]
        lines = [f"flakectl bench --fleet: PostgreSQL {env['server_version']}, {env['nproc']} CPUs,"
                 f" {env['memory_gb']} GB RAM; shared_buffers {s.get('shared_buffers')},"
                 f" work_mem {s.get('work_mem')}, jit {s.get('jit')}", "",
                 *benchfleet.describe(commits, args.other_rows, args.seed, runs), "",
                 "A and B report the same counters for every commit, and no lock waits between"
                 " different repositories" if not problems else "PROBLEMS:",
                 *[f"  ! {p}" for p in problems]]
        out.write("\n".join(lines) + "\n")
    return 1 if problems else 0


# `flakectl bench` (cli.py: "flakectl.lab.bench:cli"): add_arguments' options under the
# command's conventions (an environment variable each, usage errors exit 2).


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from flakectl.dba import options as o

    o.example(parser,
              "  flakectl bench --uploads 5 --tests 2000 --other-rows 0   # a small one\n"
              "  flakectl bench --shape storm --json\n"
              "  flakectl bench --dsn postgresql://postgres@localhost/scratch --keep\n"
              "  flakectl bench --suite --statements 10   # issue 13's five shapes, A, B, C, W\n"
              "  flakectl bench --fleet                   # K = 1, 2, 4, 8 workers, A and B\n\n"
              "A is the function, B the worker's Python path, C the read floor, W the write\n"
              "floor (C plus the marking UPDATE alone).\n"
              "Without --dsn on a throwaway PostgreSQL (server binaries needed, as for demo). The\n"
              "default size is 1M runs in the commit plus 1M other rows: slow to generate, and on\n"
              "2 CPUs each call of B alone takes about 10 s. With --dsn, in a scratch schema\n"
              "flakectl_bench of that database, which must have flakectl installed;\n"
              "$FLAKECTL_DATABASE_URL is not read, so the bench never writes to a database nobody\n"
              "named for it. Every call is rolled back. Exit 1 when A and B leave different\n"
              "states, or when it refuses the database (one line `flakectl: error: ...`).")
    o.env_options_from(parser, add_arguments, {
        "dsn": {"env": "FLAKECTL_BENCH_DSN", "metavar": "DSN"},
        "uploads": {"type": o.positive_int, "env": "FLAKECTL_BENCH_UPLOADS"},
        "tests": {"type": o.positive_int},
        "repeat": {"type": o.positive_int},
        "seed": {"type": o.whole, "help": "random seed (same seed, same data)"},
    })


def run_cli(args: argparse.Namespace) -> int:
    from flakectl.errors import wrap_exceptions

    with wrap_exceptions():  # a refused connection: one line, not a traceback
        return run(args, out=sys.stdout, err=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flakectl.lab.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "run", "main", "measure", "Session", "SERVER_SETTINGS", "SIZES"]

if __name__ == "__main__":
    sys.exit(main())
