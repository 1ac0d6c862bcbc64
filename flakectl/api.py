"""The thin Python wrapper: one call, one SQL statement, one Summary.

`conn` is the caller's own connection: psycopg 3, psycopg2, Django's
(`django.db.connection`, `connections[alias]`) or SQLAlchemy's (`Connection`,
`Session`, 1.4 and 2.x); flakectl.adapter runs the statement through it.
Each call is committed on return when the caller had no transaction open, and
is a savepoint inside the caller's transaction otherwise (the caller commits
or rolls back; an error rolls back the savepoint only). Errors arrive as
flakectl exceptions (`flakectl.errors`), the same for every driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from flakectl import adapter
from flakectl.errors import InvalidArgument
from flakectl.model import ReplaySummary, Summary

_COLUMNS = ", ".join(Summary.columns())

_PROCESS_COMMIT = f"""
select {_COLUMNS}
  from flakectl.process_commit(
         repo_id => %(repo_id)s::bigint, commit_sha => %(commit_sha)s::text,
         lookback => %(lookback)s::interval, expire_after => %(expire_after)s::integer,
         dry_run => %(dry_run)s::boolean, wait => %(wait)s::boolean)
"""

_PROCESS_UPLOADS = f"""
select {_COLUMNS}
  from flakectl.process_uploads(
         repo_id => %(repo_id)s::bigint, upload_ids => %(upload_ids)s::bigint[],
         lookback => %(lookback)s::interval, expire_after => %(expire_after)s::integer,
         dry_run => %(dry_run)s::boolean, wait => %(wait)s::boolean)
"""

_REPLAY = f"""
select {", ".join(ReplaySummary.columns())}
  from flakectl.replay(
         repo_id => %(repo_id)s::bigint, upload_ids => %(upload_ids)s::bigint[],
         expire_after => %(expire_after)s::integer, dry_run => %(dry_run)s::boolean)
"""


_BIGINT = (-(2**63), 2**63 - 1)
_INTEGER = (-(2**31), 2**31 - 1)


def _check_range(name: str, value: object, bounds: tuple[int, int], sql_type: str) -> None:
    """Out-of-range ints fail here, named; sent, they would fail the call's lookup or cast."""
    if isinstance(value, int) and not bounds[0] <= value <= bounds[1]:
        raise InvalidArgument(f"flakectl: argument {name} must fit in {sql_type}, got {value}",
                              sqlstate="22003")


def _call(conn: Any, query: str, params: dict, row_type: type = Summary):
    _check_range("repo_id", params["repo_id"], _BIGINT, "bigint")
    _check_range("expire_after", params["expire_after"], _INTEGER, "integer")
    for upload_id in params.get("upload_ids") or ():
        _check_range("upload_ids", upload_id, _BIGINT, "bigint")
    return adapter.call(conn, query, params, row_type)


def process_commit(
    conn: Any,
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
    conn: Any,
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


def replay(
    conn: Any,
    repo_id: int,
    upload_ids: Sequence[int | None] | None,
    *,
    expire_after: int = 30,
    dry_run: bool = True,
) -> ReplaySummary:
    """Recompute the repository's flakes from these uploads' runs and compare
    them with the live rows (SPEC rule 11); with dry_run=False, repair them
    (docs/replay.md). A dry run unless asked."""
    return _call(conn, _REPLAY, dict(
        repo_id=repo_id, upload_ids=None if upload_ids is None else list(upload_ids),
        expire_after=expire_after, dry_run=dry_run,
    ), ReplaySummary)
