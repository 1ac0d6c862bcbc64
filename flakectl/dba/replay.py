"""`flakectl replay`: recompute a repository's flakes from its history and
show (or, with --apply, repair) the rows that differ (SPEC rule 11).

Which uploads: by default every upload of the repository recorded in the
ledger within --since; with --branch, every processed test_results upload of
the repository's commits on that branch created within --since (histories
written by the old worker have no ledger rows). Everything runs in one
transaction holding the repository's lock: the rows shown are the rows
--apply replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from typing import TYPE_CHECKING

from flakectl.dba import options as o
from flakectl.dba.durations import EXAMPLES, format_duration

if TYPE_CHECKING:
    import psycopg

SHOWN = 20  # tests shown without --all
ARCHIVE = "flakectl.flake_archive"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl replay --repo 1234 --since 30d                 # dry run: what differs\n"
                      "  flakectl replay --repo 1234 --since 30d --branch main   # old worker: no ledger\n"
                      "  flakectl replay --repo 1234 --since 30d --apply         # repair; old rows archived")
    o.dsn(parser)
    from flakectl.reference import DEFAULT_EXPIRE_AFTER

    o.option(parser, "--repo", type=o.bigint, required=True, metavar="ID", help="repository id (commits.repoid)")
    o.option(parser, "--since", type=o.duration, default=timedelta(days=30), metavar="DURATION",
             help=f"replay the uploads recorded (or, with --branch, created) within this age, e.g. {EXAMPLES}")
    o.option(parser, "--branch", metavar="NAME",
             help="replay the processed test_results uploads of the repository's commits on this branch"
                  " instead of the ledger's")
    o.option(parser, "--expire-after", type=o.positive_int, default=DEFAULT_EXPIRE_AFTER,
             metavar="N", help="passes in a row that end a flake")
    o.option(parser, "--apply", switch=True, env="FLAKECTL_REPLAY_APPLY",
             help="write the repair: archive the live rows that differ, insert the replayed ones")
    o.option(parser, "--all", switch=True,
             help=f"show every test whose rows differ (default: the first {SHOWN})")
    o.json_flag(parser)


# --------------------------------------------------------------------------
# The uploads
# --------------------------------------------------------------------------


def select_uploads(conn: psycopg.Connection, repo_id: int, since: timedelta,
                   branch: str | None) -> list[int]:
    """The upload ids to replay, ascending."""
    from psycopg import sql

    if branch is None:
        query = sql.SQL(
            "select upload_id from flakectl.processed_upload"
            " where repo_id = %(repo)s and processed_at >= now() - %(since)s order by upload_id")
    else:
        query = sql.SQL(
            "select u.id from {s}.reports_upload u"
            "  join {s}.reports_commitreport r on r.id = u.report_id"
            "  join {s}.commits c on c.id = r.commit_id"
            " where c.repoid = %(repo)s and c.branch = %(branch)s"
            "   and r.report_type = 'test_results' and u.state = 'processed'"
            "   and u.created_at >= now() - %(since)s"
            " order by u.id").format(s=sql.Identifier(codecov_schema(conn)))
    rows = conn.execute(query, {"repo": repo_id, "since": since, "branch": branch}).fetchall()
    return [upload_id for (upload_id,) in rows]


def codecov_schema(conn: psycopg.Connection) -> str:
    """The schema of Codecov's tables, as the install recorded it."""
    from flakectl.dba import migrate

    recorded = getattr(migrate, "codecov_schema", None)
    return recorded(conn) if recorded else "public"


# --------------------------------------------------------------------------
# The rows that differ
# --------------------------------------------------------------------------


