"""`flakectl bench` end to end at a tiny size: A and B agree, C counts A's
rows, and the output has its columns. Nothing here looks at a time."""

from __future__ import annotations

import argparse
import io
import json
import re

import psycopg
import pytest

from flakectl.lab import bench, benchdata, benchfleet

TINY = ["--uploads", "3", "--tests", "200", "--other-rows", "2000", "--repeat", "1"]


def run_bench(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = bench.run(parser.parse_args(list(argv)), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("shape", benchdata.SHAPES)
def test_paths_agree_json(db_url, shape):
    code, out, err = run_bench("--dsn", db_url, "--shape", shape, *TINY, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["environment"]["server_version"]
    (result,) = data["results"]
    assert result["agree"] is True and result["problems"] == []
    assert result["workload"]["shape"] == shape
    assert result["runs_in_commit"] >= 3 * 200
    paths = result["paths"]
    assert set(paths) == {"A", "B", "C", "W"}
    assert data["protocol"] == bench.PROTOCOL
    for stats in paths.values():
        assert {"median_s", "min_s", "max_s", "rows", "buffers", "buffers_read", "peak_kb",
                "seconds_per_call"} <= set(stats)
        assert stats["buffers"] > 0
        assert stats["peak_kb"] > 0  # the server runs on this machine
    # the generic-plan guard: at least ten function calls on one connection
    assert len(paths["A"]["seconds_per_call"]) >= bench.MIN_FUNCTION_CALLS
    # the floor counts exactly the rows the function considers; B fetches them all
    assert paths["C"]["rows"] == paths["A"]["rows"] == result["summary"]["testruns_considered"]
    assert paths["W"]["rows"] == paths["C"]["rows"]
    # the write floor marks exactly the runs the function marks
    assert paths["W"]["marked"] == result["summary"]["testruns_marked"]
    assert paths["B"]["rows"] >= result["runs_in_commit"] - result["runs_in_commit"] // 97 - 3
    assert result["summary"]["uploads_processed"] == 3
    assert result["b_over_a"] > 0 and result["a_over_c"] > 0 and result["a_over_w"] > 0


def test_text_output_and_scratch_schema_dropped(db_url):
    code, out, err = run_bench("--dsn", db_url, *TINY, "--explain")
    assert code == 0, err
    assert "| path | median | min | max | rows | buffers | not in shared buffers | peak backend memory |" in out
    for path in ("A function", "B worker path", "C read floor", "W write floor"):
        assert f"| {path} |" in out
    assert "B/A = " in out and "A/C = " in out and "A/W = " in out
    assert bench.PROTOCOL + "." in out
    assert "A and B agree" in out
    assert "Update on ta_timeseries_testrun" in out  # --explain: the function's statements
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select to_regnamespace(%s)", (benchdata.SCHEMA,)).fetchone()[0] is None
        # the real tables and ledger are untouched
        assert conn.execute("select count(*) from ta_timeseries_testrun").fetchone()[0] == 0
        assert conn.execute("select count(*) from flakectl.processed_upload").fetchone()[0] == 0


def test_sizes_table(db_url, monkeypatch):
    monkeypatch.setattr(bench, "SIZES", (20, 60))
    code, out, err = run_bench("--dsn", db_url, "--sizes", "--other-rows", "500", "--repeat", "1")
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("| runs in commit")]
    assert table == ["| runs in commit | tests x uploads | rows considered | A median | A vs previous"
                     " | B median | C median | W median | B/A | A/C | A/W | A buffers | A peak memory |"]
    rows = [line for line in out.splitlines() if line.startswith("| 1,0") or line.startswith("| 3,")]
    assert len(rows) == 2


def test_refuses_without_flakectl(empty_db_url):
    code, out, err = run_bench("--dsn", empty_db_url, *TINY)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("flakectl: error: ")
    assert "flakectl is not installed" in err
    assert out == ""


def test_throwaway_server_default():
    code, out, err = run_bench("--uploads", "2", "--tests", "100", "--other-rows", "0", "--repeat", "1",
                               "--statements", "2")
    assert code == 0, err
    assert "starting a throwaway PostgreSQL" in err
    assert "shared_buffers 512MB" in out
    # --statements: planning and execution of the function's own statements
    assert "| plan ms | exec ms | calls | plans | rows | statement |" in out
    # head's bodies run as a private copy in the scratch schema (benchdata.install_functions)
    assert "| 2 | 2 | 1 | select * from flakectl_bench.process_commit($1, $2) |" in out
    # the generic-plan guard: the statement that reads (and marks) runs, the state
    # machine's one statement, is planned on every call
    (main,) = [line for line in out.splitlines() if "with open_flake as materialized (" in line]
    assert main.split(" | ")[2:4] == ["2", "2"]


def test_statements_needs_pg_stat_statements(db_url):
    code, out, err = run_bench("--dsn", db_url, *TINY, "--statements", "1")
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("flakectl: error: --statements: ")


def test_fleet(db_url, monkeypatch):
    monkeypatch.setattr(benchfleet, "FLEET_CLASSES", (("tiny", 50, 1, 20), ("small", 25, 2, 50),
                                                      ("large", 25, 3, 200)))
    code, out, err = run_bench("--dsn", db_url, "--fleet", "--fleet-commits", "8", "--fleet-k", "1,3",
                               "--other-rows", "500", "--json")
    assert code == 0, err + out
    fleet = json.loads(out)["fleet"]
    assert fleet["problems"] == []
    assert [c["size"] for c in fleet["commits"]].count("tiny") == 4
    assert sorted(c["index"] for c in fleet["commits"]) == list(range(8))
    assert [(r["k"], r["path"]) for r in fleet["runs"]] == [(1, "A"), (1, "B"), (3, "A"), (3, "B")]
    for r in fleet["runs"]:
        assert r["commits"] == 8 * benchfleet.ROUNDS[r["path"]] == 8 * r["rounds"]
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["lock_waits_other_repo"] == 0
    # text: the table and the verdict
    code, out, err = run_bench("--dsn", db_url, "--fleet", "--fleet-commits", "3", "--fleet-k", "1",
                               "--other-rows", "0")
    assert code == 0, err
    assert "| K | A commits/s | B commits/s | A/B throughput |" in out
    assert out.rstrip().endswith("no lock waits between different repositories")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select to_regnamespace(%s)", (benchdata.SCHEMA,)).fetchone()[0] is None


@pytest.mark.parametrize("value", ["0,2", "1,x", ""])
def test_fleet_k_is_checked(value, capsys):
    with pytest.raises(SystemExit) as exc:
        run_bench("--fleet", "--fleet-k", value)
    assert exc.value.code == 2
    assert "argument --fleet-k: " in capsys.readouterr().err
