"""`flakectl db grant ROLE` / `flakectl db grant --revoke ROLE`: what a worker needs.

A worker calls `flakectl.process_commit` and `flakectl.process_uploads` (dry
runs included) and nothing else of flakectl's. Both are SECURITY DEFINER
(revision 0005): they run with their owner's privileges, so the role needs
USAGE on schema flakectl and EXECUTE on those two functions, and no privilege
on any table; the grant gives exactly that, and `--revoke` takes exactly that
back. EXECUTE on every flakectl function is revoked from PUBLIC, so without
the grant a call fails with 42501 (docs/security.md).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from flakectl.dba import options as o

if TYPE_CHECKING:
    import psycopg

#: The worker's entry points, by signature.
ENTRY_POINTS = (
    "flakectl.process_commit(bigint, text, interval, integer, boolean, boolean)",
    "flakectl.process_uploads(bigint, bigint[], interval, integer, boolean, boolean)",
)


def _statements(role: str, revoke: bool) -> list:
    from psycopg import sql

    who = sql.Identifier(role)
    if revoke:
        return [*(sql.SQL("revoke execute on function {} from {}").format(sql.SQL(f), who) for f in ENTRY_POINTS),
                sql.SQL("revoke usage on schema flakectl from {}").format(who)]
    return [sql.SQL("grant usage on schema flakectl to {}").format(who),
            *(sql.SQL("grant execute on function {} to {}").format(sql.SQL(f), who) for f in ENTRY_POINTS)]


def grant(conn: psycopg.Connection, role: str) -> None:
    """USAGE on schema flakectl and EXECUTE on the two entry points, to `role`."""
    from flakectl.errors import wrap_exceptions

    with wrap_exceptions(), conn.transaction():
        for statement in _statements(role, revoke=False):
            conn.execute(statement)


def revoke(conn: psycopg.Connection, role: str) -> None:
    """Take back what `grant` gave `role`."""
    from flakectl.errors import wrap_exceptions

    with wrap_exceptions(), conn.transaction():
        for statement in _statements(role, revoke=True):
            conn.execute(statement)


# --------------------------------------------------------------------------
# `flakectl db grant`
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl db grant worker            # USAGE on flakectl, EXECUTE on the entry points\n"
                      "  flakectl db grant --revoke worker\n\n"
                      "The role gets no privilege on any table: the entry points are SECURITY DEFINER\n"
                      "(docs/security.md).")
    parser.add_argument("role", metavar="ROLE", help="the role (as PostgreSQL spells it, case included)")
    parser.add_argument("--revoke", action="store_true", help="take the grant back")
    o.dsn(parser)


def run(args: argparse.Namespace) -> int:
    from flakectl.dba.connection import connect

    with connect(args.dsn) as conn:
        (revoke if args.revoke else grant)(conn, args.role)
    if args.revoke:
        o.err(f"flakectl: revoked from {args.role}: USAGE on schema flakectl, EXECUTE on"
              " flakectl.process_commit and flakectl.process_uploads")
    else:
        o.err(f"flakectl: granted to {args.role}: USAGE on schema flakectl, EXECUTE on"
              " flakectl.process_commit and flakectl.process_uploads (and nothing on the tables)")
    return 0
