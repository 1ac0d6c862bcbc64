"""`flakectl demo` end to end, small: its own throwaway server, generated
history, processing, verification, the report; nothing left behind."""

from __future__ import annotations

import json
import os

import psycopg
import pytest

from flakectl.lab import demo
from flakectl.cli import main
from flakectl.lab.demo import DemoSize, Truth

SMALL = ["--commits", "4", "--uploads", "3", "--tests", "200"]


@pytest.fixture
def no_leftovers(monkeypatch):
    """The demo's own servers are stopped and their directories deleted afterwards
    (other sessions' servers may come and go in the same temp directory)."""
    started: list[demo.ThrowawayServer] = []

    class Recorded(demo.ThrowawayServer):
        def start(self):
            started.append(self)
            result = super().start()
            self.recorded_pid = self.pid
            return result

    monkeypatch.setattr(demo, "ThrowawayServer", Recorded)
    yield
    assert len(started) >= 1
    for server in started:
        assert server.base_dir and not os.path.exists(server.base_dir)
        assert server.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(server.recorded_pid, 0)


def test_truth_is_drawn_from_the_seed():
    size = DemoSize(commits=30, uploads=8, tests=3000, flaky_share=0.01, seed=1)
    truth = Truth.draw(size)
    assert truth == Truth.draw(size)
    assert len(truth.flaky) == 30
    assert all(0.02 <= p <= 0.30 for p in truth.flaky.values())
    assert truth.broken_test not in truth.flaky
    assert truth.broken_commit == 15
    assert Truth.draw(DemoSize(tests=200, flaky_share=0.001)).flaky.keys().__len__() == 1


def test_demo_small(capsys, no_leftovers):
    assert main(["demo", *SMALL]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    truth = Truth.draw(DemoSize(commits=4, uploads=3, tests=200))
    assert out[0] == "flakectl demo: 4 commits x 3 uploads x 200 tests = 2,404 test runs (seed 1)"
    assert out[2] == "flakes found: 3 tests, most failing first"
    assert "  genuinely flaky tests  2 (failure probability 2% to 30%)" in out
    assert "  found                  2" in out
    assert "  missed                 0" in out
    assert "  falsely flagged        0" in out
    broken = f"test_case_{truth.broken_test}"
    assert (f"  broken commit 2: tests/test_module_{truth.broken_test // 40:03d}.py::{broken}"
            " failed in all 3 uploads; flagged (open)") in out
    verified = [line for line in out if line.startswith("  commit ")]
    assert [line.split(":")[1] for line in verified] == [" identical", " identical"]
    assert verified[0].startswith("  commit   2: identical: 3 uploads")
    assert any(line.startswith("time per commit (process_commit, 3 uploads, ~601 runs each): median ")
               for line in out)
    err = captured.err.splitlines()
    assert err[0].startswith("flakectl demo: starting a throwaway PostgreSQL ... PostgreSQL ")
    assert err[-1] == "flakectl demo: stopping the server and deleting its files ... done"
    assert "flakectl demo: commit 2/4: verifying against the reference" in err


def test_demo_json_is_deterministic(capsys, no_leftovers):
    assert main(["demo", *SMALL, "--json", "--seed", "7"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["demo", *SMALL, "--json", "--seed", "7"]) == 0
    second = json.loads(capsys.readouterr().out)
    for data in (first, second):
        del data["seconds_per_commit"]
    assert first == second
    # with 12 runs per test, a 2%-flaky test may never fail: then it cannot be found
    assert first["missed"] == first["missed_never_failed"]
    assert first["falsely_flagged"] == []
    assert len(first["found"]) + len(first["missed"]) == first["flaky_tests"] == 2
    assert all(v["identical"] for v in first["verification"].values())
    assert sorted(first["verification"]) == ["2", "4"]


def test_demo_reports_a_difference_with_exit_1(capsys, monkeypatch, no_leftovers):
    # a deployed body that marks failures 'error' instead of 'flaky_fail'
    real = demo.generate

    def generate_then_corrupt(conn, size, truth):
        from flakectl import sqlfiles

        body = sqlfiles.body("process_upload_set", 1)
        assert body.count("set outcome = 'flaky_fail'") == 1
        # head's functions run with a pinned search_path; v0001 names the tables unqualified
        body = body.replace("\nlanguage plpgsql\n", "\nlanguage plpgsql\nset search_path = public, pg_catalog\n", 1)
        conn.execute(body.replace("set outcome = 'flaky_fail'", "set outcome = 'error'"))
        return real(conn, size, truth)

    monkeypatch.setattr(demo, "generate", generate_then_corrupt)
    assert main(["demo", *SMALL]) == 1
    out = capsys.readouterr().out.splitlines()
    verdicts = [line for line in out if line.startswith("  commit ")]
    assert [line[:25] for line in verdicts] == ["  commit   2: DIFFERENT (", "  commit   4: DIFFERENT ("]
    first = out[out.index(verdicts[0]) + 1]
    assert first.startswith("    run upload ") and first.endswith(": outcome expected flaky_fail, got error")


def test_demo_ctrl_c_leaves_nothing_behind(capsys, monkeypatch, no_leftovers):
    seen = {}

    def interrupted(conn, size, truth):
        seen["pid"] = conn.info.backend_pid
        seen["dsn"] = conn.info.dsn
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "generate", interrupted)
    assert main(["demo", *SMALL]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "flakectl: interrupted"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(seen["dsn"], connect_timeout=2)


def test_demo_split(capsys, no_leftovers):
    """demo --split: two servers, split after commit 1, the rest processed in the runs
    database; the same flakes as the one-database demo, and the main side reads them."""
    assert main(["demo", *SMALL, "--split", "--json"]) == 0
    split_report = json.loads(capsys.readouterr().out)
    # as test_demo_small finds in one database
    assert (len(split_report["found"]), split_report["missed"], split_report["falsely_flagged"]) == (2, [], [])
    assert split_report["broken"]["state"] == "open" and len(split_report["flakes"]) == 3
    assert [v["identical"] for v in split_report["verification"].values()] == [True, True]
    lines = split_report["split"]
    assert lines[0] == "commit 1 processed in the main database before the split"
    assert lines[6].startswith("[6/9] main: writers of test_analytics_flake stopped (readers go on); copied 0"
                               " flake(s) with their ids and 3 processed_upload")  # (, 0 flake_archive: 0006)
    assert lines[-2] == ("every commit processed in the runs database: the ledger holds 12 of 12 uploads,"
                         " each once (those of commit 1 skipped: the ledger moved)")
    assert lines[-1].startswith("the main database reads 3 flakes (md5 ")
    assert lines[-1].endswith(" through the link: the same as the runs database")
