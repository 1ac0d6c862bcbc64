"""`flakectl bench --fleet`: K workers process a stream of commits of mixed
sizes, one repository each, with the function (A) and with the worker's path (B).

The stream: `--fleet-commits` commits drawn from a fixed distribution of
sizes (FLEET_CLASSES: most commits small, a few large; the counts are the
shares rounded, at least one of each class), in an order shuffled by the
seed, each commit of a repository of its own, realistic failures (1% of its
tests flaky, half of the failures retried, a few open flakes), plus
`--other-rows` runs of older commits of the same repositories.

For each K in `--fleet-k` (default 1, 2, 4, 8) and each path, K worker
processes (processes, not threads: B's state machine is Python and would
serialise on the GIL) take the stream's commits from one queue in order;
each commit is one transaction, rolled back (so every run starts from the
same data; a worker would commit), timed at the client from BEGIN to the end
of ROLLBACK. Between runs an untimed VACUUM. Reported per run: commits per
second over the run's wall time (first BEGIN to last ROLLBACK), the
latencies' p50/p95/p99/max, and what a sampler saw: every ~5 ms it reads
pg_stat_activity for the workers' backends (each names its commit's
repository in application_name) and, for a backend waiting on a heavyweight
lock, the repositories of the backends blocking it (pg_blocking_pids). Every
commit has its own repository, so any lock wait between workers is a wait
between different repositories, and there must be none on the data
(advisory, row, transaction, relation locks). Waits on a relation's
extension lock are counted apart: PostgreSQL lets one backend at a time add
pages to a table's file, so two calls writing new row versions of the same
table (marking, new flakes) can wait for each other there for the moment the
file grows, whatever rows or repositories they write. A wait whose blocker is no
fleet worker (autovacuum truncating a table, or a wait over before
pg_blocking_pids looked) is counted apart too. A and B must report
the same counters per commit (flakes created, updated, expired, runs
marked); the single-commit bench compares the full states.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg

from flakectl.lab import benchdata, workerpath
from flakectl.lab.benchdata import FleetCommit

#: (size class, share of the commits in %, uploads, tests per upload)
FLEET_CLASSES = (
    ("tiny", 60, 1, 200),
    ("small", 25, 2, 1_000),
    ("medium", 12, 5, 5_000),
    ("large", 3, 20, 20_000),
)
FLEET_K = (1, 2, 4, 8)
#: times each path processes the stream in one run: A's run is ~30x shorter,
#: so it goes round five times to be measured over a comparable wall time
ROUNDS = {"A": 5, "B": 1}
SAMPLE_SECONDS = 0.005
_APP = "flakectl-fleet"
_SAMPLE = f"""
select a.application_name, a.wait_event_type, a.wait_event,
       case when a.wait_event_type = 'Lock' then
         array(select b.application_name from pg_stat_activity b
                where b.pid = any(pg_blocking_pids(a.pid)))
       end
  from pg_stat_activity a
 where a.application_name like '{_APP} repo=%%' and a.state = 'active'
