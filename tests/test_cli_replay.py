"""`flakectl replay`, in-process through main(argv), on hand-built histories:
which uploads (the ledger within --since; --branch), the exact summary and
side-by-side lines, --apply's archive note and writes, --all, --json, and
the error paths (one line, exit 1; usage: exit 2)."""

from __future__ import annotations

import json
from datetime import UTC

import psycopg
import pytest

from builders import Repo, at


@pytest.fixture
def cli(capsys, monkeypatch):
    for name in ("FLAKECTL_DATABASE_URL", "FLAKECTL_REPO", "FLAKECTL_JSON", "FLAKECTL_EXPIRE_AFTER",
                 "FLAKECTL_SINCE", "FLAKECTL_BRANCH", "FLAKECTL_REPLAY_APPLY",
                 "FLAKECTL_ALL"):
        monkeypatch.delenv(name, raising=False)
    from flakectl.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def when(minutes: float) -> str:
    return at(minutes).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def summary(**counts: int) -> str:
    names = ["uploads_replayed", "testruns_considered", "flakes_live", "flakes_replayed",
             "flakes_identical", "flakes_archived", "flakes_inserted", "testruns_marked"]
    return "".join(f"{name:<19}  {counts.get(name, 0)}\n" for name in names)


@pytest.fixture
def corrupted(db_url):
    """Test a: fails in upload 1, passes twice in upload 2 (expire_after 2):
    processed, then corrupted as the old worker's bug left it (count and rpc
    one pass short); test b: an open flake, right."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        repo = Repo(conn, 1)
        u1 = repo.upload("c1", upload_id=11)
        u2 = repo.upload("c2", upload_id=12)
        repo.runs(u1, ("a", "failure", at(0)), ("b", "failure", at(0)))
        repo.runs(u2, ("a", "pass", at(10)), ("a", "pass", at(10)), ("b", "pass", at(10)))
        for sha in ("c1", "c2"):
            conn.execute("select flakectl.process_commit(1, %s, expire_after => 2)", (sha,))
        conn.execute("update test_analytics_flake set count = count - 1, recent_passes_count ="
                     " recent_passes_count - 1 where end_date is not null")
        ids = dict(conn.execute("select convert_from(test_id, 'UTF8'), id from test_analytics_flake"))
    return db_url, ids


def test_dry_run_apply_then_everything_identical(cli, corrupted):
    url, ids = corrupted
    code, out, err = cli("replay", "--repo", "1", "--since", "1d", "--expire-after", "2", "--dsn", url)
    head = summary(uploads_replayed=2, testruns_considered=5, flakes_live=2, flakes_replayed=2,
                   flakes_identical=1, flakes_archived=1, flakes_inserted=1)
    assert code == 0
    w = len(when(0))
    assert out == head + (
        "\n"
        "tests whose rows differ: 1\n"
        f"  test_id \\x{b'a'.hex()}\n"
        f"    {'live':<{2 + 5 + 4 + 3 + w + w + 10}}   replayed\n"
        f"    id  count  fail  rpc  {'start (UTC)':<{w}}  {'end':<{w}}   count  fail  rpc  {'start (UTC)':<{w}}  end\n"
        f"    {ids['a']:>2}      2     1    1  {when(0)}  {when(10)} |     3     1    2  {when(0)}  {when(10)}"
        "  archive, insert\n")
    assert err.splitlines() == [
        "flakectl: comparing 2 upload(s) of repository 1 in the ledger, recorded within 1d ...",
        err.splitlines()[1],
        "flakectl: dry run: nothing was written (--apply writes the repair)",
    ]
    assert err.splitlines()[1].startswith("flakectl: comparing 2 upload(s) of repository 1 in the ledger,"
                                          " recorded within 1d: done in ")

    code, out, err = cli("replay", "--repo", "1", "--since", "1d", "--expire-after", "2", "--apply", "--dsn", url)
    assert code == 0
    lines = out.splitlines()
    assert out.startswith(head)
    archived_at = lines[-2].split("(archived_at ")[1].split(")")[0]
    assert lines[-2:] == [
        f"archived 1 row(s) to flakectl.flake_archive (archived_at {archived_at}); to look at them:",
        f"  select * from flakectl.flake_archive where repoid = 1 and archived_at = '{archived_at}'"
        " order by test_id, start_date;",
    ]
    assert err.splitlines()[-1] == "flakectl: applied: the differing rows were replaced"
    with psycopg.connect(url) as conn:
        # the query printed finds the archived row, every column kept
        assert conn.execute(lines[-1].strip()).fetchall() == [
            (ids["a"], 1, b"a", None, 1, 2, 1, at(0), at(10), conn.execute(
                "select archived_at from flakectl.flake_archive").fetchone()[0])]
        assert conn.execute(
            "select convert_from(test_id, 'UTF8'), count, fail_count, recent_passes_count, id = %s"
            "  from test_analytics_flake order by 1", (ids["b"],)).fetchall() == [
            ("a", 3, 1, 2, False), ("b", 2, 1, 1, True)]

    code, out, err = cli("replay", "--repo", "1", "--since", "1d", "--expire-after", "2", "--dsn", url)
    assert (code, out) == (0, summary(uploads_replayed=2, testruns_considered=5, flakes_live=2,
                                      flakes_replayed=2, flakes_identical=2)
                           + "\nno test's rows differ: all 2 compared rows are identical\n")


def test_branch_selects_processed_test_results_uploads_of_the_branch(cli, db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        repo = Repo(conn, 1)
        for sha, branch in (("m1", "main"), ("m2", "main"), ("f1", "feature")):
            conn.execute("insert into commits (commitid, repoid, branch) values (%s, 1, %s)", (sha, branch))
        taken = repo.upload("m1", upload_id=21)
        repo.upload("m1", upload_id=22, state="started")
        repo.upload("m1", upload_id=23, report_type="coverage")
        repo.upload("f1", upload_id=24)
        old = repo.upload("m2", upload_id=25)
        conn.execute("update reports_upload set created_at = now() - interval '8 days' where id = %s", (old,))
        for upload in (21, 22, 23, 24, 25):
            repo.runs(upload, ("a", "failure", at(upload)))
    code, out, _ = cli("replay", "--repo", "1", "--since", "7d", "--branch", "main", "--json", "--dsn", db_url)
    data = json.loads(out)
    assert (code, data["uploads"], data["dry_run"]) == (0, [taken], True)
    assert data["summary"] == {"uploads_replayed": 1, "testruns_considered": 1, "flakes_live": 0,
                               "flakes_replayed": 1, "flakes_identical": 0, "flakes_archived": 0,
                               "flakes_inserted": 1, "testruns_marked": 1}
    assert data["tests"] == [{"test_id": b"a".hex(), "name": None, "live": [], "replayed": [
        {"paired": False, "id": None, "flags_id": None, "count": 1, "fail_count": 1,
         "recent_passes_count": 0, "start_date": str(at(21)), "end_date": None}]}]
    assert data["archive"] is None


def test_no_uploads_in_the_ledger_replays_nothing_and_says_why(cli, db_url):
    code, out, err = cli("replay", "--repo", "7", "--dsn", db_url)
    assert (code, out) == (0, summary())
    assert err.splitlines()[-2:] == [
        "flakectl: no uploads of repository 7 in the ledger, recorded within 30d; a history written"
        " without flakectl has no ledger rows: use --branch",
        "flakectl: dry run: nothing was written (--apply writes the repair)",
    ]


def test_first_twenty_tests_unless_all(cli, db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        repo = Repo(conn, 1)
        upload = repo.upload("c1", upload_id=31)
        repo.runs(upload, *[(f"t{n:02d}", "failure", at(0)) for n in range(25)])
        conn.execute("select flakectl.process_commit(1, 'c1')")
        conn.execute("update test_analytics_flake set fail_count = 9")
    code, out, _ = cli("replay", "--repo", "1", "--dsn", db_url)
    assert code == 0
    assert "tests whose rows differ: 25 (the first 20; --all shows every one)\n" in out
    assert out.count("  test_id \\x") == 20
    code, out, _ = cli("replay", "--repo", "1", "--all", "--dsn", db_url)
    assert "tests whose rows differ: 25\n" in out
    assert out.count("  test_id \\x") == 25


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--repo", "4294967296"], 1, "argument repo_id"),
    (["--repo", "1", "--since", "soon"], 2, "argument --since: invalid duration 'soon'"),
    (["--repo", "1", "--expire-after", "0"], 2, "argument --expire-after: must be at least 1, got 0"),
    ([], 2, "--repo is required (or set FLAKECTL_REPO)"),
])
def test_errors_are_one_line(cli, db_url, argv, code, message):
    got, out, err = cli("replay", *argv, "--dsn", db_url)
    assert (got, out) == (code, "")
    lines = [line for line in err.splitlines() if not line.startswith("flakectl: comparing")]
    assert len(lines) == 1 and lines[0].startswith("flakectl: error: ") and message in lines[0], err
