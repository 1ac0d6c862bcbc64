"""The thin Python wrapper: one call, one SQL statement, one Summary.

Each call runs in `conn.transaction()`: committed on return when the
connection had no transaction open, a savepoint inside the caller's
transaction otherwise (the caller commits). Errors arrive as flakectl
exceptions (`flakectl.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import psycopg
from psycopg.rows import class_row

from flakectl.errors import wrap_exceptions
from flakectl.model import Summary

_COLUMNS = ", ".join(Summary.columns())

_PROCESS_COMMIT = f"""
select {_COLUMNS}
  from flakectl.process_commit(
         repo_id => %(repo_id)s, commit_sha => %(commit_sha)s, lookback => %(lookback)s,
         expire_after => %(expire_after)s, dry_run => %(dry_run)s, wait => %(wait)s)
"""

_PROCESS_UPLOADS = f"""
select {_COLUMNS}
  from flakectl.process_uploads(
         repo_id => %(repo_id)s, upload_ids => %(upload_ids)s::bigint[], lookback => %(lookback)s,
         expire_after => %(expire_after)s, dry_run => %(dry_run)s, wait => %(wait)s)
"""


def _call(conn: psycopg.Connection, query: str, params: dict) -> Summary:
    with wrap_exceptions(), conn.transaction(), conn.cursor(row_factory=class_row(Summary)) as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    assert row is not None  # both functions return exactly one row
    return row


def process_commit(
    conn: psycopg.Connection,
    repo_id: int,
    commit_sha: str,
    *,
    lookback: timedelta = timedelta(days=1),
    expire_after: int = 30,
    dry_run: bool = False,
    wait: bool = True,
) -> Summary:
    """Process every new `processed` test-results upload of one commit."""
    return _call(conn, _PROCESS_COMMIT, dict(
        repo_id=repo_id, commit_sha=commit_sha, lookback=lookback,
        expire_after=expire_after, dry_run=dry_run, wait=wait,
    ))


def process_uploads(
    conn: psycopg.Connection,
    repo_id: int,
    upload_ids: Sequence[int | None] | None,
    *,
    lookback: timedelta = timedelta(days=1),
    expire_after: int = 30,
    dry_run: bool = False,
    wait: bool = True,
) -> Summary:
    """Process the given uploads of a repository (the list is trusted as is)."""
    return _call(conn, _PROCESS_UPLOADS, dict(
        repo_id=repo_id, upload_ids=None if upload_ids is None else list(upload_ids),
        lookback=lookback, expire_after=expire_after, dry_run=dry_run, wait=wait,
    ))
