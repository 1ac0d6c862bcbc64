"""A repair from history, end to end, on a throwaway PostgreSQL.

    python -m flakectl.lab.replay_demo [--commits 30] [--uploads 8] [--tests 3000] [--expire-after 3]

Generates `flakectl demo`'s history (flakectl.lab.demo.generate), processes
every commit with flakectl.process_commit, then corrupts the flake rows the
way the old worker's bug did (SPEC "Known traps": an expiring flake got only
its end_date written, so its count and recent_passes_count stayed at their
values before the expiring pass), and runs the real `flakectl replay`
command three times: a dry run, --apply, and a second dry run that finds
everything identical. Each command line and its exact output (stdout, then
stderr) are printed; docs/replay.md quotes them. The server is gone afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

import psycopg

from flakectl import api, cli
from flakectl.dba import migrate
from flakectl.lab.demo import REPO_ID, DemoSize, Truth, generate
from flakectl.lab.pgserver import ThrowawayServer

# The old worker's bug, applied to every expired row: the expiring pass is
# missing from count and recent_passes_count (only end_date was written).
CORRUPT = """
update test_analytics_flake
   set count = count - 1, recent_passes_count = recent_passes_count - 1
 where repoid = %s and end_date is not null
"""


def _run_cli(argv: list[str], url: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*argv, "--dsn", url])
    shown = " ".join(["flakectl", *argv])
    return f"$ {shown}\n{out.getvalue()}{err.getvalue()}(exit {code})\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flakectl.lab.replay_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=30)
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--tests", type=int, default=3000)
    parser.add_argument("--flaky-share", type=float, default=0.01)
    parser.add_argument("--expire-after", type=int, default=3,
                        help="the demo history is short: a small value makes flakes expire")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    size = DemoSize(commits=args.commits, uploads=args.uploads, tests=args.tests,
                    flaky_share=args.flaky_share, seed=args.seed)
    with ThrowawayServer() as server:
        migrate.upgrade(server.url)
        with psycopg.connect(server.url, autocommit=True) as conn:
            shas, _, runs = generate(conn, size, Truth.draw(size))
            for sha in shas:
                api.process_commit(conn, REPO_ID, sha, expire_after=args.expire_after)
            (flakes, expired) = conn.execute(
                "select count(*), count(end_date) from test_analytics_flake where repoid = %s",
                (REPO_ID,)).fetchone()
            corrupted = conn.execute(CORRUPT, (REPO_ID,)).rowcount
        print(f"# {size.commits} commits x {size.uploads} uploads x {size.tests} tests: {runs} runs;"
              f" processed with expire_after={args.expire_after}: {flakes} flakes, {expired} expired;"
              f" {corrupted} expired rows corrupted (count and recent_passes_count one pass short)\n")
        common = ["replay", "--repo", str(REPO_ID), "--since", "1d", "--expire-after", str(args.expire_after)]
        for extra in ([], ["--apply"], []):
            sys.stdout.write(_run_cli(common + extra, server.url) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
