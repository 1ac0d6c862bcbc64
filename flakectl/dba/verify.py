"""`flakectl verify`: the deployed function against the reference, on real data,
changing nothing.

In one transaction that is always rolled back: take the repository's lock,
read what the reference needs (`snapshot.read_snapshot(bounded=True)`: the
commit's rows, the candidates' failure-class runs, the passes of the tests
that matter, the repository's open flakes, the candidates' ledger rows),
compute the reference's answer, run the function, and compare everything the
call can change with what the reference says it changes:

- the summary row;
- the runs the reference reads, re-read after the call, as a multiset (the
  runs table has no key) of (upload, test, timestamp, repo, outcome);
- every other run: the call's own row counts from pg_stat_xact_user_tables
  (this transaction's inserts, updates and deletes of each table, summed over
  partitions and chunks): exactly the reference's marked runs updated, none
  inserted or deleted; so a run of another commit or repository the call
  marks shows up, without reading any of them;
- the repository's flakes: the open ones (before the call) by id, the rows
  the call wrote (found by their xmin, server-side: this transaction's or its
  subtransactions'), new ones as a multiset (their ids come from a sequence),
  a history row written as a difference of its own; other repositories' flakes
  by the row counts (writes beyond the reference's are a difference);
- the ledger rows of the candidate uploads (which, repository, commit) and its
  row counts; commits, reports and uploads: no writes.

Client memory is what the reference needs; nothing grows with the passes of
tests that do not matter. Then ROLLBACK. Sequences are not transactional: the
rolled-back call still uses one flake id per flake it creates (ids have gaps
anyway; nothing else is left behind). The counts need track_counts (on by
default); with it off they are not compared.

The repository lock is taken first, with guard's key (the same in every
guard version), so a worker committing for the same repository between the
snapshot and the function's own lock cannot make the two disagree (advisory
locks stack: the function takes it again without waiting).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta

import psycopg
from psycopg.rows import class_row

from flakectl import api, reference
from flakectl.dba import options as o
from flakectl.errors import FlakectlError, NotInstalled, wrap_exceptions
from flakectl.model import Flake, Snapshot, Summary
from flakectl.dba.snapshot import (
    FLAKE_COLUMNS,
    flake_with_bytes,
    read_scope_runs,
    read_snapshot,
    register_timestamps,
    run_outcomes,
    use_codecov_schema,
)

#: guard's advisory lock namespace (its first key; the same in v0001 and v0002).
LOCK_NAMESPACE = 1718381411
_FLAKE_FIELDS = [f.name for f in fields(Flake) if f.name not in ("id", "repoid", "test_id")]


class UnknownCommit(FlakectlError):
    """The repository has no such commit: nothing to verify."""


@dataclass(frozen=True)
class Difference:
    """One disagreement: `what` (flake, new flake, run, summary), which row, which field."""

    what: str
    where: str
    field: str
    expected: object
    got: object

    def __str__(self) -> str:
        return f"{self.what} {self.where}: {self.field} expected {_show(self.expected)}, got {_show(self.got)}"


@dataclass(frozen=True)
class Verification:
    repo_id: int
    commit_sha: str
    expected: Summary
    got: Summary
    uploads: int  # qualifying uploads of the commit, processed before or not
    differences: tuple[Difference, ...] = field(default=())

    @property
    def identical(self) -> bool:
        return not self.differences

    def as_json(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "commit_sha": self.commit_sha,
            "identical": self.identical,
            "expected": asdict(self.expected),
            "got": asdict(self.got),
            "differences": [
                {k: _json_value(v) for k, v in asdict(d).items()} for d in self.differences
            ],
        }


def verify_commit(
    conn: psycopg.Connection,
    repo_id: int,
    commit_sha: str,
    *,
    lookback: timedelta = reference.DEFAULT_LOOKBACK,
    expire_after: int = reference.DEFAULT_EXPIRE_AFTER,
) -> Verification:
    """Compare `flakectl.process_commit` with the reference on this commit; roll back."""
    with wrap_exceptions(), conn.transaction(force_rollback=True):
        if conn.execute("select to_regproc('flakectl.process_commit') is null").fetchone()[0]:
            raise NotInstalled()
        use_codecov_schema(conn)
        _lock(conn, repo_id)
        before = read_snapshot(conn, repo_id, commit_sha=commit_sha, bounded=True)
        if not before.commits:
            raise UnknownCommit(f"repository {repo_id} has no commit {commit_sha!r}: nothing to verify")
        candidates = sorted({u.id for u in before.uploads})
        want = reference.process_commit(before, repo_id, commit_sha,
                                        lookback=lookback, expire_after=expire_after)
        (max_id,) = conn.execute("select coalesce(max(id), 0) from test_analytics_flake").fetchone()
        counted = conn.execute("select current_setting('track_counts')::boolean").fetchone()[0]
        writes_before = _writes(conn)
        got = api.process_commit(conn, repo_id, commit_sha, lookback=lookback,
                                 expire_after=expire_after)
        writes = _writes(conn)
        tests = sorted({r.test_id for r in before.testruns if reference.outcome_class(r.outcome)
                        == reference.FAILURE} | {f.test_id for f in before.flakes})
        runs_after, _ = read_scope_runs(conn, repo_id, candidates, (), tests)
        written = _written_flakes(conn, repo_id)
        still_there = {i for (i,) in conn.execute(
            "select id from test_analytics_flake where id = any(%s)", ([f.id for f in before.flakes],))}
        ledger_after = conn.execute(
            "select upload_id, repo_id, commit_sha from flakectl.processed_upload"
            " where upload_id = any(%s) order by upload_id", (candidates,)).fetchall()
    expected = reference.apply(before, want)
    open_ids = {f.id for f in before.flakes}
    after_flakes = [written.get(f.id, f) for f in before.flakes if f.id in still_there]
    after_flakes += [f for f in written.values() if f.id not in open_ids and f.id > max_id]
    history = [f for f in written.values() if f.id not in open_ids and f.id <= max_id]
    after = replace(before, flakes=tuple(after_flakes), testruns=tuple(runs_after))
    differences = [
        *_summary_differences(want.summary, got),
        *_flake_differences(before, expected, after),
        *[Difference("flake", f"id {f.id} test {_hex(f.test_id)}", "row", "unchanged (history or"
                     " another row the reference does not touch)", f"written: {_flake_text(f)}")
          for f in history],
        *_run_differences(expected, after),
        *_ledger_differences(before, want, repo_id, commit_sha, candidates, ledger_after),
        *(_write_differences(want, writes_before, writes) if counted else []),
    ]
    return Verification(repo_id, commit_sha, want.summary, got,
                        uploads=want.summary.uploads_processed + want.summary.uploads_skipped,
                        differences=tuple(differences))


def _lock(conn: psycopg.Connection, repo_id: int) -> None:
    key = repo_id if -2**31 <= repo_id < 2**31 else None
    if key is None:
        conn.execute("select pg_advisory_xact_lock(%s, hashint8(%s::bigint))", (LOCK_NAMESPACE, repo_id))
    else:
        conn.execute("select pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, key))


#: the tables a call may write, and those it must not (their row counts are compared)
_COUNTED = ("ta_timeseries_testrun", "test_analytics_flake", "flakectl.processed_upload",
            "commits", "reports_commitreport", "reports_upload")
_KINDS = ("inserted", "updated", "deleted")


def _writes(conn: psycopg.Connection) -> dict[str, tuple[int, int, int]]:
    """This transaction's rows inserted, updated and deleted so far, per table
    (with its partitions, inheritance children, TimescaleDB chunks)."""
    rows = conn.execute(
        """
        with recursive tree(root, rel) as (
          select t, to_regclass(t)::oid from unnest(%s::text[]) as t where to_regclass(t) is not null
          union all
          select tree.root, i.inhrelid from pg_inherits i join tree on i.inhparent = tree.rel
        )
        select root, sum(pg_stat_get_xact_tuples_inserted(rel))::bigint,
               sum(pg_stat_get_xact_tuples_updated(rel))::bigint,
               sum(pg_stat_get_xact_tuples_deleted(rel))::bigint
          from tree group by root
        """, (list(_COUNTED),)).fetchall()
    return {root: (ins, upd, dele) for root, ins, upd, dele in rows}


def _write_differences(want, before: dict, after: dict) -> list[Difference]:  # noqa: ANN001 - a Result
    flakes_updated = sum(1 for f in want.flakes if f.id is not None)
    expected = {
        "ta_timeseries_testrun": (0, len(want.marked), 0),
        "test_analytics_flake": (len(want.flakes) - flakes_updated, flakes_updated, 0),
        "flakectl.processed_upload": (len(want.ledger_added), 0, 0),
    }
    out = []
    for table in _COUNTED:
        if table not in after:
            continue
        got = tuple(a - b for a, b in zip(after[table], before.get(table, (0, 0, 0))))
        want_counts = expected.get(table, (0, 0, 0))
        out += [Difference("writes", table, f"rows {kind}", w, g)
                for kind, w, g in zip(_KINDS, want_counts, got) if w != g]
    return out


def _written_flakes(conn: psycopg.Connection, repo_id: int) -> dict[int, Flake]:
    """The repository's flake rows this transaction wrote (xmin of this
    transaction or one of its subtransactions: no older than its own xid; no
    other session writes the repository's flakes while its lock is held)."""
    register_timestamps(conn)
    with conn.cursor(row_factory=class_row(Flake)) as cur:
        cur.execute(f"select {FLAKE_COLUMNS} from test_analytics_flake"
                    " where repoid = %s and age(xmin) <= age(xid(pg_current_xact_id())) order by id",
                    (repo_id,))
        return {f.id: flake_with_bytes(f) for f in cur}


