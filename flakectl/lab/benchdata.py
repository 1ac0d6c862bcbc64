"""The benchmark's data: one large commit, generated set-wise in SQL.

Everything lives in a scratch schema, `flakectl_bench`, holding its own
copies of the Codecov tables (`create table ... (like <codecov schema>.X
including all)`: same columns, defaults, identity and indexes, flakectl's
partial unique index included). flakectl's functions name the recorded
Codecov schema and flakectl's own objects by name (revision 0005), so the
bench installs a private copy of head's bodies in the scratch schema
(`install_functions`): the same templates, rendered for `flakectl_bench`,
with flakectl's ledger and types copied there too. The worker path (B) and
the read floor (C) name the tables unqualified and run with
`search_path = flakectl_bench, public`.

The commit: `uploads` uploads x `tests` tests, all runs of an upload sharing
one timestamp, inside the default one-day window. Randomness is a hash of
(seed, salt, a, b), so the same seed gives the same rows whatever the plan.
Shapes:

* realistic: 1% of tests (or `flaky_tests`) flaky, each failing with its own
  probability between 2% and 30%; half of the failures are retried (a
  passing re-run in the same upload, same timestamp); every other test
  passes (1 in 97 is skipped).
* uniform: every run fails with probability 0.5% (the worst case for
  "only the rows that matter": failures are spread over every test).
* storm: a broken commit, 30% of runs fail.

Every shape also has `open_flakes` open flakes (half of them on flaky tests,
the rest on tests that only pass here, so those expire in this commit;
some carry a flags_id), expired history flakes, another repository's open
flakes on the same test ids, and `other_rows` runs of other commits of the
repository (older, partly outside the window) and of other repositories.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psycopg
from psycopg import sql

from flakectl import sqlfiles

SCHEMA = "flakectl_bench"
TABLES = ("commits", "reports_commitreport", "reports_upload", "ta_timeseries_testrun",
          "test_analytics_flake")
#: An unusual repository id: the function's advisory lock on it never blocks a real worker.
REPO_ID = 900000001
COMMIT_SHA = "bench0000000000000000000000000000000000"
#: Upload ids far above any real one, so the real ledger never holds them.
UPLOAD_BASE = 9_000_000_000_000_000_000
OTHER_UPLOAD_BASE = UPLOAD_BASE + 1_000_000
OTHER_TESTS_PER_UPLOAD = 20_000
SHAPES = ("realistic", "uniform", "storm")
FAILURE_P = {"uniform": 0.005, "storm": 0.30}
MIN_P, MAX_P = 0.02, 0.30


@dataclass(frozen=True)
class Workload:
    shape: str = "realistic"
    uploads: int = 50
    tests: int = 20_000
    flaky_tests: int | None = None  # realistic only; default 1% of tests
    open_flakes: int = 200
    other_rows: int = 1_000_000
    seed: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r} (one of {', '.join(SHAPES)})")
        if self.uploads < 1 or self.tests < 1:
            raise ValueError("uploads and tests must be at least 1")

    @property
    def flaky(self) -> int:
        if self.shape != "realistic":
            return 0
        if self.flaky_tests is not None:
            return min(self.flaky_tests, self.tests)
        return max(1, round(self.tests / 100))

    @property
    def upload_ids(self) -> list[int]:
        return [UPLOAD_BASE + u for u in range(1, self.uploads + 1)]

    def as_json(self) -> dict:
        return {**asdict(self), "flaky_tests": self.flaky}


def _params(w: Workload) -> dict:
    flaky = w.flaky
    first_open = flaky // 2 + 1  # half the open flakes on flaky tests, half on passing ones
    return {
        "repo": REPO_ID, "sha": COMMIT_SHA, "seed": w.seed, "uploads": w.uploads, "tests": w.tests,
        "flaky": flaky, "fail_p": FAILURE_P.get(w.shape, 0.0), "min_p": MIN_P, "max_p": MAX_P,
        "retry": 0.5 if w.shape == "realistic" else 0.0,
        "open_lo": first_open, "open_hi": min(w.tests, first_open + w.open_flakes - 1),
        "other": w.other_rows, "other_per_upload": OTHER_TESTS_PER_UPLOAD,
        "base": UPLOAD_BASE, "other_base": OTHER_UPLOAD_BASE, "n": 1,
    }


# rand(a, b, salt): uniform in [0, 1), from 52 bits of a seeded hash
_RAND_FUNCTION = """
create function flakectl_bench.rand(a bigint, b bigint, salt integer, seed bigint)
returns float8 language sql immutable parallel safe
as $$ select (hashint8extended(a, hashint8extended(b, seed * 101 + salt)) & 4503599627370495)::float8
             / 4503599627370496.0 $$