def differing_rows(conn: psycopg.Connection, repo_id: int, upload_ids: list[int],
                   expire_after: int) -> dict[bytes, dict[str, list[dict]]]:
    """flakectl.replay_rows: per test whose rows differ, its live and replayed rows."""
    from flakectl.errors import wrap_exceptions

    with wrap_exceptions():
        cur = conn.execute(
            "select side, paired, id, test_id, flags_id, count, fail_count, recent_passes_count,"
            "       start_date, end_date"
            "  from flakectl.replay_rows(repo_id => %s::bigint, upload_ids => %s::bigint[],"
            "                            expire_after => %s::integer)",
            (repo_id, upload_ids, expire_after))
        names = [c.name for c in cur.description]
        tests: dict[bytes, dict[str, list[dict]]] = {}
        for values in cur:
            row = dict(zip(names, values))
            test = bytes(row.pop("test_id"))
            if row["flags_id"] is not None:
                row["flags_id"] = bytes(row["flags_id"])
            tests.setdefault(test, {"live": [], "replayed": []})[row.pop("side")].append(row)
    return tests


def test_names(conn: psycopg.Connection, repo_id: int, test_ids: list[bytes]) -> dict[bytes, str]:
    """A readable name for each test id (its latest run's computed_name, if any)."""
    from psycopg import sql

    if not test_ids:
        return {}
    rows = conn.execute(
        sql.SQL("select t.test_id, (select r.computed_name from {s}.ta_timeseries_testrun r"
                "                    where r.repo_id = %s and r.test_id = t.test_id"
                "                    order by r.timestamp desc limit 1)"
                "  from unnest(%s::bytea[]) as t(test_id)").format(s=sql.Identifier(codecov_schema(conn))),
        (repo_id, test_ids)).fetchall()
    return {bytes(t): name for t, name in rows if name}


def _when(value: object) -> str:
    """A date in UTC, to the microsecond (rows pair on exact dates); NULL end: open."""
    from datetime import UTC, datetime

    if value is None:
        return "open"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return str(value)  # infinity, years past 9999 (flakectl.model.OutOfRange)


def _cells(row: dict | None, live: bool) -> list[str]:
    if row is None:
        return [""] * (6 if live else 5)
    cells = [str(row["count"]), str(row["fail_count"]), str(row["recent_passes_count"]),
             _when(row["start_date"]), _when(row["end_date"])]
    return [str(row["id"]), *cells] if live else cells


def side_by_side(rows: dict[str, list[dict]]) -> list[str]:
    """One test's live and replayed rows as a table, in start order: a paired
    live row next to its identical replayed row ('='), the others next to
    each other in order ('|'), each with what --apply does with it."""
    key = lambda r: (_when(r["start_date"]), r["id"] or 0)  # noqa: E731
    live = sorted(rows["live"], key=key)
    replayed = sorted(rows["replayed"], key=key)
    pairs: list[tuple[dict | None, dict | None]] = list(
        zip([r for r in live if r["paired"]], [r for r in replayed if r["paired"]]))
    other_live = [r for r in live if not r["paired"]]
    other_replayed = [r for r in replayed if not r["paired"]]
    for i in range(max(len(other_live), len(other_replayed))):
        pairs.append((other_live[i] if i < len(other_live) else None,
                      other_replayed[i] if i < len(other_replayed) else None))
    pairs.sort(key=lambda p: key(p[0] or p[1]))
    header = ["id", "count", "fail", "rpc", "start (UTC)", "end", "count", "fail", "rpc", "start (UTC)", "end"]
    table = [header]
    marks = [" "]
    for a, b in pairs:
        table.append(_cells(a, True) + _cells(b, False))
        marks.append("=" if a is not None and a["paired"] else "|")
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    notes = [""] + ["" if a is not None and a["paired"] else
                    ", ".join(w for w, r in (("archive", a), ("insert", b)) if r is not None)
                    for a, b in pairs]
    lines = [f"    {'live':<{sum(widths[:6]) + 10}}   replayed"]
    for row, mark, note in zip(table, marks, notes):
        left = "  ".join(c.rjust(w) if i < 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row[:6], widths)))
        right = "  ".join(c.rjust(w) if i < 3 else c.ljust(w)
                          for i, (c, w) in enumerate(zip(row[6:], widths[6:])))
        lines.append(f"    {left} {mark} {right}  {note}".rstrip())
    return lines


