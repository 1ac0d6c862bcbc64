"""`flakectl demo`: flakectl's main job, on a throwaway PostgreSQL.

Starts a private server (flakectl.lab.pgserver), migrates it, and generates a
repository history whose truth it knows: N merged commits x M uploads x T
tests, a share of the tests genuinely flaky (each failing with its own
probability between 2% and 30%), one broken commit in which one healthy test
fails in every upload, and CI retries (a flaky failure followed by a passing
re-run in the same upload). The data is generated set-wise in SQL
(generate_series and a hash of the seed, so the same seed gives the same
rows). Then it verifies the broken commit and the last one against the
reference (rolled back), processes every commit in order through
`flakectl.process_commit`, and reports the flakes found against the truth and
the time per commit. Progress goes to stderr, the report to stdout. The
server and its files are gone afterwards, also after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TextIO

import psycopg

from flakectl import api
from flakectl.dba import migrate
from flakectl.dba import options as o
from flakectl.lab.pgserver import ThrowawayServer
from flakectl.dba.verify import Verification, verify_commit

REPO_ID = 1
MIN_P, MAX_P = 0.02, 0.30
RETRY_SHARE = 0.5  # of flaky failures, re-run (and passed) in the same upload


@dataclass(frozen=True)
class DemoSize:
    commits: int = 30
    uploads: int = 8
    tests: int = 3000
    flaky_share: float = 0.01
    seed: int = 1


@dataclass(frozen=True)
class Truth:
    """What the generator decided: flaky tests (number -> failure probability),
    and the broken commit with the test it breaks."""

    flaky: dict[int, float]
    broken_test: int
    broken_commit: int

    @classmethod
    def draw(cls, size: DemoSize) -> "Truth":
        rng = random.Random(size.seed)
        count = min(size.tests - 1, max(1, round(size.tests * size.flaky_share)))
        numbers = sorted(rng.sample(range(1, size.tests + 1), count))
        flaky = {n: round(rng.uniform(MIN_P, MAX_P), 3) for n in numbers}
        healthy = [n for n in range(1, size.tests + 1) if n not in flaky]
        return cls(flaky=flaky, broken_test=rng.choice(healthy),
                   broken_commit=(size.commits + 1) // 2)


@dataclass
class TestOutcome:
    """One flagged or flaky test, as the demo reports it."""

    __test__ = False  # not a pytest test class

    name: str
    true_p: float | None  # None: not flaky
    failures_in_data: int
    flakes: int = 0  # flake rows
    fail_count: int = 0  # over its rows
    count: int = 0
    open: bool = False

    @property
    def state(self) -> str:
        if not self.flakes:
            return "-"
        return "open" if self.open else "expired"


@dataclass
class DemoReport:
    size: DemoSize
    runs: int
    commits: list[str]
    tests: dict[int, TestOutcome]
    truth: Truth
    seconds_per_commit: list[float] = field(default_factory=list)
    verifications: list[tuple[int, Verification]] = field(default_factory=list)
    split: list[str] = field(default_factory=list)  # demo --split: what split did, what M reads
    split_identical: bool = True  # demo --split: M reads the flakes R holds

    @property
    def found(self) -> list[int]:
        return sorted(n for n in self.truth.flaky if self.tests[n].flakes)

    @property
    def missed(self) -> list[int]:
        return sorted(n for n in self.truth.flaky if not self.tests[n].flakes)

    @property
    def false_flags(self) -> list[int]:
        return sorted(n for n, t in self.tests.items()
                      if t.flakes and n not in self.truth.flaky and n != self.truth.broken_test)

    @property
    def verified(self) -> bool:
        return self.split_identical and all(v.identical for _, v in self.verifications)

    def as_json(self) -> dict:
        broken = self.tests[self.truth.broken_test]
        return {
            "size": asdict(self.size),
            "runs": self.runs,
            "flaky_tests": len(self.truth.flaky),
            "found": [self.tests[n].name for n in self.found],
            "missed": [self.tests[n].name for n in self.missed],
            "missed_never_failed": [self.tests[n].name for n in self.missed
                                    if not self.tests[n].failures_in_data],
            "falsely_flagged": [self.tests[n].name for n in self.false_flags],
            "broken": {"commit": self.truth.broken_commit, "test": broken.name,
                       "flakes": broken.flakes, "state": broken.state},
            "flakes": [{"test": t.name, "true_p": t.true_p, "fail_count": t.fail_count,
                        "count": t.count, "flakes": t.flakes, "state": t.state}
                       for t in self._flagged()],
            "verification": {str(c): v.as_json() for c, v in self.verifications},
            "seconds_per_commit": [round(s, 4) for s in self.seconds_per_commit],
            **({"split": self.split} if self.split else {}),
        }

    def _flagged(self) -> list[TestOutcome]:
        return sorted((t for t in self.tests.values() if t.flakes),
                      key=lambda t: (-t.fail_count, -t.count, t.name))

    def lines(self, top: int = 15) -> list[str]:
        s = self.size
        out = [f"flakectl demo: {s.commits} commits x {s.uploads} uploads x {s.tests:,} tests"
               f" = {self.runs:,} test runs (seed {s.seed})", ""]
        if self.split:
            out += ["split layout (two servers): main = commits, reports_*; runs = test runs, flakectl,"
                    " flakes", *[f"  {line}" for line in self.split], ""]
        flagged = self._flagged()
        out.append(f"flakes found: {len(flagged)} tests, most failing first")
        out.append(f"  {'fails':>5}  {'count':>5}  {'rows':>4}  {'state':<7}  {'truth':<10}  test")
        for t in flagged[:top]:
            truth = (f"p={t.true_p:.0%}" if t.true_p is not None
                     else "broken" if t is self.tests[self.truth.broken_test] else "healthy")
            out.append(f"  {t.fail_count:>5}  {t.count:>5}  {t.flakes:>4}  {t.state:<7}  {truth:<10}  {t.name}")
        if len(flagged) > top:
            out.append(f"  ... and {len(flagged) - top} more")

        never = [n for n in self.missed if not self.tests[n].failures_in_data]
        broken = self.tests[self.truth.broken_test]
        out += ["", "against the truth:",
                f"  genuinely flaky tests  {len(self.truth.flaky)}"
                f" (failure probability {MIN_P:.0%} to {MAX_P:.0%})",
                f"  found                  {len(self.found)}",
                f"  missed                 {len(self.missed)}"
                + (f" ({len(never)} never failed in the data, so nothing could find them)" if never else ""),
                f"  falsely flagged        {len(self.false_flags)}",
                f"  broken commit {self.truth.broken_commit}: {broken.name} failed in all {s.uploads}"
                f" uploads; flagged ({broken.state}{', healed after its passes' if broken.state == 'expired' else ''})"]
        out += ["", "verified against the reference (same transaction, rolled back):"]
        for commit, v in self.verifications:
            verdict = "identical" if v.identical else f"DIFFERENT ({len(v.differences)} differences)"
            out.append(f"  commit {commit:>3}: {verdict}: {v.got.uploads_processed} uploads,"
                       f" {v.got.testruns_considered} runs considered, {v.got.flakes_created} flakes created,"
                       f" {v.got.flakes_updated} updated, {v.got.flakes_expired} expired")
            out += [f"    {d}" for d in v.differences[:20]]
        times = sorted(self.seconds_per_commit)
        if times:
            out += ["", f"time per commit (process_commit, {s.uploads} uploads,"
                        f" ~{self.runs // max(1, s.commits):,} runs each):"
                        f" median {_ms(statistics.median(times))}, max {_ms(times[-1])},"
                        f" total {_ms(sum(times))} for {len(times)} commits"]
        return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


class Progress:
    """One updating line on a terminal; plain lines, fewer of them, elsewhere."""

    def __init__(self, err: TextIO):
        self.err = err
        self.tty = err.isatty()
        self.open_line = False

    def step(self, text: str) -> None:
        self.done()
        self.err.write(f"flakectl demo: {text} ...")
        self.err.flush()
        self.open_line = True
        self.started = time.perf_counter()

    def update(self, text: str, *, every: bool = False) -> None:
        if self.tty:
            self.err.write(f"\r\033[Kflakectl demo: {text}")
            self.err.flush()
            self.open_line = True
        elif every:
            self.done()
            self.err.write(f"flakectl demo: {text}\n")

    def done(self, result: str = "") -> None:
        if self.open_line:
            self.err.write(f" {result}\n" if result else "\n")
            self.err.flush()
            self.open_line = False

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:.1f} s"


# --------------------------------------------------------------------------
# Generating the history (set-wise)
# --------------------------------------------------------------------------

# uniform in [0, 1) from (seed, salt, a, b): 52 bits of hashint8extended
_RAND = ("((hashint8extended(({a})::bigint * 1000003 + ({b}) * 7 + {salt}, %(seed)s)"
         " & 4503599627370495)::float8 / 4503599627370496.0)")

_GENERATE = [
    """
    create temporary table demo_test as
    select t.n,
           decode(md5('demo-test-' || t.n), 'hex') as test_id,
           'test_case_' || t.n as name,
           'TestModule' || lpad((t.n / 40)::text, 3, '0') as classname,
           'tests/test_module_' || lpad((t.n / 40)::text, 3, '0') || '.py' as filename,
           coalesce(f.p, 0)::float8 as p
      from generate_series(1, %(tests)s) as t(n)
      left join unnest(%(flaky)s::int[], %(probs)s::float8[]) as f(n, p) on f.n = t.n
    """,
    """
    insert into commits (id, commitid, repoid, branch, merged, timestamp)
    select c, left(encode(sha256(convert_to('demo-' || %(seed)s || '-' || c, 'UTF8')), 'hex'), 40),
           %(repo)s, 'main', true, %(start)s + (c - 1) * %(spacing)s
      from generate_series(1, %(commits)s) as c
    """,
    """
    insert into reports_commitreport (id, commit_id, code, report_type)
    select c, c, null, 'test_results' from generate_series(1, %(commits)s) as c
    """,
    """
    insert into reports_upload (id, report_id, state, created_at)
    select (c - 1) * %(uploads)s + u, c, 'processed',
           %(start)s + (c - 1) * %(spacing)s + u * interval '1 minute'
      from generate_series(1, %(commits)s) as c, generate_series(1, %(uploads)s) as u
    """,
    # Every run of one upload shares the upload's timestamp (as in Codecov).
    f"""
    insert into ta_timeseries_testrun
      (timestamp, test_id, name, classname, testsuite, computed_name, outcome, duration_seconds,
       failure_message, framework, filename, repo_id, commit_sha, branch, flags, upload_id)
    select u.created_at, t.test_id, t.name, t.classname, 'demo', t.filename || '::' || t.name,
           case when x.fails then 'failure' when mod(t.n, 97) = 0 then 'skip' else 'pass' end,
           0.01 + mod(t.n, 50) / 100.0,
           case when x.fails then 'AssertionError: demo failure' end,
           'pytest', t.filename, %(repo)s, c.commitid, 'main', array['unit'], u.id
      from reports_upload u
      join commits c on c.id = u.report_id
      cross join demo_test t
      cross join lateral (
        select (c.id = %(broken_commit)s and t.n = %(broken_test)s)
               or (t.p > 0 and {_RAND.format(a="u.id", b="t.n", salt=0)} < t.p) as fails
      ) x
    """,
    # CI retries: some flaky failures are re-run in the same upload and pass.
    f"""
    insert into ta_timeseries_testrun
      (timestamp, test_id, name, classname, testsuite, computed_name, outcome, duration_seconds,
       failure_message, framework, filename, repo_id, commit_sha, branch, flags, upload_id)
    select r.timestamp, r.test_id, r.name, r.classname, r.testsuite, r.computed_name, 'pass',
           r.duration_seconds, null, r.framework, r.filename, r.repo_id, r.commit_sha, r.branch,
           r.flags, r.upload_id
      from ta_timeseries_testrun r
      join demo_test t on t.test_id = r.test_id
     where r.repo_id = %(repo)s and r.outcome = 'failure' and t.p > 0
       and {_RAND.format(a="r.upload_id", b="t.n", salt=1)} < %(retry)s
    """,
]


def _params(conn: psycopg.Connection, size: DemoSize, truth: Truth, span: timedelta | None = None) -> dict:
    # Keep every run inside the default one-day lookback, however many commits
    # (unless the commits are spread evenly over `span`).
    spacing = span / size.commits if span else min(timedelta(minutes=20), timedelta(hours=20) / size.commits)
    (now,) = conn.execute("select now()").fetchone()
    return {
        "tests": size.tests, "commits": size.commits, "uploads": size.uploads, "seed": size.seed,
        "repo": REPO_ID, "spacing": spacing, "start": now - spacing * size.commits - timedelta(hours=1),
        "flaky": list(truth.flaky), "probs": list(truth.flaky.values()),
        "broken_commit": truth.broken_commit, "broken_test": truth.broken_test, "retry": RETRY_SHARE,
    }


def generate(conn: psycopg.Connection, size: DemoSize, truth: Truth, *,
             span: timedelta | None = None) -> tuple[list[str], dict[int, TestOutcome], int]:
    """Write the history; the commit shas in order, the tests that fail or are flaky, the run count."""
    params = _params(conn, size, truth, span)
    with conn.transaction():
        for statement in _GENERATE:
            conn.execute(statement, params)
        shas = [sha for (sha,) in conn.execute("select commitid from commits where repoid = %s order by id",
                                              (REPO_ID,))]
        tests = {
            n: TestOutcome(name=f"{filename}::{name}", true_p=truth.flaky.get(n), failures_in_data=fails)
            for n, name, filename, fails in conn.execute(
                """
                select t.n, t.name, t.filename, count(r.test_id)
                  from demo_test t
                  left join ta_timeseries_testrun r
                    on r.repo_id = %(repo)s and r.test_id = t.test_id and r.outcome = 'failure'
                 where t.p > 0 or t.n = %(broken_test)s
                 group by t.n, t.name, t.filename
                """, params)
        }
        (runs,) = conn.execute("select count(*) from ta_timeseries_testrun where repo_id = %s",
                               (REPO_ID,)).fetchone()
    conn.execute("analyze")
    return shas, tests, runs


def read_flakes(conn: psycopg.Connection, tests: dict[int, TestOutcome]) -> None:
    """Fill in each flagged test's flake rows, from test_analytics_flake."""
    rows = conn.execute(
        """
        select d.n, count(*), sum(f.fail_count), sum(f.count), bool_or(f.end_date is null)
          from test_analytics_flake f
          join demo_test d on d.test_id = f.test_id
         where f.repoid = %s
         group by d.n
        """, (REPO_ID,)).fetchall()
    for n, flakes, fail_count, count, is_open in rows:
        test = tests.setdefault(n, TestOutcome(name=f"test #{n}", true_p=None, failures_in_data=0))
        test.flakes, test.fail_count, test.count, test.open = flakes, fail_count, count, is_open


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------