"""

_INSERT_RUNS = """
    insert into ta_timeseries_testrun
      (timestamp, test_id, name, classname, testsuite, computed_name, outcome, duration_seconds,
       failure_message, framework, filename, repo_id, commit_sha, branch, flags, upload_id)
"""
# CI retries: a passing re-run of some failures of the commit(s), same upload,
# same timestamp (run before the other commits' rows exist)
_RETRIES = _INSERT_RUNS + """
    select r.timestamp, r.test_id, r.name, r.classname, r.testsuite, r.computed_name, 'pass',
           r.duration_seconds, null, r.framework, r.filename, r.repo_id, r.commit_sha, r.branch,
           r.flags, r.upload_id
      from ta_timeseries_testrun r
      join bench_test t on t.test_id = r.test_id
     where r.upload_id < %(other_base)s and r.outcome in ('failure', 'error')
       and flakectl_bench.rand(r.upload_id, t.n, 2, %(seed)s) < %(retry)s
"""
# other commits (ids above %(n)s, the bench's own commits): 1%% failures
_OTHER_RUNS = _INSERT_RUNS + """
    select c.timestamp, t.test_id, t.name, t.classname, 'bench', t.filename || '::' || t.name,
           case when flakectl_bench.rand(u.id, t.n, 3, %(seed)s) < 0.01 then 'failure' else 'pass' end,
           0.01 + (t.n %% 50) / 100.0, null, 'pytest', t.filename, c.repoid, c.commitid, 'main',
           array['unit'], u.id
      from reports_upload u
      join commits c on c.id = u.report_id
      cross join lateral (
        select * from bench_test t
         where t.n <= least(%(other_per_upload)s, %(other)s - (c.id - %(n)s - 1) * %(other_per_upload)s)
      ) t
     where u.report_id > %(n)s