# --------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------


class Progress:
    """Phases on stderr, and the elapsed time every `every` seconds while one runs."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._phase = ""
        self._started = 0.0

    def phase(self, text: str) -> None:
        self.done()
        self._phase, self._started = text, time.monotonic()
        o.err(f"flakectl: {text} ...")
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            o.err(f"flakectl: {self._phase}: {time.monotonic() - self._started:.0f} s")

    def done(self, *, quietly: bool = False) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if not quietly:
                o.err(f"flakectl: {self._phase}: done in {time.monotonic() - self._started:.1f} s")


# --------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _stopping(progress: Progress) -> Iterator[None]:
    """No tick outlives the command: on an error the phase stops without a word."""
    try:
        yield
    finally:
        progress.done(quietly=True)


def run(args: argparse.Namespace) -> int:
    from flakectl import api
    from flakectl.dba.connection import connect
    from flakectl.dba.process import summary_lines

    progress = Progress()
    with connect(args.dsn) as conn, _stopping(progress):
        with conn.transaction():
            where = (f"on branch {args.branch!r}, created" if args.branch else "in the ledger, recorded")
            upload_ids = select_uploads(conn, args.repo, args.since, args.branch)
            progress.phase(f"comparing {len(upload_ids)} upload(s) of repository {args.repo} {where}"
                           f" within {format_duration(args.since)}")
            tests = differing_rows(conn, args.repo, upload_ids, args.expire_after)
            if args.apply:
                progress.phase("applying the repair")
            summary = api.replay(conn, args.repo, upload_ids, expire_after=args.expire_after,
                                 dry_run=not args.apply)
            progress.done()
            (now,) = conn.execute("select now()").fetchone()
            shown = sorted(tests) if args.all else sorted(tests)[:SHOWN]
            names = test_names(conn, args.repo, shown)
    look = (f"select * from {ARCHIVE} where repoid = {args.repo} and archived_at = '{now.isoformat()}'"
            f" order by test_id, start_date;")
    archived = args.apply and summary.flakes_archived > 0
    if args.json:
        o.print_json({
            "summary": asdict(summary), "dry_run": not args.apply, "repo": args.repo,
            "uploads": upload_ids, "tests_differing": len(tests),
            "tests": [{"test_id": t.hex(), "name": names.get(t), **{
                side: [{**r, "flags_id": None if r["flags_id"] is None else r["flags_id"].hex()}
                       for r in rows] for side, rows in tests[t].items()}} for t in shown],
            "archive": {"table": ARCHIVE, "archived_at": now, "query": look} if archived else None,
        })
    else:
        for line in summary_lines(summary):
            o.out(line)
        if tests:
            more = "" if len(shown) == len(tests) else f" (the first {len(shown)}; --all shows every one)"
            o.out("")
            o.out(f"tests whose rows differ: {len(tests)}{more}")
            for test in shown:
                label = f"  {names[test]}  " if test in names else "  "
                o.out(f"{label}test_id \\x{test.hex()}")
                for line in side_by_side(tests[test]):
                    o.out(line)
        elif summary.flakes_live or summary.flakes_replayed:
            o.out("")
            o.out(f"no test's rows differ: all {summary.flakes_identical} compared rows are identical")
        if archived:
            o.out("")
            o.out(f"archived {summary.flakes_archived} row(s) to {ARCHIVE} (archived_at {now.isoformat()});"
                  " to look at them:")
            o.out(f"  {look}")
    if not upload_ids:
        hint = ("" if args.branch else
                "; a history written without flakectl has no ledger rows: use --branch")
        o.err(f"flakectl: no uploads of repository {args.repo} {where} within"
              f" {format_duration(args.since)}{hint}")
    if args.apply:
        o.err("flakectl: applied: the differing rows were replaced" if tests else
              "flakectl: applied: nothing differed")
    else:
        o.err("flakectl: dry run: nothing was written (--apply writes the repair)")
    sys.stderr.flush()
    return 0
