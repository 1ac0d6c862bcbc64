"""flakectl.lab.replay_bench end to end at the smallest size: the table has
its columns, replay applied and dry agree with the commit-by-commit path on
every count (times are printed, never asserted)."""

from __future__ import annotations

import json

from flakectl.lab import replay_bench


def test_replay_bench_smallest(capsys):
    assert replay_bench.main(["--commits", "3", "--uploads", "2", "--tests", "60", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (point,) = data["points"]
    assert (point["commits"], point["uploads"], point["tests"]) == (3, 2, 60)
    applied, dry = point["summary_apply"], point["summary_dry"]
    assert applied["uploads_replayed"] == dry["uploads_replayed"] == 6
    # applied on the unprocessed history: everything inserted; dry on the processed one: all identical
    assert applied["flakes_live"] == 0 and applied["flakes_inserted"] == applied["flakes_replayed"]
    assert dry["flakes_identical"] == dry["flakes_live"] == dry["flakes_replayed"] == point["flakes"]
    assert dry["flakes_archived"] == dry["flakes_inserted"] == dry["testruns_marked"] == 0


def test_replay_bench_table(capsys):
    assert replay_bench.main(["--commits", "2", "--uploads", "1", "--tests", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| commits | runs | flakes | S: process_commit x commits | R_apply")
    assert lines[3].startswith("| 2 | ")