def _ledger_differences(before: Snapshot, want, repo_id: int, commit_sha: str,  # noqa: ANN001
                        candidates: list[int], rows: list[tuple]) -> list[Difference]:
    got = {upload_id: (repo, sha) for upload_id, repo, sha in rows}
    added = set(want.ledger_added)
    out = []
    for upload_id in candidates:
        where = f"upload {upload_id}"
        if upload_id in before.ledger:
            if upload_id not in got:
                out.append(Difference("ledger", where, "row", "kept", "deleted"))
            continue
        if upload_id not in added:
            if upload_id in got:
                out.append(Difference("ledger", where, "row", "not recorded", "recorded"))
            continue
        if upload_id not in got:
            out.append(Difference("ledger", where, "row", "recorded", "missing"))
            continue
        repo, sha = got[upload_id]
        if repo != repo_id:
            out.append(Difference("ledger", where, "repo_id", repo_id, repo))
        if sha != commit_sha:
            out.append(Difference("ledger", where, "commit_sha", commit_sha, sha))
    return out


def _summary_differences(expected: Summary, got: Summary) -> list[Difference]:
    return [
        Difference("summary", "row", name, getattr(expected, name), getattr(got, name))
        for name in Summary.columns()
        if getattr(expected, name) != getattr(got, name)
    ]


