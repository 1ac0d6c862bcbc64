"""`flakectl status`: what is installed and what the tables hold.

The installed Alembic revision; for each function, which released body
(plpgsql/<name>/vNNNN.sql) it runs, recognised by its source text, so a body
changed by hand shows as `modified`; the ledger's size and last processed
upload; open and expired flakes per repository; and, for one repository, its
open flakes, most failing first.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from flakectl import sqlfiles
from flakectl.dba import migrate
from flakectl.dba import options as o
from flakectl.dba.snapshot import register_timestamps, use_codecov_schema
from flakectl.dba.split import Layout, layout
from flakectl.errors import NotInstalled, wrap_exceptions


@dataclass(frozen=True)
class Function:
    name: str
    version: int | None  # None: installed, but not any released body
    installed: bool = True

    @property
    def label(self) -> str:
        if not self.installed:
            return "missing"
        return "modified (matches no released body)" if self.version is None else f"v{self.version:04d}"


@dataclass(frozen=True)
class RepoFlakes:
    repo_id: int
    open: int
    expired: int


@dataclass(frozen=True)
class OpenFlake:
    id: int
    test_id: str  # \x-hex, as psql shows bytea
    name: str | None
    fail_count: int
    count: int
    recent_passes_count: int
    start_date: datetime


@dataclass(frozen=True)
class Status:
    revision: str
    head: str
    functions: tuple[Function, ...]
    ledger_rows: int
    last_upload_id: int | None
    last_repo_id: int | None
    last_commit_sha: str | None
    last_processed_at: datetime | None
    repos: tuple[RepoFlakes, ...]
    repo_id: int | None = None
    open_flakes: tuple[OpenFlake, ...] = field(default=())
    open_total: int = 0
    layout: Layout = Layout("one")  # one database, or a side of a split (flakectl split)

    def as_json(self) -> dict:
        data = asdict(self)
        data["layout"] = self.layout.as_json()
        data["functions"] = {f.name: f.label for f in self.functions}
        for flake in data["open_flakes"]:
            flake["start_date"] = flake["start_date"].isoformat()
        if self.last_processed_at is not None:
            data["last_processed_at"] = self.last_processed_at.isoformat()
        if self.repo_id is None:
            for key in ("repo_id", "open_flakes", "open_total"):
                del data[key]
        return data

    def lines(self) -> list[str]:
        head = "head" if self.revision == self.head else f"head is {self.head}: run `flakectl db upgrade`"
        out = layout_lines(self.layout)
        out += [f"revision   {self.revision} ({head})",
               "functions  " + ", ".join(f"{f.name} {f.label}" for f in self.functions)]
        if self.last_upload_id is None:
            out.append(f"ledger     {self.ledger_rows} uploads")
        else:
            out.append(f"ledger     {self.ledger_rows} uploads; last: upload {self.last_upload_id}"
                       f" of repo {self.last_repo_id}, commit {o.printable(self.last_commit_sha or '-')},"
                       f" at {self.last_processed_at:%Y-%m-%d %H:%M:%S%z}")
        if self.layout.side == "main":  # a one-database deployment moved to the split
            out[-1] += " (as it was at the split: the runs database's ledger counts)"
        out.append("")
        out.append(f"{'repo':>10}  {'open':>8}  {'expired':>8}")
        out += [f"{r.repo_id:>10}  {r.open:>8}  {r.expired:>8}" for r in self.repos]
        if not self.repos:
            out.append("(no flakes)")
        if self.repo_id is not None:
            out.append("")
            out.append(f"open flakes of repo {self.repo_id} ({self.open_total}), most failing first:")
            out.append(f"{'fails':>6}  {'count':>6}  {'passes':>6}  {'since':<25}  test")
            for f in self.open_flakes:
                since = f"{f.start_date:%Y-%m-%d %H:%M:%S%z}"  # an OutOfRange shows as `infinity`
                out.append(f"{f.fail_count:>6}  {f.count:>6}  {f.recent_passes_count:>6}  "
                           f"{since:<25}  {o.printable(f.name) if f.name else f.test_id}")
            if self.open_total > len(self.open_flakes):
                out.append(f"... and {self.open_total - len(self.open_flakes)} more (--limit)")
        return out


def layout_lines(layout: Layout) -> list[str]:
    lines = [f"layout     {layout.describe()}"]
    if layout.link() is not None:
        lines.append(f"link       {layout.link()}")
    return lines


def released_bodies(schema_ident: str = sqlfiles.DEFAULT_SCHEMA) -> dict[str, dict[int, str]]:
    """Each function's released bodies: name -> version -> the text between
    `$$`s, templates rendered for the Codecov schema `schema_ident` (quoted)."""
    bodies: dict[str, dict[int, str]] = {}
    for path in sqlfiles.released():
        name, file = path.split("/")
        version = int(file[1:5])
        text = sqlfiles.body(name, version)
        if sqlfiles.is_template(name, version):
            text = sqlfiles.render(text, schema_ident)
        bodies.setdefault(name, {})[version] = text.split("$$")[1]
    return bodies


def functions(conn: psycopg.Connection) -> tuple[Function, ...]:
    installed = dict(conn.execute(
        "select p.proname, p.prosrc from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'flakectl'"
    ).fetchall())
    (schema_ident,) = conn.execute("select quote_ident(%s)", (migrate.codecov_schema(conn),)).fetchone()
    out = []
    for name, versions in sorted(released_bodies(schema_ident).items()):
        if name not in installed:
            out.append(Function(name, None, installed=False))
            continue
        match = [v for v, src in versions.items() if src == installed[name]]
        out.append(Function(name, max(match) if match else None))
    return tuple(out)


def read_status(conn: psycopg.Connection, repo_id: int | None = None, limit: int = 50) -> Status:
    register_timestamps(conn)
    with wrap_exceptions(), conn.transaction():
        where = layout(conn)
        (has_version, has_ledger) = conn.execute(
            "select to_regclass('alembic_version') is not null,"
            "       to_regclass('flakectl.processed_upload') is not null"
        ).fetchone()
        revision = None
        if has_version:
            row = conn.execute("select version_num from alembic_version").fetchone()
            revision = row[0] if row else None
        if revision is None or not has_ledger:
            if where.side == "main":
                raise NotInstalled("flakectl is not installed in this database, the main side of a split:"
                                   f" it runs in the runs database {where.target} (link"
                                   f" {where.link()}); run `flakectl status` there")
            if revision is not None:
                raise NotInstalled(
                    f"flakectl is partly installed in this database: it is at revision {revision},"
                    f" which has the Codecov tables but not flakectl's ledger and functions (head is"
                    f" {migrate.head()}); run `flakectl db upgrade` to finish the install")
            raise NotInstalled()
        use_codecov_schema(conn)  # the flakes and runs the install's functions use
        (rows,) = conn.execute("select count(*) from flakectl.processed_upload").fetchone()
        last = conn.execute(
            "select upload_id, repo_id, commit_sha, processed_at from flakectl.processed_upload"
            " order by processed_at desc, upload_id desc limit 1"
        ).fetchone() or (None, None, None, None)
        repos = [] if where.side == "main" and not where.answers else conn.execute(
            "select repoid, count(*) filter (where end_date is null),"
            "       count(*) filter (where end_date is not null)"
            "  from test_analytics_flake group by repoid order by repoid"
        ).fetchall()
        open_flakes: list[OpenFlake] = []
        open_total = 0
        if repo_id is not None:
            (open_total,) = conn.execute(
                "select count(*) from test_analytics_flake where repoid = %s and end_date is null",
                (repo_id,),
            ).fetchone()
            with conn.cursor(row_factory=class_row(OpenFlake)) as cur:
                cur.execute(
                    """
                    select f.id, '\\x' || encode(f.test_id, 'hex') as test_id,
                           (select coalesce(r.computed_name, r.name)
                              from ta_timeseries_testrun r
                             where r.repo_id = f.repoid and r.test_id = f.test_id
                             order by r.timestamp desc limit 1) as name,
                           f.fail_count, f.count, f.recent_passes_count, f.start_date
                      from test_analytics_flake f
                     where f.repoid = %(repo)s and f.end_date is null
                     order by f.fail_count desc, f.count desc, f.start_date, f.id
                     limit %(limit)s
                    """,
                    {"repo": repo_id, "limit": limit},
                )
                open_flakes = cur.fetchall()
        funcs = functions(conn)
    return Status(
        revision=revision, head=migrate.head(), functions=funcs, ledger_rows=rows,
        last_upload_id=last[0], last_repo_id=last[1], last_commit_sha=last[2],
        last_processed_at=last[3], repos=tuple(RepoFlakes(*r) for r in repos),
        repo_id=repo_id, open_flakes=tuple(open_flakes), open_total=open_total, layout=where,
    )


# --------------------------------------------------------------------------
# `flakectl status`
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl status\n"
                      "  flakectl status --repo 1234 --limit 10   # and its open flakes, most failing first")
    o.dsn(parser)
    o.option(parser, "--repo", type=o.bigint, metavar="ID", help="also list this repository's open flakes")
    o.option(parser, "--limit", type=o.positive_bigint, default=50, metavar="N", help="list at most N open flakes")
    o.json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from flakectl.dba.connection import connect

    with connect(args.dsn) as conn:
        status = read_status(conn, args.repo, args.limit)
    if args.json:
        o.print_json(status.as_json())
    else:
        for line in status.lines():
            o.out(line)
    return 0
