"""SPEC rule 10, exhaustively: every kind of bad or odd input to both entry
points gets SPEC's error (SQLSTATE, a message naming the argument and its
value) and changes nothing, or is a correct call (the reference's summary
and state; zeros and no change where there is nothing to do).

Each case runs in a transaction that is rolled back, on a history with open
and expired flakes, failing runs and commits with awkward shas, so a call
that wrongly did something would show. docs/bad-input.md is this table in
prose; a test keeps the two in step.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import pytest

import flakectl
from flakectl import reference
from flakectl.model import Summary

from builders import Repo, at
from dbdata import assert_state
from sessions import state, whole_snapshot

R, OTHER = 1, 2
QUOTES = "o'brien\"; drop table x; --"
UNICODE = "ünïcødé✓"
INJECTION = "'; drop table test_analytics_flake; --"
BIG_REPO = 2**40  # a bigint repo id: beyond test_analytics_flake.repoid (int)
DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"


def history(conn: psycopg.Connection) -> dict[str, object]:
    """The rows every case starts from; returns the ids the cases use."""
    repo, other = Repo(conn, R), Repo(conn, OTHER)
    repo.flake("a", rpc=1, count=4, fail_count=3, start=at(-300), end=at(-200))
    repo.flake("a", rpc=2, count=5, fail_count=3, start=at(-100), flags_id=b"f")
    up1, up2 = repo.upload("sha1"), repo.upload("sha1")
    repo.runs(up1, ("a", "failure", at(1)), ("b", "error", at(1)), ("c", "pass", at(1)))
    repo.runs(up2, ("a", "pass", at(2)), ("b", "pass", at(2)), ("b", "failure", at(3)))
    quotes, uni = repo.upload(QUOTES), repo.upload(UNICODE)
    repo.runs(quotes, ("q", "failure", at(4)), ("a", "pass", at(4)))
    repo.runs(uni, ("ü", "failure", at(5)))
    repo.commit("no-uploads")
    theirs = other.upload("theirs")
    other.runs(theirs, ("a", "failure", at(1)), ("t", "error", at(1)))
    big = 990_000
    repo.runs(big, ("a", "failure", at(1)), repo_id=BIG_REPO)
    return {"sha1": [up1, up2], "quotes": quotes, "unicode": uni, "theirs": theirs, "big": big}


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[psycopg.Connection, dict], Summary]
    # an error: (exception class, SQLSTATE, regex the message matches)
    error: tuple[type, str, str] | None = None
    # no error: what the reference does with the same call
    oracle: Callable[[object, dict], object] | None = None
    zeros: bool = False  # and the summary is all zeros, nothing changes


def commit(*args, **options) -> Callable:
    return lambda conn, ids: flakectl.process_commit(conn, *args, **options)


def uploads(repo, pick, **options) -> Callable:
    return lambda conn, ids: flakectl.process_uploads(conn, repo, pick(ids), **options)


def null(name: str) -> tuple:
    return (flakectl.NullArgument, "22004", rf"^flakectl: argument {name} must not be NULL$")


def out_of_range(name: str, shown: str) -> tuple:
    return (flakectl.InvalidArgument, "22023", rf"^flakectl: argument {name} must .*, got {re.escape(shown)}$")


def beyond_integer(shown: str) -> tuple:
    """SPEC rule 10: a repo_id outside integer (test_analytics_flake.repoid's range)."""
    return (flakectl.InvalidArgument, "22003",
            rf"^flakectl: argument repo_id must be within integer .*, got {re.escape(shown)}$")


def ref_commit(*args, **options) -> Callable:
    return lambda snapshot, ids: reference.process_commit(snapshot, *args, **options)


def ref_uploads(repo, pick, **options) -> Callable:
    return lambda snapshot, ids: reference.process_uploads(snapshot, repo, pick(ids), **options)


SHA1 = lambda ids: ids["sha1"]  # noqa: E731
TEN_THOUSAND = lambda ids: ids["sha1"] + list(range(5_000_000, 5_000_000 + 9_998))  # noqa: E731
NEG = timedelta(seconds=-1)
# the other arguments, valid
OPTIONS = ("lookback", "expire_after", "dry_run", "wait")
GOOD = dict(repo_id=R, lookback=timedelta(days=1), expire_after=30, dry_run=False, wait=True)

CASES = [
    # NULL in each argument: 22004, nothing changes
    *[Case(f"commit-null-{name}", commit(**{**GOOD, "commit_sha": "sha1", name: None}), error=null(name))
      for name in ("repo_id", "commit_sha", *OPTIONS)],
    *[Case(f"uploads-null-{name}", (lambda conn, ids, name=name: flakectl.process_uploads(
        conn, **{**GOOD, "upload_ids": ids["sha1"], name: None})), error=null(name))
      for name in ("repo_id", "upload_ids", *OPTIONS)],
    # out of range: 22023, nothing changes
    Case("commit-lookback-minus-1s", commit(R, "sha1", lookback=NEG), error=out_of_range("lookback", "-1 days +23:59:59")),
    Case("commit-lookback-minus-1-day", commit(R, "sha1", lookback=timedelta(days=-1)),
         error=out_of_range("lookback", "-1 days")),
    Case("uploads-lookback-minus-1s", uploads(R, SHA1, lookback=NEG), error=out_of_range("lookback", "-1 days +23:59:59")),
    Case("commit-expire-after-0", commit(R, "sha1", expire_after=0), error=out_of_range("expire_after", "0")),
    Case("commit-expire-after-minus-1", commit(R, "sha1", expire_after=-1), error=out_of_range("expire_after", "-1")),
    Case("commit-expire-after-int-min", commit(R, "sha1", expire_after=-2**31),
         error=out_of_range("expire_after", str(-2**31))),
    Case("uploads-expire-after-0", uploads(R, SHA1, expire_after=0), error=out_of_range("expire_after", "0")),
    Case("uploads-expire-after-minus-1", uploads(R, SHA1, expire_after=-1), error=out_of_range("expire_after", "-1")),
    # the edges that are valid
    Case("commit-lookback-0", commit(R, "sha1", lookback=timedelta(0)),
         oracle=ref_commit(R, "sha1", lookback=timedelta(0))),
    Case("uploads-lookback-0", uploads(R, SHA1, lookback=timedelta(0)),
         oracle=ref_uploads(R, SHA1, lookback=timedelta(0))),
    Case("commit-expire-after-1", commit(R, "sha1", expire_after=1), oracle=ref_commit(R, "sha1", expire_after=1)),
    Case("commit-expire-after-int-max", commit(R, "sha1", expire_after=2**31 - 1),
         oracle=ref_commit(R, "sha1", expire_after=2**31 - 1)),
    # upload arrays
    Case("uploads-empty-array", uploads(R, lambda ids: []), oracle=ref_uploads(R, lambda ids: []), zeros=True),
    Case("uploads-only-nulls", uploads(R, lambda ids: [None, None]), oracle=ref_uploads(R, lambda ids: [None, None]),
         zeros=True),
    Case("uploads-duplicates-and-nulls", uploads(R, lambda ids: ids["sha1"] * 3 + [None]),
         oracle=ref_uploads(R, lambda ids: ids["sha1"] * 3 + [None])),
    Case("uploads-of-another-repo", uploads(R, lambda ids: [ids["theirs"]]),
         oracle=ref_uploads(R, lambda ids: [ids["theirs"]])),
    Case("uploads-unknown-ids", uploads(R, lambda ids: [-1, 0, 2**63 - 1]),
         oracle=ref_uploads(R, lambda ids: [-1, 0, 2**63 - 1])),
    Case("uploads-10000-ids", uploads(R, TEN_THOUSAND), oracle=ref_uploads(R, TEN_THOUSAND)),
    Case("uploads-10000-duplicates", uploads(R, lambda ids: [ids["sha1"][0]] * 10_000),
         oracle=ref_uploads(R, lambda ids: [ids["sha1"][0]] * 10_000)),
    # commits that are not there, or have nothing
    Case("commit-without-uploads", commit(R, "no-uploads"), oracle=ref_commit(R, "no-uploads"), zeros=True),
    Case("commit-of-another-repo", commit(R, "theirs"), oracle=ref_commit(R, "theirs"), zeros=True),
    Case("commit-unknown-sha", commit(R, "nope"), oracle=ref_commit(R, "nope"), zeros=True),
    Case("commit-empty-sha", commit(R, ""), oracle=ref_commit(R, ""), zeros=True),
    Case("commit-10000-char-sha", commit(R, "x" * 10_000), oracle=ref_commit(R, "x" * 10_000), zeros=True),
    Case("commit-unknown-repo", commit(987_654, "sha1"), oracle=ref_commit(987_654, "sha1"), zeros=True),
    Case("commit-repo-0", commit(0, "sha1"), oracle=ref_commit(0, "sha1"), zeros=True),
    Case("commit-negative-repo", commit(-1, "sha1"), oracle=ref_commit(-1, "sha1"), zeros=True),
    # repo ids: integer's range is valid, beyond it 22003 (v0002 hashed them into lock keys)
    Case("commit-repo-int-max", commit(2**31 - 1, "sha1"), oracle=ref_commit(2**31 - 1, "sha1"), zeros=True),
    Case("commit-repo-int-min", commit(-2**31, "sha1"), oracle=ref_commit(-2**31, "sha1"), zeros=True),
    Case("commit-repo-int-max-plus-1", commit(2**31, "sha1"), error=beyond_integer(str(2**31))),
    Case("commit-repo-int-min-minus-1", commit(-2**31 - 1, "sha1"), error=beyond_integer(str(-2**31 - 1))),
    Case("commit-repo-bigint-max", commit(2**63 - 1, "sha1"), error=beyond_integer(str(2**63 - 1))),
    Case("uploads-repo-int-max-plus-1", uploads(2**31, SHA1), error=beyond_integer(str(2**31))),
    # several things wrong: NULLs (parameter order), then values (parameter order)
    Case("commit-null-sha-and-bad-repo", commit(BIG_REPO, None), error=null("commit_sha")),
    Case("commit-bad-repo-and-lookback", commit(BIG_REPO, "sha1", lookback=NEG, expire_after=0),
         error=beyond_integer(str(BIG_REPO))),
    Case("commit-bad-lookback-and-expire-after", commit(R, "sha1", lookback=NEG, expire_after=0),
         error=out_of_range("lookback", "-1 days +23:59:59")),
    # a lookback past the earliest timestamp: no lower bound (v0002: a bare 22008)
    Case("commit-lookback-10000-years", commit(R, "sha1", lookback=timedelta(days=3_652_500)),
         oracle=ref_commit(R, "sha1", lookback=timedelta(days=3_652_500))),
    Case("uploads-lookback-timedelta-max", uploads(R, SHA1, lookback=timedelta.max),
         oracle=ref_uploads(R, SHA1, lookback=timedelta.max)),
    # quotes, SQL in strings, non-ASCII: plain data
    Case("commit-sha-with-quotes", commit(R, QUOTES), oracle=ref_commit(R, QUOTES)),
    Case("commit-sha-unicode", commit(R, UNICODE), oracle=ref_commit(R, UNICODE)),
    Case("commit-sha-injection-unknown", commit(R, INJECTION), oracle=ref_commit(R, INJECTION), zeros=True),
    # a bigint repo id: refused before anything is read (v0002 processed it and
    # failed only when a flake had to be stored)
    Case("uploads-bigint-repo-no-runs", uploads(BIG_REPO, lambda ids: [424242]),
         error=beyond_integer(str(BIG_REPO))),
    Case("uploads-bigint-repo-failing-run", uploads(BIG_REPO, lambda ids: [ids["big"]]),
         error=beyond_integer(str(BIG_REPO))),
]


@pytest.fixture(scope="module")
def tx_conn(shared_url):
    with psycopg.connect(shared_url) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(tx_conn, case):
    conn = tx_conn
    try:
        ids = history(conn)
        snapshot = whole_snapshot(conn, [R, OTHER])
        before = state(conn)
        if case.error:
            cls, sqlstate, message = case.error
            with pytest.raises(cls) as info:
                case.run(conn, ids)
            assert info.value.sqlstate == sqlstate
            assert re.search(message, str(info.value)), str(info.value)
            assert state(conn) == before
        else:
            want = case.oracle(snapshot, ids)
            got = case.run(conn, ids)
            assert got == want.summary
            if case.zeros:
                assert got == Summary() and state(conn) == before
            assert_state(conn, reference.apply(snapshot, want), {f.id for f in snapshot.flakes})
        # the injection-shaped shas were data: every table is still there
        assert conn.execute("select count(*) from pg_tables where tablename = 'test_analytics_flake'").fetchone() == (1,)
    finally:
        conn.rollback()


@pytest.mark.parametrize(("lookback", "verdict"), [
    ("interval '-1 mon'", "22023"),
    ("interval '1 mon -40 days'", "22023"),  # negative as a whole (a month counts 30 days)
    ("interval '-1 day +25 hours'", "ok"),  # one hour, positive as a whole
])
def test_mixed_sign_lookback_in_sql(tx_conn, lookback, verdict):
    """Intervals psycopg cannot send from a timedelta, straight in SQL."""
    conn = tx_conn
    try:
        history(conn)
        before = state(conn)
        query = f"select uploads_processed from flakectl.process_commit({R}, 'sha1', lookback => {lookback})"
        if verdict == "ok":
            assert conn.execute(query).fetchone() == (2,)
        else:
            with pytest.raises(psycopg.Error) as info, conn.transaction():
                conn.execute(query)
            assert info.value.sqlstate == verdict
            assert "argument lookback must not be negative" in info.value.diag.message_primary
            assert state(conn) == before
    finally:
        conn.rollback()


def test_the_docs_table_lists_every_case():
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_-]+)` \|", DOC.read_text(), re.MULTILINE)}
    assert rows == {case.id for case in CASES}


def test_an_upload_given_to_the_wrong_repo_is_spent(tx_conn):
    """The ledger is keyed by upload id alone: once process_uploads has
    recorded another repo's upload, that repo's own call skips it."""
    conn = tx_conn
    try:
        ids = history(conn)
        flakectl.process_uploads(conn, R, [ids["theirs"]])
        assert flakectl.process_commit(conn, OTHER, "theirs") == Summary(uploads_skipped=1)
        assert Repo(conn, OTHER).outcomes(ids["theirs"]) == [("a", "failure"), ("t", "error")]
    finally:
        conn.rollback()