def run_demo(size: DemoSize, *, json_output: bool, out: TextIO, err: TextIO, split: bool = False) -> int:
    """Run the whole demo; 0, or 1 when the function and the reference disagree
    (or, with `split`, when the main database does not read the runs database's flakes)."""
    truth = Truth.draw(size)
    progress = Progress(err)
    if split:
        try:
            report = _run_split(size, truth, progress)
        finally:
            progress.done()
        return _report(report, json_output, out)
    try:
        progress.step("starting a throwaway PostgreSQL")
        with ThrowawayServer() as server:
            progress.done(f"PostgreSQL {server.version} ({progress.elapsed()})")
            _install(server.url, progress, "installing flakectl (flakectl db upgrade)")
            with psycopg.connect(server.url, autocommit=True) as conn:
                report = _run(conn, size, truth, progress)
            progress.step("stopping the server and deleting its files")
        progress.done("done")
    finally:
        progress.done()
    return _report(report, json_output, out)


def _install(url: str, progress: Progress, what: str) -> None:
    progress.step(what)
    migrate.upgrade(url)
    progress.done(f"at {migrate.head()} ({progress.elapsed()})")


def _report(report: DemoReport, json_output: bool, out: TextIO) -> int:
    if json_output:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        out.write("\n".join(report.lines()) + "\n")
    return 0 if report.verified else 1