def _flake_differences(before: Snapshot, expected: Snapshot, after: Snapshot) -> list[Difference]:
    known = {f.id for f in before.flakes}
    out: list[Difference] = []
    want_old = {f.id: f for f in expected.flakes if f.id in known}
    got_old = {f.id: f for f in after.flakes if f.id in known}
    for flake_id in sorted(want_old.keys() | got_old.keys()):
        want, got = want_old.get(flake_id), got_old.get(flake_id)
        where = f"id {flake_id} test {_hex((want or got).test_id)}"
        if want is None or got is None:
            out.append(Difference("flake", where, "row", want and "present", got and "present"))
            continue
        out += [Difference("flake", where, name, getattr(want, name), getattr(got, name))
                for name in _FLAKE_FIELDS if getattr(want, name) != getattr(got, name)]

    # New flakes carry sequence ids: compare them as multisets, and pair the
    # leftovers of one test to name the fields that differ.
    want_new = Counter(replace(f, id=None) for f in expected.flakes if f.id not in known)
    got_new = Counter(replace(f, id=None) for f in after.flakes if f.id not in known)
    missing = defaultdict(list)
    extra = defaultdict(list)
    for flake in sorted((want_new - got_new).elements(), key=_flake_order):
        missing[flake.test_id].append(flake)
    for flake in sorted((got_new - want_new).elements(), key=_flake_order):
        extra[flake.test_id].append(flake)
    for test_id in sorted(missing.keys() | extra.keys()):
        wants, gots = missing.get(test_id, []), extra.get(test_id, [])
        for i in range(max(len(wants), len(gots))):
            want = wants[i] if i < len(wants) else None
            got = gots[i] if i < len(gots) else None
            where = f"test {_hex(test_id)}"
            if want is None or got is None:
                out.append(Difference("new flake", where, "row", want and _flake_text(want),
                                      got and _flake_text(got)))
                continue
            out += [Difference("new flake", where, name, getattr(want, name), getattr(got, name))
                    for name in _FLAKE_FIELDS if getattr(want, name) != getattr(got, name)]
    return out


