"""The ledger of processed uploads (flakectl.processed_upload): pruning it."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TYPE_CHECKING

from flakectl.dba import options as o
from flakectl.dba.durations import EXAMPLES, format_duration
from flakectl.errors import InvalidArgument, wrap_exceptions

if TYPE_CHECKING:
    import psycopg


def prune(conn: psycopg.Connection, older_than: timedelta) -> int:
    """`flakectl.prune_ledger(older_than)`: delete ledger rows older than that; how many went.

    The function refuses (InvalidArgument, SQLSTATE 22023) an age shorter than
    twice the default lookback: such an upload could be processed again.
    """
    with wrap_exceptions(), conn.transaction():
        row = conn.execute("select flakectl.prune_ledger(older_than => %s)", (older_than,)).fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------
# `flakectl prune`
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl prune --older-than 30d\n\n"
                      "Ages under 2d (twice the default lookback) are refused: such an upload could be\n"
                      "processed, and counted, again.")
    o.dsn(parser)
    o.option(parser, "--older-than", type=o.duration, required=True, metavar="DURATION",
             help=f"the age, e.g. {EXAMPLES}")
    o.json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from flakectl.dba.connection import connect

    with connect(args.dsn) as conn:
        try:
            deleted = prune(conn, args.older_than)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{o.plain(exc)}; use --older-than 2d or longer") from exc
    if args.json:
        o.print_json({"deleted": deleted, "older_than_seconds": int(args.older_than.total_seconds())})
    else:
        o.out(f"pruned {deleted} ledger row(s) older than {format_duration(args.older_than)}")
    return 0
