"""`flakectl verify`: the deployed function against the reference, on real data,
changing nothing.

In one transaction that is always rolled back: take the repository's lock,
read the snapshot the function will see (`snapshot.read_snapshot`), compute
the reference's answer (`reference.process_commit`), run the function, read
back the flakes and the runs, and compare them with `reference.apply`:
flakes that existed before by id, flakes the call created as a multiset
(their ids come from a sequence), run outcomes as a multiset (the runs table
has no key), and the summary row. Then ROLLBACK.

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

from flakectl import api, reference
from flakectl.dba import options as o
from flakectl.errors import FlakectlError, NotInstalled, wrap_exceptions
from flakectl.model import Flake, Snapshot, Summary
from flakectl.dba.snapshot import read_flakes, read_snapshot, run_outcomes

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
        _lock(conn, repo_id)
        before = read_snapshot(conn, repo_id, commit_sha=commit_sha)
        if not before.commits:
            raise UnknownCommit(f"repository {repo_id} has no commit {commit_sha!r}: nothing to verify")
        want = reference.process_commit(before, repo_id, commit_sha,
                                        lookback=lookback, expire_after=expire_after)
        got = api.process_commit(conn, repo_id, commit_sha, lookback=lookback,
                                 expire_after=expire_after)
        after = replace(read_snapshot(conn, repo_id, commit_sha=commit_sha),
                        flakes=tuple(read_flakes(conn, repo_id)))
    expected = reference.apply(before, want)
    differences = [
        *_summary_differences(want.summary, got),
        *_flake_differences(before, expected, after),
        *_run_differences(expected, after),
    ]
    return Verification(repo_id, commit_sha, want.summary, got,
                        uploads=want.summary.uploads_processed + want.summary.uploads_skipped,
                        differences=tuple(differences))


def _lock(conn: psycopg.Connection, repo_id: int) -> None:
    key = repo_id if -2**31 <= repo_id < 2**31 else None
    if key is None:
        conn.execute("select pg_advisory_xact_lock(%s, hashint8(%s))", (LOCK_NAMESPACE, repo_id))
    else:
        conn.execute("select pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, key))


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
    return str(value)


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