def _run_differences(expected: Snapshot, after: Snapshot) -> list[Difference]:
    want = run_outcomes(expected.testruns)
    got = run_outcomes(after.testruns)
    missing = defaultdict(list)
    extra = defaultdict(list)
    for key in sorted((want - got).elements(), key=repr):
        missing[key[:4]].append(key[4])
    for key in sorted((got - want).elements(), key=repr):
        extra[key[:4]].append(key[4])
    out = []
    for key in sorted(missing.keys() | extra.keys(), key=repr):
        upload_id, test_id, timestamp, _repo = key
        wants, gots = missing.get(key, []), extra.get(key, [])
        for i in range(max(len(wants), len(gots))):
            out.append(Difference(
                "run", f"upload {upload_id} test {_hex(test_id)} at {timestamp.isoformat()}", "outcome",
                wants[i] if i < len(wants) else None, gots[i] if i < len(gots) else None,
            ))
    return out


def _flake_order(flake: Flake) -> tuple:
    return (flake.test_id, flake.start_date, flake.end_date is None, flake.end_date or flake.start_date)


def _flake_text(flake: Flake) -> str:
    state = "open" if flake.end_date is None else f"ended {flake.end_date.isoformat()}"
    return (f"count={flake.count} fail_count={flake.fail_count} "
            f"recent_passes_count={flake.recent_passes_count} start={flake.start_date.isoformat()} {state}")


def _hex(test_id: bytes) -> str:
    return "\\x" + bytes(test_id).hex()


def _show(value: object) -> str:
    if value is None:
        return "none"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return o.printable(str(value))  # a sha from CI data may hold anything


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (int, str, bool, float)):
        return value
    return _show(value)


# --------------------------------------------------------------------------
# `flakectl verify`
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl verify --repo 1234 --commit 3f2a9c1\n\n"
                      "Prints `identical` (exit 0) or each difference: row, field, expected, got (exit 1).\n"
                      "Verify a commit before it is processed: afterwards its uploads are in the ledger\n"
                      "and there is nothing left to compare. An unknown commit is an error (exit 1).")
    o.dsn(parser)
    o.call_options(parser)
    o.option(parser, "--commit", required=True, metavar="SHA", help="the commit to verify")
    o.json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from flakectl.dba.connection import connect

    with connect(args.dsn) as conn:
        result = verify_commit(conn, args.repo, args.commit,
                               lookback=args.lookback, expire_after=args.expire_after)
    if args.json:
        o.print_json(result.as_json())
    elif result.identical:
        s = result.got
        o.out(f"identical: repository {args.repo}, commit {args.commit}: {s.uploads_processed} uploads,"
              f" {s.testruns_considered} runs considered, {s.testruns_marked} marked,"
              f" flakes {s.flakes_created} created / {s.flakes_updated} updated / {s.flakes_expired} expired")
    else:
        o.out(f"different: {len(result.differences)} difference(s) between the function and the"
              f" reference, repository {args.repo}, commit {args.commit}")
        for difference in result.differences:
            o.out(f"  {difference}")
    if result.uploads and not result.got.uploads_processed and not result.expected.uploads_processed:
        o.err(f"flakectl: the commit's {result.uploads} upload(s) were processed before, so the"
              " comparison covered nothing; verify a commit before it is processed")
    o.err("flakectl: rolled back: nothing was changed")
    return 0 if result.identical else 1
