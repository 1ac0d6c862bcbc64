"""The ledger of processed uploads (flakectl.processed_upload): pruning it."""

from __future__ import annotations

from datetime import timedelta

import psycopg

from flakectl.errors import wrap_exceptions


def prune(conn: psycopg.Connection, older_than: timedelta) -> int:
    """`flakectl.prune_ledger(older_than)`: delete ledger rows older than that; how many went.

    The function refuses (InvalidArgument, SQLSTATE 22023) an age shorter than
    twice the default lookback: such an upload could be processed again.
    """
    with wrap_exceptions(), conn.transaction():
        row = conn.execute("select flakectl.prune_ledger(older_than => %s)", (older_than,)).fetchone()
    assert row is not None
    return row[0]