def _run_split(size: DemoSize, truth: Truth, progress: Progress) -> DemoReport:
    """The demo in Codecov's split layout: the history generated in the main
    database M (a one-database deployment), `flakectl split` to a runs database R
    on a second server, the runs moved to R (where Codecov keeps them), every
    commit processed in R, and M reading the same flakes through the link."""
    from flakectl.dba.split import FLAKE, split

    progress.step("starting two throwaway PostgreSQL servers (main, runs)")
    with ThrowawayServer() as main_server, ThrowawayServer() as runs_server:
        progress.done(f"PostgreSQL {main_server.version} ({progress.elapsed()})")
        _install(main_server.url, progress, "installing flakectl in the main database (a one-database deployment)")
        with psycopg.connect(main_server.url, autocommit=True) as m:
            history = _generate(m, size, truth, progress)
            before = truth.broken_commit - 1  # the broken commit is verified in the runs database
            first = "no commit" if before == 0 else "commit 1" if before == 1 else f"commits 1-{before}"
            progress.step(f"processing {first} in the main database (one database)")
            for sha in history[0][:before]:
                api.process_commit(m, REPO_ID, sha)
            progress.done(f"({progress.elapsed()})")
            progress.step("flakectl split --main-dsn MAIN --runs-dsn RUNS")
            lines = [f"{first} processed in the main database before the split"]
            split(main_server.url, runs_server.url, out=lines.append)
            progress.done(f"({progress.elapsed()})")
            with psycopg.connect(runs_server.url, autocommit=True) as r:
                progress.step("moving the test runs to the runs database")
                columns = [c for (c,) in m.execute(
                    "select attname from pg_attribute where attrelid = 'ta_timeseries_testrun'::regclass"
                    " and attnum > 0 and not attisdropped order by attnum")]
                listed = ", ".join(columns)
                with m.cursor().copy(f"copy ta_timeseries_testrun ({listed}) to stdout") as source, \
                        r.cursor().copy(f"copy ta_timeseries_testrun ({listed}) from stdin") as target:
                    for data in source:
                        target.write(data)
                m.execute("truncate ta_timeseries_testrun")
                r.execute("analyze")
                progress.done(f"{history[2]:,} runs ({progress.elapsed()})")
                r.execute(_GENERATE[0], _params(r, size, truth))  # the test names, for the report
                report = _run(r, size, truth, progress, history)
                query = (f"select count(*), md5(coalesce(string_agg(f::text, ',' order by id), ''))"
                         f" from {FLAKE} f")
                in_runs, in_main = r.execute(query).fetchone(), m.execute(query).fetchone()
                (ledger,) = r.execute("select count(*) from flakectl.processed_upload").fetchone()
        progress.step("stopping the servers and deleting their files")
    progress.done("done")
    uploads = size.commits * size.uploads
    report.split = [*lines,
                    f"every commit processed in the runs database: the ledger holds {ledger} of {uploads}"
                    f" uploads, each once (those of {first} skipped: the ledger moved)",
                    f"the main database reads {in_main[0]} flakes (md5 {in_main[1]}) through the link: "
                    + ("the same as the runs database" if in_main == in_runs
                       else f"DIFFERENT from the runs database's {in_runs[0]} (md5 {in_runs[1]})")]
    report.split_identical = in_main == in_runs and ledger == uploads
    return report