"""

_GENERATE = [
    """
    create temporary table bench_test on commit drop as
    select t.n,
           sha256(convert_to('bench-test-' || t.n, 'UTF8')) as test_id,
           'test_case_' || t.n as name,
           'TestModule' || lpad((t.n / 40)::text, 4, '0') as classname,
           'tests/test_module_' || lpad((t.n / 40)::text, 4, '0') || '.py' as filename,
           case when t.n <= %(flaky)s
                then %(min_p)s + (%(max_p)s - %(min_p)s) * flakectl_bench.rand(t.n, 0, 0, %(seed)s)
                else %(fail_p)s end as p
      from generate_series(1, greatest(%(tests)s, %(other_per_upload)s)) as t(n)
    """,
    # commit 1 is the bench commit; commit k + 1 holds other upload k
    """
    insert into commits (id, commitid, repoid, branch, merged, timestamp)
    select 1, %(sha)s, %(repo)s, 'main', true, now() - interval '3 hours'
    union all
    select k + 2, md5('bench-other-' || k), case when k %% 2 = 0 then %(repo)s else %(repo)s + 1 + k %% 5 end,
           'main', true, now() - interval '4 hours' - k * interval '1 hour'
      from generate_series(0, ceil(%(other)s::numeric / %(other_per_upload)s)::int - 1) as k
    """,
    "insert into reports_commitreport (id, commit_id, code, report_type)"
    " select id, id, null, 'test_results' from commits",
    """
    insert into reports_upload (id, report_id, state, created_at)
    select %(base)s + u, 1, 'processed', now() - interval '3 hours' + u * interval '1 minute'
      from generate_series(1, %(uploads)s) as u
    union all
    select %(other_base)s + id - 2, id, 'processed', timestamp from commits where id > 1
    """,
    # the commit: every test once per upload, at the upload's timestamp
    _INSERT_RUNS + """
    select u.created_at, t.test_id, t.name, t.classname, 'bench', t.filename || '::' || t.name,
           case when x.r < t.p then (case when x.r < t.p / 10 then 'error' else 'failure' end)
                when t.n %% 97 = 0 then 'skip' else 'pass' end,
           0.01 + (t.n %% 50) / 100.0,
           case when x.r < t.p then 'AssertionError: bench failure' end,
           'pytest', t.filename, %(repo)s, %(sha)s, 'main', array['unit'], u.id
      from reports_upload u
      cross join bench_test t
      cross join lateral (select flakectl_bench.rand(u.id, t.n, 1, %(seed)s) as r) x
     where u.report_id = 1 and t.n <= %(tests)s
    """,
    _RETRIES,
    _OTHER_RUNS,
    # open flakes: rpc 0..29, some with flags; half on flaky tests, half on passing ones
    """
    insert into test_analytics_flake
      (repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
    select %(repo)s, t.test_id,
           case when t.n %% 3 = 0 then sha256(convert_to('flags-' || t.n, 'UTF8')) end,
           x.rpc, x.rpc + x.fails, x.fails, now() - interval '2 days' - t.n * interval '1 second', null
      from bench_test t
      cross join lateral (
        select floor(30 * flakectl_bench.rand(t.n, 0, 4, %(seed)s))::int as rpc,
               1 + floor(20 * flakectl_bench.rand(t.n, 0, 5, %(seed)s))::int as fails
      ) x
     where t.n between %(open_lo)s and %(open_hi)s
    """,
    # history (expired) flakes, and another repository's open flakes on the same tests
    """
    insert into test_analytics_flake
      (repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
    select %(repo)s, t.test_id, null::bytea, 30, 35, 5, now() - interval '6 days', now() - interval '5 days'
      from bench_test t where t.n <= greatest(%(flaky)s, 100) and t.n <= %(tests)s
    union all
    select %(repo)s + 1, t.test_id, null, 3, 5, 2, now() - interval '2 days', null
      from bench_test t where t.n <= greatest(%(flaky)s, 100) and t.n <= %(tests)s
    """,
]


def create_schema(conn: psycopg.Connection, codecov_schema: str = "public") -> None:
    """(Re)create the scratch schema with empty copies of the Codecov tables
    and a private copy of head's functions."""
    conn.execute(f"drop schema if exists {SCHEMA} cascade")
    conn.execute(f"create schema {SCHEMA}")
    for table in TABLES:
        conn.execute(sql.SQL("create table {} (like {} including all)").format(
            sql.Identifier(SCHEMA, table), sql.Identifier(codecov_schema, table)))
    conn.execute(_RAND_FUNCTION)
    install_functions(conn)


def install_functions(conn: psycopg.Connection) -> None:
    """head's bodies (the newest file of each function) in the scratch schema:
    rendered for its tables, and `flakectl.` (ledger, types, functions) read
    as `flakectl_bench.`; the ledger and the types copied from flakectl's."""
    conn.execute(f"create table {SCHEMA}.processed_upload (like flakectl.processed_upload including all)")
    # every composite type of flakectl's, in creation order (one may use another)
    types = conn.execute(
        "select t.typname from pg_type t join pg_class c on c.oid = t.typrelid"
        " where t.typnamespace = 'flakectl'::regnamespace and c.relkind = 'c' order by t.oid").fetchall()
    for (type_name,) in types:
        columns = conn.execute(
            "select string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod), ', '"
            "                  order by a.attnum)"
            "  from pg_attribute a where a.attrelid = (select typrelid from pg_type where oid = %s::regtype)"
            "   and a.attnum > 0 and not a.attisdropped", (f"flakectl.{type_name}",)).fetchone()[0]
        conn.execute(f"create type {SCHEMA}.{type_name} as ({columns.replace('flakectl.', f'{SCHEMA}.')})")
    for name, numbers in sqlfiles.versions().items():
        version = numbers[-1]
        text = sqlfiles.body(name, version)
        if sqlfiles.is_template(name, version):
            text = sqlfiles.render(text, SCHEMA)
        conn.execute(text.replace("flakectl.", f"{SCHEMA}."))


def drop_schema(conn: psycopg.Connection) -> None:
    conn.execute(f"drop schema if exists {SCHEMA} cascade")


def use_schema(conn: psycopg.Connection) -> None:
    """Point this session's unqualified table names at the scratch copies."""
    conn.execute(f"set search_path = {SCHEMA}, public")


def generate(conn: psycopg.Connection, workload: Workload) -> None:
    """Empty the scratch tables and write `workload` into them (autocommit
    connection, search_path set by use_schema). The testrun indexes are
    dropped while loading and rebuilt from their own definitions."""
    _load(conn, _GENERATE, _params(workload))


# --------------------------------------------------------------------------
# The fleet: many repositories, one commit each, of mixed sizes
# --------------------------------------------------------------------------

#: The fleet's repositories: FLEET_REPO_BASE + i for commit i (one commit each).
FLEET_REPO_BASE = 910000000
#: Upload ids of fleet commit i: UPLOAD_BASE + FLEET_UPLOAD_STRIDE * (i + 1) + u, u = 1..uploads.
FLEET_UPLOAD_STRIDE = 100
FLEET_OPEN_FLAKES = 5  # open flakes per repository before its commit


@dataclass(frozen=True)
class FleetCommit:
    index: int
    size: str  # the size class's name
    uploads: int
    tests: int

    @property
    def repo(self) -> int:
        return FLEET_REPO_BASE + self.index

    @property
    def sha(self) -> str:
        return f"fleet{self.index:035d}"

    @property
    def runs(self) -> int:
        return self.uploads * self.tests


_FLEET = [
    _GENERATE[0],  # the tests, every one with a flaky test's p (c.flaky picks the flaky ones)
    # the fleet's commits: realistic, 1%% of each commit's tests flaky (at least one)
    """
    create temporary table fleet_commit on commit drop as
    select (c.i0 - 1)::int as i, %(repo_base)s + c.i0 - 1 as repo,
           'fleet' || lpad((c.i0 - 1)::text, 35, '0') as sha,
           c.uploads, c.tests, greatest(1, round(c.tests / 100.0))::int as flaky
      from unnest(%(commit_uploads)s::int[], %(commit_tests)s::int[]) with ordinality as c(uploads, tests, i0)
    """,
    # commit i + 1 is fleet commit i; the other commits follow, each of a fleet repository
    """
    insert into commits (id, commitid, repoid, branch, merged, timestamp)
    select i + 1, sha, repo, 'main', true, now() - interval '3 hours' from fleet_commit
    union all
    select %(n)s + 1 + k, md5('bench-other-' || k), %(repo_base)s + k %% %(n)s, 'main', true,
           now() - interval '4 hours' - k * interval '1 hour'
      from generate_series(0, ceil(%(other)s::numeric / %(other_per_upload)s)::int - 1) as k
    """,
    "insert into reports_commitreport (id, commit_id, code, report_type)"
    " select id, id, null, 'test_results' from commits",
    """
    insert into reports_upload (id, report_id, state, created_at)
    select %(base)s + %(stride)s * (c.i + 1) + u, c.i + 1, 'processed',
           now() - interval '3 hours' + u * interval '1 minute'
      from fleet_commit c cross join generate_series(1, c.uploads) as u
    union all
    select %(other_base)s + id, id, 'processed', timestamp from commits where id > %(n)s
    """,
    _INSERT_RUNS + """
    select u.created_at, t.test_id, t.name, t.classname, 'bench', t.filename || '::' || t.name,
           case when t.n <= c.flaky and x.r < t.p then (case when x.r < t.p / 10 then 'error' else 'failure' end)
                when t.n %% 97 = 0 then 'skip' else 'pass' end,
           0.01 + (t.n %% 50) / 100.0,
           case when t.n <= c.flaky and x.r < t.p then 'AssertionError: bench failure' end,
           'pytest', t.filename, c.repo, c.sha, 'main', array['unit'], u.id
      from fleet_commit c
      join reports_upload u on u.report_id = c.i + 1
      join bench_test t on t.n <= c.tests
      cross join lateral (select flakectl_bench.rand(u.id, t.n, 1, %(seed)s) as r) x
    """,
    _RETRIES,
    _OTHER_RUNS,
    # open flakes: a few per repository, on tests that are flaky or only pass
    """
    insert into test_analytics_flake
      (repoid, test_id, flags_id, recent_passes_count, count, fail_count, start_date, end_date)
    select c.repo, t.test_id, null, x.rpc, x.rpc + x.fails, x.fails,
           now() - interval '2 days' - t.n * interval '1 second', null
      from fleet_commit c
      join bench_test t on t.n between c.flaky / 2 + 1 and least(c.tests, c.flaky / 2 + %(open)s)
      cross join lateral (
        select floor(30 * flakectl_bench.rand(t.n, c.i, 4, %(seed)s))::int as rpc,
               1 + floor(20 * flakectl_bench.rand(t.n, c.i, 5, %(seed)s))::int as fails
      ) x
    """,
]


def generate_fleet(conn: psycopg.Connection, commits: list[FleetCommit], other_rows: int,
                   seed: int = 1) -> None:
    """Empty the scratch tables and write the fleet's commits into them, one
    repository each (realistic failures, retries, FLEET_OPEN_FLAKES open flakes
    per repository), plus `other_rows` runs of older commits of those repositories."""
    assert [c.index for c in commits] == list(range(len(commits)))
    params = {
        "seed": seed, "min_p": MIN_P, "max_p": MAX_P, "n": len(commits),
        "commit_uploads": [c.uploads for c in commits], "commit_tests": [c.tests for c in commits],
        "tests": max(c.tests for c in commits), "flaky": max(c.tests for c in commits), "fail_p": 0.0,
        "other": other_rows,
        "other_per_upload": OTHER_TESTS_PER_UPLOAD, "repo_base": FLEET_REPO_BASE,
        "base": UPLOAD_BASE, "stride": FLEET_UPLOAD_STRIDE, "other_base": OTHER_UPLOAD_BASE,
        "open": FLEET_OPEN_FLAKES, "retry": 0.5,
    }
    _load(conn, _FLEET, params)


def _load(conn: psycopg.Connection, statements: list[str], params: dict) -> None:
    conn.execute("set maintenance_work_mem = '512MB'")
    conn.execute("truncate " + ", ".join(f"{SCHEMA}.{t}" for t in TABLES))
    table = f"{SCHEMA}.ta_timeseries_testrun"
    indexes = conn.execute(
        "select i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) from pg_index i"
        " where i.indrelid = %s::regclass", (table,)).fetchall()
    with conn.transaction():
        for name, _ in indexes:
            conn.execute(f"drop index {name}")
        for statement in statements:
            conn.execute(statement, params)
        for _, definition in indexes:
            conn.execute(definition)
    conn.execute(f"vacuum (freeze, analyze) {', '.join(f'{SCHEMA}.{t}' for t in TABLES)}")


def runs_in_commit(conn: psycopg.Connection) -> int:
    (n,) = conn.execute("select count(*) from ta_timeseries_testrun where commit_sha = %s"
                        " and repo_id = %s", (COMMIT_SHA, REPO_ID)).fetchone()
    return n


__all__ = ["COMMIT_SHA", "FleetCommit", "REPO_ID", "SCHEMA", "SHAPES", "Workload", "create_schema",
           "drop_schema", "generate", "generate_fleet", "runs_in_commit", "use_schema"]