"""


def stream(commits: int, seed: int) -> list[FleetCommit]:
    """The fleet's commits: FLEET_CLASSES' shares of `commits`, shuffled by `seed`."""
    sizes: list[tuple[str, int, int]] = []
    for name, share, uploads, tests in FLEET_CLASSES:
        sizes += [(name, uploads, tests)] * max(1, round(commits * share / 100))
    random.Random(seed).shuffle(sizes)
    return [FleetCommit(i, name, uploads, tests) for i, (name, uploads, tests) in enumerate(sizes)]


@dataclass
class Run:
    k: int
    path: str
    wall: float
    latencies: dict[tuple[int, int], float]  # (round, commit index) -> seconds
    summaries: dict[int, tuple]  # commit index -> counters
    samples: int = 0
    waits: Counter = field(default_factory=Counter)  # "type:event" -> samples
    lock_same_repo: int = 0
    lock_other_repo: int = 0  # on a lock of the data (advisory, row, transaction, relation)
    extend_other_repo: int = 0  # on a relation's extension lock: the table's file growing
    lock_other_backend: int = 0  # blocked by no fleet worker (autovacuum, a wait already over)
    lock_details: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall

    def quantile(self, q: float) -> float:
        values = sorted(self.latencies.values())
        if len(values) == 1:
            return values[0]
        # inclusive linear interpolation, as statistics.quantiles(method="inclusive")
        pos = q * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    def as_json(self) -> dict:
        return {
            "k": self.k, "path": self.path, "commits": len(self.latencies), "rounds": ROUNDS[self.path], "wall_s": round(self.wall, 4),
            "commits_per_s": round(self.throughput, 3),
            "p50_ms": round(self.quantile(0.5) * 1000, 2), "p95_ms": round(self.quantile(0.95) * 1000, 2),
            "p99_ms": round(self.quantile(0.99) * 1000, 2),
            "max_ms": round(max(self.latencies.values()) * 1000, 2),
            "samples": self.samples, "wait_events": dict(self.waits),
            "lock_waits_same_repo": self.lock_same_repo, "lock_waits_other_repo": self.lock_other_repo,
            "extend_waits_other_repo": self.extend_other_repo,
            "lock_waits_other_backend": self.lock_other_backend,
            "lock_wait_details": self.lock_details[:20],
        }


def _worker(url: str, path: str, tasks, results, start) -> None:  # runs in a child process
    conn = psycopg.connect(url, autocommit=True, prepare_threshold=None)
    benchdata.use_schema(conn)
    # the process_commit the single-commit bench calls: a private copy in the scratch
    # schema if the bench installed one there, else flakectl's
    (schema,) = conn.execute(
        "select n.nspname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where p.proname = 'process_commit' and n.nspname in (%s, 'flakectl')"
        " order by n.nspname = %s desc limit 1", (benchdata.SCHEMA, benchdata.SCHEMA)).fetchone()
    function = f"select * from {schema}.process_commit(%(repo)s, %(sha)s)"  # one of two known names
    conn.execute("select set_config('application_name', %s, false)", (f"{_APP} idle",))
    results.put(("ready", None, None, None, None))
    start.wait()
    while (item := tasks.get()) is not None:
        round_, index, repo, sha = item
        conn.execute("select set_config('application_name', %s, false)", (f"{_APP} repo={repo}",))
        began = time.perf_counter()
        conn.execute("begin")
        try:
            if path == "A":
                row = conn.execute(function, {"repo": repo, "sha": sha}).fetchone()
                # flakectl.summary: uploads_processed, uploads_skipped, testruns_considered,
                # flakes_created, flakes_updated, flakes_expired, testruns_marked
                summary = (row[0], row[3], row[4], row[5], row[6])
            else:
                r = workerpath.process_commit(conn, repo, sha)
                summary = (r.uploads, r.flakes_created, r.flakes_updated, r.flakes_expired, r.testruns_marked)
        finally:
            conn.execute("rollback")
        ended = time.perf_counter()
        results.put(("done", (round_, index), began, ended, summary))
    conn.close()
    results.put(("exit", None, None, None, None))


class _Sampler:
    def __init__(self, url: str, run: Run):
        self.conn = psycopg.connect(url, autocommit=True, prepare_threshold=None)
        self.run = run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            for app, wtype, wevent, blockers in self.conn.execute(_SAMPLE).fetchall():
                self.run.samples += 1
                if wtype:
                    self.run.waits[f"{wtype}:{wevent}"] += 1
                if wtype == "Lock":
                    for blocker in blockers or [None]:
                        if blocker == app:
                            self.run.lock_same_repo += 1
                        elif not (blocker or "").startswith(f"{_APP} repo="):
                            # not another call: autovacuum, or the blocker gone by the time
                            # pg_blocking_pids looked
                            self.run.lock_other_backend += 1
                        elif wevent == "extend":
                            # PostgreSQL lets one backend at a time add pages to a table: two
                            # calls writing new row versions wait for it, whatever the rows
                            self.run.extend_other_repo += 1
                        else:
                            self.run.lock_other_repo += 1
                            self.run.lock_details.append(f"{app} waits ({wevent}) for {blocker}")

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()


def run_fleet(url: str, commits: list[FleetCommit], k: int, path: str) -> Run:
    """One run: K worker processes over the whole stream, in stream order."""
    ctx = multiprocessing.get_context("spawn")  # no inherited connections
    tasks, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    for round_ in range(ROUNDS[path]):
        for c in commits:
            tasks.put((round_, c.index, c.repo, c.sha))
    for _ in range(k):
        tasks.put(None)
    workers = [ctx.Process(target=_worker, args=(url, path, tasks, results, start), daemon=True)
               for _ in range(k)]
    for w in workers:
        w.start()
    try:
        for _ in range(k):
            kind, *_rest = results.get(timeout=120)
            if kind != "ready":
                raise RuntimeError(f"fleet worker: unexpected {kind}")
        run = Run(k, path, 0.0, {}, {})
        spans = []
        with _Sampler(url, run):
            start.set()
            exited = 0
            while exited < k:
                kind, index, began, ended, summary = results.get(timeout=3600)
                if kind == "exit":
                    exited += 1
                elif kind == "done":
                    run.latencies[index] = ended - began
                    if run.summaries.setdefault(index[1], summary) != summary:
                        raise RuntimeError(f"fleet: commit {index[1]} gave {summary}, then {run.summaries[index[1]]}")
                    spans.append((began, ended))
        run.wall = max(e for _, e in spans) - min(b for b, _ in spans)
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
    if len(run.latencies) != len(commits) * ROUNDS[path]:
        raise RuntimeError(f"fleet: {len(run.latencies)} of {len(commits) * ROUNDS[path]} commits processed")
    return run


def fleet(url: str, commits: list[FleetCommit], ks: tuple[int, ...], *, say=lambda s: None) -> list[Run]:
    runs = []
    with psycopg.connect(url, autocommit=True) as admin:
        benchdata.use_schema(admin)
        for k in ks:
            for path in ("A", "B"):
                admin.execute(f"vacuum {benchdata.SCHEMA}.ta_timeseries_testrun,"
                              f" {benchdata.SCHEMA}.test_analytics_flake")
                say(f"fleet: K={k}, {path}")
                runs.append(run_fleet(url, commits, k, path))
    return runs


def problems(runs: list[Run]) -> list[str]:
    out = []
    a = next(r for r in runs if r.path == "A")
    for r in runs:
        for index, summary in r.summaries.items():
            if summary != a.summaries[index]:
                out.append(f"commit {index}: {r.path} at K={r.k} reports {summary}, A at K={a.k} {a.summaries[index]}")
        if r.lock_other_repo:
            out.append(f"{r.path} at K={r.k}: {r.lock_other_repo} lock-wait samples between different"
                       f" repositories: {'; '.join(r.lock_details[:3])}")
    return out


def describe(commits: list[FleetCommit], other_rows: int, seed: int, runs: list[Run]) -> list[str]:
    by_class = Counter(c.size for c in commits)
    classes = ", ".join(f"{by_class[name]} {name} ({uploads} x {tests:,})"
                        for name, _, uploads, tests in FLEET_CLASSES)
    total = sum(c.runs for c in commits)
    out = [f"fleet: {len(commits)} commits, one repository each: {classes}; {total:,} runs"
           f" (+{other_rows:,} other rows; order shuffled, seed {seed})",
           "each commit one transaction, rolled back, timed at the client from BEGIN to the end of"
           " ROLLBACK; per run A processes the stream "
           f"{ROUNDS['A']} times, B {ROUNDS['B']} time(s); commits/s over the run's wall time;"
           f" pg_stat_activity sampled every {SAMPLE_SECONDS * 1000:.0f} ms",
           "",
           "| K | path | commits | commits/s | p50 ms | p95 ms | p99 ms | max ms | wall s | active samples"
           " | lock waits, same repo | lock waits, other repo | extension-lock waits, other repo"
           " | lock waits on no worker | wait events sampled |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        waits = ", ".join(f"{name} {n}" for name, n in r.waits.most_common(4)) or "none"
        out.append(f"| {r.k} | {r.path} | {len(r.latencies)} | {r.throughput:,.1f} | {r.quantile(0.5) * 1000:,.1f}"
                   f" | {r.quantile(0.95) * 1000:,.1f} | {r.quantile(0.99) * 1000:,.1f}"
                   f" | {max(r.latencies.values()) * 1000:,.1f} | {r.wall:,.2f} | {r.samples:,}"
                   f" | {r.lock_same_repo} | {r.lock_other_repo} | {r.extend_other_repo}"
                   f" | {r.lock_other_backend} | {waits} |")
    out += ["", "| K | A commits/s | B commits/s | A/B throughput |", "|---:|---:|---:|---:|"]
    for k in sorted({r.k for r in runs}):
        a = next(r for r in runs if r.k == k and r.path == "A")
        b = next(r for r in runs if r.k == k and r.path == "B")
        out.append(f"| {k} | {a.throughput:,.1f} | {b.throughput:,.1f} | {a.throughput / b.throughput:,.1f}x |")
    return out


__all__ = ["FLEET_CLASSES", "FLEET_K", "Run", "describe", "fleet", "problems", "run_fleet", "stream"]