def _generate(conn: psycopg.Connection, size: DemoSize, truth: Truth, progress: Progress):  # noqa: ANN202
    progress.step(f"generating {size.commits} commits x {size.uploads} uploads x {size.tests:,} tests")
    history = generate(conn, size, truth)
    progress.done(f"{history[2]:,} runs ({progress.elapsed()})")
    return history


def _run(conn: psycopg.Connection, size: DemoSize, truth: Truth, progress: Progress,
         history: tuple | None = None) -> DemoReport:
    shas, tests, runs = history or _generate(conn, size, truth, progress)

    report = DemoReport(size=size, runs=runs, commits=shas, tests=tests, truth=truth)
    to_verify = sorted({truth.broken_commit, size.commits})
    every = max(1, size.commits // 10)
    started = time.perf_counter()
    for number, sha in enumerate(shas, start=1):
        if number in to_verify:
            progress.update(f"commit {number}/{size.commits}: verifying against the reference", every=True)
            report.verifications.append((number, verify_commit(conn, REPO_ID, sha)))
        began = time.perf_counter()
        api.process_commit(conn, REPO_ID, sha)
        report.seconds_per_commit.append(time.perf_counter() - began)
        bar = "#" * (20 * number // size.commits)
        progress.update(f"processing commits [{bar:<20}] {number}/{size.commits},"
                        f" last {_ms(report.seconds_per_commit[-1])}",
                        every=number % every == 0 or number == size.commits)
    progress.done()
    progress.err.write(f"flakectl demo: processed {size.commits} commits in"
                       f" {time.perf_counter() - started:.1f} s\n")
    read_flakes(conn, tests)
    return report


# --------------------------------------------------------------------------
# `flakectl demo`
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl demo\n"
                      "  flakectl demo --commits 4 --uploads 3 --tests 200   # a small one\n"
                      "  flakectl demo --split   # Codecov's split layout, on two servers\n\n"
                      "Needs the PostgreSQL server binaries (initdb, postgres; FLAKECTL_PG_BIN); leaves\n"
                      "no server or files behind, also on Ctrl-C.")
    o.option(parser, "--commits", type=o.positive_int, default=30, metavar="N", help="merged commits")
    o.option(parser, "--uploads", type=o.positive_int, default=8, metavar="N", env="FLAKECTL_DEMO_UPLOADS",
             help="uploads (CI jobs) per commit")
    o.option(parser, "--tests", type=o.positive_int, default=3000, metavar="N", help="tests per upload")
    o.option(parser, "--flaky-share", type=o.share, default=0.01, metavar="X",
             help="share of tests that are genuinely flaky")
    o.option(parser, "--seed", type=o.whole, default=1, metavar="N", help="random seed (same seed, same data)")
    o.option(parser, "--split", switch=True,
             help="Codecov's split layout: two servers, `flakectl split`, processed in the runs database")
    o.json_flag(parser)


def run(args: argparse.Namespace) -> int:
    size = DemoSize(commits=args.commits, uploads=args.uploads, tests=args.tests,
                    flaky_share=args.flaky_share, seed=args.seed)
    return run_demo(size, json_output=args.json, out=sys.stdout, err=sys.stderr, split=args.split)
