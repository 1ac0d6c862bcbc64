"""flakectl.process_commit / process_uploads against a real database, case by
case: upstream Codecov's test_ta_process_flakes.py restated in this data model,
one test per SPEC trap, exactly-once, dry run, bad input, isolation."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

import flakectl
from flakectl.model import Flake, Summary

from builders import Repo, at


@pytest.fixture
def repo(conn: psycopg.Connection) -> Repo:
    return Repo(conn)


def process(repo: Repo, sha: str = "sha1", **options) -> Summary:
    repo.conn.commit()
    result = flakectl.process_commit(repo.conn, repo.id, sha, **options)
    repo.conn.commit()
    return result


def summary(**counters) -> Summary:
    return Summary(**counters)


# --- upstream cases ----------------------------------------------------------


def test_valid_states_only(repo):
    done = repo.upload("sha1")
    started = repo.upload("sha1", state="started")
    coverage = repo.upload("sha1", report_type="coverage")
    for upload in (done, started, coverage):
        repo.runs(upload, ("a", "failure", at(upload % 100)))
    assert process(repo) == summary(uploads_processed=1, testruns_considered=1, flakes_created=1,
                                    testruns_marked=1)
    assert repo.outcomes(done) == [("a", "flaky_fail")]
    assert repo.outcomes(started) == [("a", "failure")]
    assert repo.outcomes(coverage) == [("a", "failure")]
    assert [(f.count, f.fail_count) for f in repo.flakes()] == [(1, 1)]


def test_outcome_filters(repo):
    up = repo.upload("sha1")
    repo.runs(up, ("pass", "pass", at(1)), ("skip", "skip", at(1)), ("unknown", "PASS", at(1)),
              ("fail", "failure", at(1)), ("err", "error", at(1)), ("ff", "flaky_fail", at(1)))
    assert process(repo) == summary(uploads_processed=1, testruns_considered=3, flakes_created=3,
                                    testruns_marked=2)
    assert sorted(bytes(f.test_id) for f in repo.flakes()) == [b"err", b"fail", b"ff"]
    assert repo.outcomes(up) == [("err", "flaky_fail"), ("fail", "flaky_fail"), ("ff", "flaky_fail"),
                                 ("pass", "pass"), ("skip", "skip"), ("unknown", "PASS")]


def test_update_existing(repo):
    fid = repo.flake("a", rpc=5, count=9, fail_count=4, start=at(-100), flags_id=b"fl")
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)), ("a", "failure", at(2)), ("a", "pass", at(3)))
    assert process(repo) == summary(uploads_processed=1, testruns_considered=3, flakes_updated=1,
                                    testruns_marked=1)
    assert repo.flakes() == [Flake(fid, 1, b"a", b"fl", recent_passes_count=1, count=12, fail_count=5,
                                   start_date=at(-100), end_date=None)]


def test_create_new(repo):
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)), ("a", "error", at(2)), ("a", "pass", at(3)))
    assert process(repo) == summary(uploads_processed=1, testruns_considered=3, flakes_created=1,
                                    testruns_marked=1)
    [flake] = repo.flakes()
    assert (flake.flags_id, flake.recent_passes_count, flake.count, flake.fail_count,
            flake.start_date, flake.end_date) == (None, 1, 2, 1, at(2), None)


def test_expiry_and_recreation(repo):
    old = repo.flake("a", rpc=29, count=40, fail_count=11, start=at(-100))
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)), ("a", "failure", at(2)))
    assert process(repo) == summary(uploads_processed=1, testruns_considered=2, flakes_created=1,
                                    flakes_updated=1, flakes_expired=1, testruns_marked=1)
    assert repo.flakes() == [
        Flake(old, 1, b"a", None, 30, 41, 11, at(-100), at(1)),
        Flake(old + 1, 1, b"a", None, 0, 1, 1, at(2), None),
    ]


def test_expiry_then_more_passes(repo):
    old = repo.flake("a", rpc=28, count=30, fail_count=2, start=at(-100))
    up = repo.upload("sha1")
    repo.runs(up, *[("a", "pass", at(i)) for i in range(1, 6)])
    assert process(repo) == summary(uploads_processed=1, testruns_considered=5, flakes_updated=1,
                                    flakes_expired=1)
    assert repo.flakes() == [Flake(old, 1, b"a", None, 30, 32, 2, at(-100), at(2))]


def test_outcome_updates(repo):
    up = repo.upload("sha1")
    other = repo.upload("sha2")
    repo.runs(up, ("a", "failure", at(1)), ("b", "error", at(1)), ("c", "flaky_fail", at(1)),
              ("d", "pass", at(1)))
    repo.runs(other, ("a", "failure", at(1)))
    assert process(repo).testruns_marked == 2
    assert repo.outcomes(up) == [("a", "flaky_fail"), ("b", "flaky_fail"), ("c", "flaky_fail"),
                                 ("d", "pass")]
    assert repo.outcomes(other) == [("a", "failure")]


# --- SPEC's known traps ------------------------------------------------------


def test_trap_expiring_flake_persists_every_field(repo):
    fid = repo.flake("a", rpc=29, count=50, fail_count=21, start=at(-100))
    repo.runs(repo.upload("sha1"), ("a", "pass", at(1)))
    process(repo)
    assert repo.flakes() == [Flake(fid, 1, b"a", None, 30, 51, 21, at(-100), at(1))]


def test_trap_passes_of_a_flake_opened_in_the_same_call(repo):
    uploads = [repo.upload("sha1") for _ in range(4)]
    repo.runs(uploads[0], ("a", "failure", at(0)))
    for i, up in enumerate(uploads[1:], start=1):
        repo.runs(up, ("a", "pass", at(i)))
    assert process(repo, expire_after=3) == summary(uploads_processed=4, testruns_considered=4,
                                                    flakes_created=1, flakes_expired=1, testruns_marked=1)
    [flake] = repo.flakes()
    assert (flake.recent_passes_count, flake.count, flake.fail_count, flake.start_date, flake.end_date) == (
        3, 4, 1, at(0), at(3))


def test_trap_expired_flakes_are_never_state(repo):
    history = repo.flake("a", rpc=30, count=31, fail_count=1, start=at(-300), end=at(-200))
    repo.runs(repo.upload("sha1"), ("a", "failure", at(1)), ("a", "pass", at(2)))
    assert process(repo) == summary(uploads_processed=1, testruns_considered=2, flakes_created=1,
                                    testruns_marked=1)
    assert repo.flakes() == [
        Flake(history, 1, b"a", None, 30, 31, 1, at(-300), at(-200)),
        Flake(history + 1, 1, b"a", None, 1, 2, 1, at(1), None),
    ]


def test_trap_processing_twice_counts_once(repo):
    repo.flake("a", rpc=0, count=1, fail_count=1, start=at(-100))
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)), ("a", "pass", at(2)))
    first = process(repo)
    flakes, outcomes = repo.flakes(), repo.outcomes(up)
    assert first == summary(uploads_processed=1, testruns_considered=2, flakes_updated=1, testruns_marked=1)
    assert process(repo) == summary(uploads_skipped=1)
    assert repo.flakes() == flakes
    assert repo.outcomes(up) == outcomes


def test_trap_failure_after_expiry_opens_a_new_flake(repo):
    up1, up2 = repo.upload("sha1"), repo.upload("sha2")
    repo.runs(up1, ("a", "failure", at(1)), ("a", "pass", at(2)))
    repo.runs(up2, ("a", "failure", at(3)))
    process(repo, expire_after=1)
    assert process(repo, "sha2", expire_after=1).flakes_created == 1
    assert [(f.count, f.fail_count, f.start_date, f.end_date) for f in repo.flakes()] == [
        (2, 1, at(1), at(2)), (1, 1, at(3), None)]


@pytest.mark.parametrize("rpc", [30, 31, 45])
def test_trap_row_starting_at_or_above_expire_after_expires_on_first_pass(repo, rpc):
    fid = repo.flake("a", rpc=rpc, count=rpc + 1, fail_count=1, start=at(-100))
    repo.runs(repo.upload("sha1"), ("a", "pass", at(1)), ("a", "pass", at(2)))
    assert process(repo).flakes_expired == 1
    assert repo.flakes() == [Flake(fid, 1, b"a", None, rpc + 1, rpc + 2, 1, at(-100), at(1))]


def test_trap_no_loop_in_plpgsql():
    import re
    from importlib import resources

    for path in resources.files("flakectl.plpgsql").iterdir():
        if path.is_dir() and not path.name.startswith("__"):
            for body in path.iterdir():
                text = body.read_text()
                assert not re.search(r"\b(loop|foreach)\b", text, re.IGNORECASE), body.name


# --- more of SPEC ------------------------------------------------------------


def test_failure_before_pass_at_equal_timestamp(repo):
    repo.runs(repo.upload("sha1"), ("a", "pass", at(1)), ("a", "failure", at(1)))
    process(repo)
    [flake] = repo.flakes()
    assert (flake.count, flake.recent_passes_count) == (2, 1)


def test_upload_order_beats_timestamp_order(repo):
    first, second = repo.upload("sha1"), repo.upload("sha1")
    repo.runs(first, ("a", "failure", at(10)))
    repo.runs(second, ("a", "pass", at(5)))
    process(repo, expire_after=1)
    [flake] = repo.flakes()
    assert (flake.start_date, flake.end_date, flake.count) == (at(10), at(5), 2)


def test_lookback_window_edges(repo):
    up = repo.upload("sha1")
    repo.runs(up, ("in", "failure", at(0)), ("out", "failure", at(-24 * 60)))
    got = process(repo, lookback=timedelta(hours=7))
    assert got.testruns_considered == 1
    assert repo.outcomes(up) == [("in", "flaky_fail"), ("out", "failure")]


def test_runs_of_another_repo_are_ignored(repo):
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)))
    repo.runs(up, ("b", "failure", at(1)), repo_id=2)
    assert process(repo).testruns_considered == 1
    assert repo.outcomes(up) == [("a", "flaky_fail"), ("b", "failure")]
    assert [bytes(f.test_id) for f in repo.flakes()] == [b"a"]


def test_late_upload_is_processed_by_the_next_call(repo):
    up1 = repo.upload("sha1")
    late = repo.upload("sha1", state="started")
    repo.runs(up1, ("a", "failure", at(1)))
    repo.runs(late, ("a", "failure", at(2)))
    assert process(repo).uploads_processed == 1
    repo.conn.execute("update reports_upload set state = 'processed' where id = %s", (late,))
    assert process(repo) == summary(uploads_processed=1, uploads_skipped=1, testruns_considered=1,
                                    flakes_updated=1, testruns_marked=1)
    [flake] = repo.flakes()
    assert (flake.count, flake.fail_count) == (2, 2)


def test_dry_run_writes_nothing(repo):
    fid = repo.flake("a", rpc=29, count=30, fail_count=1, start=at(-100))
    up = repo.upload("sha1")
    repo.runs(up, ("a", "pass", at(1)), ("b", "failure", at(1)))
    expected = summary(uploads_processed=1, testruns_considered=2, flakes_created=1, flakes_updated=1,
                       flakes_expired=1, testruns_marked=1)
    assert process(repo, dry_run=True) == expected
    assert repo.flakes() == [Flake(fid, 1, b"a", None, 29, 30, 1, at(-100), None)]
    assert repo.outcomes(up) == [("a", "pass"), ("b", "failure")]
    assert repo.conn.execute("select count(*) from flakectl.processed_upload").fetchone() == (0,)
    assert process(repo) == expected


def test_process_uploads_trusts_the_list(repo):
    started = repo.upload("sha1", state="started")
    repo.runs(started, ("a", "failure", at(1)))
    got = flakectl.process_uploads(repo.conn, repo.id, [None, started, started, 424242])
    assert got == summary(uploads_processed=2, testruns_considered=1, flakes_created=1, testruns_marked=1)
    ledger = repo.conn.execute("select upload_id, repo_id, commit_sha from flakectl.processed_upload"
                               " order by 1").fetchall()
    assert ledger == [(started, 1, None), (424242, 1, None)]
    assert flakectl.process_uploads(repo.conn, repo.id, [424242, started, 7]) == summary(
        uploads_processed=1, uploads_skipped=2)


def test_unknown_repo_or_commit_returns_zeros(repo):
    assert process(repo, "no-such-sha") == summary()
    assert flakectl.process_commit(repo.conn, 987654, "sha1") == summary()


def test_ledger_records_commit_sha(repo):
    up = repo.upload("sha1")
    process(repo)
    assert repo.conn.execute("select upload_id, repo_id, commit_sha from flakectl.processed_upload"
                             ).fetchall() == [(up, 1, "sha1")]


def test_existing_flake_keeps_flags_id(repo):
    fid = repo.flake("a", flags_id=b"\x01\x02")
    repo.runs(repo.upload("sha1"), ("a", "failure", at(1)))
    process(repo)
    assert [(f.id, f.flags_id) for f in repo.flakes()] == [(fid, b"\x01\x02")]


# --- bad input and isolation -------------------------------------------------

CALL = "select * from flakectl.process_commit(repo_id => %s, commit_sha => %s, lookback => %s," \
       " expire_after => %s, dry_run => %s, wait => %s)"
GOOD = dict(repo_id=1, commit_sha="sha1", lookback=timedelta(days=1), expire_after=30, dry_run=False,
            wait=True)


@pytest.mark.parametrize("name", list(GOOD))
def test_null_argument_is_22004(conn, name):
    args = {**GOOD, name: None}
    with pytest.raises(psycopg.errors.NullValueNotAllowed) as info:
        conn.execute(CALL, list(args.values()))
    assert info.value.sqlstate == "22004"
    assert name in info.value.diag.message_primary


UPLOADS_CALL = "select * from flakectl.process_uploads(repo_id => %s, upload_ids => %s::bigint[]," \
               " lookback => %s, expire_after => %s, dry_run => %s, wait => %s)"


@pytest.mark.parametrize("entry, call, second", [
    ("commit", CALL, "sha1"), ("uploads", UPLOADS_CALL, [1]),
])
def test_several_nulls_name_the_first_in_parameter_order(conn, entry, call, second):
    names = list(GOOD)
    if entry == "uploads":
        names[1] = "upload_ids"
    good = [GOOD["repo_id"], second, *list(GOOD.values())[2:]]
    for first in range(len(names)):
        args = [None if i >= first else v for i, v in enumerate(good)]
        with pytest.raises(psycopg.errors.NullValueNotAllowed) as info:
            conn.execute(call, args)
        conn.rollback()
        assert info.value.diag.message_primary == f"flakectl: argument {names[first]} must not be NULL"


def test_null_upload_ids_is_22004(conn):
    with pytest.raises(flakectl.NullArgument, match="upload_ids"):
        flakectl.process_uploads(conn, 1, None)


@pytest.mark.parametrize(("name", "value", "shown"), [
    ("lookback", timedelta(seconds=-1), "-1 days +23:59:59"),  # psycopg sends days and seconds
    ("expire_after", 0, "0"),
    ("expire_after", -5, "-5"),
])
def test_out_of_range_is_22023(conn, name, value, shown):
    with pytest.raises(flakectl.InvalidArgument) as info:
        flakectl.process_commit(conn, 1, "sha1", **{name: value})
    assert info.value.sqlstate == "22023"
    assert name in str(info.value) and shown in str(info.value)


def test_errors_change_nothing(repo):
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)))
    with pytest.raises(flakectl.InvalidArgument):
        process(repo, expire_after=0)
    assert repo.flakes() == [] and repo.outcomes(up) == [("a", "failure")]


@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
def test_snapshot_isolation_is_refused(repo, level):
    repo.runs(repo.upload("sha1"), ("a", "failure", at(1)))
    repo.conn.commit()
    repo.conn.execute(f"set transaction isolation level {level}")
    with pytest.raises(flakectl.WrongIsolationLevel) as info:
        flakectl.process_commit(repo.conn, 1, "sha1")
    assert info.value.sqlstate == "0A000"
    assert level.upper() in str(info.value)
    repo.conn.rollback()
    assert repo.flakes() == []


def test_read_uncommitted_runs_as_read_committed(repo):
    # PostgreSQL gives READ UNCOMMITTED a snapshot per statement, like READ COMMITTED
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)))
    repo.conn.commit()
    repo.conn.execute("set transaction isolation level read uncommitted")
    assert flakectl.process_commit(repo.conn, 1, "sha1") == Summary(1, 0, 1, 1, 0, 0, 1)
    repo.conn.commit()
    assert repo.outcomes(up) == [("a", "flaky_fail")]


@pytest.mark.parametrize("call, name, value", [
    (lambda c: flakectl.process_commit(c, 1, "sha1", expire_after=2**31), "expire_after", 2**31),
    (lambda c: flakectl.process_commit(c, 1, "sha1", expire_after=-(2**31) - 1), "expire_after", -(2**31) - 1),
    (lambda c: flakectl.process_commit(c, 2**63, "sha1"), "repo_id", 2**63),
    (lambda c: flakectl.process_uploads(c, 2**63, [1]), "repo_id", 2**63),
    (lambda c: flakectl.process_uploads(c, 1, [1, -(2**63) - 1]), "upload_ids", -(2**63) - 1),
])
def test_wrapper_names_ints_beyond_the_sql_types(repo, call, name, value):
    # sent as is, such an int becomes numeric and the call finds no function
    up = repo.upload("sha1")
    repo.runs(up, ("a", "failure", at(1)))
    repo.conn.commit()
    with pytest.raises(flakectl.InvalidArgument) as info:
        call(repo.conn)
    assert info.value.sqlstate == "22003"
    sql_type = "integer" if name == "expire_after" else "bigint"
    assert str(info.value) == f"flakectl: argument {name} must fit in {sql_type}, got {value}"
    assert repo.flakes() == [] and repo.outcomes(up) == [("a", "failure")]
