"""Several sessions on one database, driven deterministically.

The pattern (absurd's): a session that must block runs in a thread on its
own connection with its own `application_name`; the test polls
`pg_stat_activity` from a monitor connection until that session waits on the
lock it should wait on, then acts. Nothing sleeps for longer than a polling
interval, and `statement_timeout` bounds every statement of every session, so
a bug shows up as an error, never as a hung test run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from flakectl.model import Snapshot, TestRun
from flakectl.dba.snapshot import read_snapshot

from dbdata import all_flakes, all_runs, ledger

#: the advisory lock key 1 of flakectl.guard (key 2 is the repository id)
LOCK_NAMESPACE = 1718381411
#: bound on every statement of every session, and on every wait of the test
TIMEOUT_S = 20
POLL_S = 0.005


def connect(url: str, name: str, *, autocommit: bool = False, timeout_s: float = TIMEOUT_S) -> psycopg.Connection:
    """A session named `name` whose statements give up after `timeout_s`."""
    return psycopg.connect(url, application_name=name, autocommit=autocommit,
                           options=f"-c statement_timeout={int(timeout_s * 1000)}")


def wait_until(monitor: psycopg.Connection, name: str, wait_event_type: str, wait_event: str) -> int:
    """Poll until the session named `name` waits on (`wait_event_type`,
    `wait_event`); return its backend pid. `monitor` must be in autocommit
    mode: pg_stat_activity is a snapshot per transaction."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        row = monitor.execute(
            "select pid, wait_event_type, wait_event, state from pg_stat_activity where application_name = %s",
            (name,),
        ).fetchone()
        if row is not None and row[1:3] == (wait_event_type, wait_event):
            return row[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"session {name!r} never waited on {wait_event_type}/{wait_event}; last seen {row}")
        time.sleep(POLL_S)


def wait_for_advisory_lock(monitor: psycopg.Connection, name: str, repo_id: int) -> int:
    """Wait until `name` waits for repository `repo_id`'s flakectl lock; its pid."""
    pid = wait_until(monitor, name, "Lock", "advisory")
    waiting = monitor.execute(
        "select classid::bigint, objid::bigint, objsubid from pg_locks"
        " where pid = %s and locktype = 'advisory' and not granted", (pid,),
    ).fetchall()
    assert waiting == [(LOCK_NAMESPACE, repo_id, 2)], waiting
    return pid


def holds_repo_lock(monitor: psycopg.Connection, repo_id: int) -> list[int]:
    """The pids holding repository `repo_id`'s flakectl lock."""
    return [pid for (pid,) in monitor.execute(
        "select pid from pg_locks where locktype = 'advisory' and granted"
        " and classid::bigint = %s and objid::bigint = %s and objsubid = 2",
        (LOCK_NAMESPACE, repo_id),
    )]


class InThread:
    """Run `work(conn)` in a thread on a session of its own, named `name`.

    The connection is opened here and always closed by `join`; the result or
    the exception raised is kept for the test to inspect.
    """

    def __init__(self, url: str, name: str, work: Callable[[psycopg.Connection], Any], *,
                 autocommit: bool = False):
        self.name = name
        self.conn = connect(url, name, autocommit=autocommit)
        self.result: Any = None
        self.error: BaseException | None = None
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._work(self.conn)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def join(self) -> Any:
        """Wait for the work (bounded), close the session, re-raise its error."""
        self._thread.join(TIMEOUT_S + 5)
        alive = self._thread.is_alive()
        if alive:  # statement_timeout should have fired: cancel, then give up
            self.conn.cancel()
            self._thread.join(5)
        self.conn.close()
        assert not alive, f"session {self.name!r} did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def join_all(sessions: list[InThread]) -> list[Any]:
    """Join every session (closing every connection), then raise the first error."""
    errors, results = [], []
    for session in sessions:
        try:
            results.append(session.join())
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return results


def state(conn: psycopg.Connection) -> tuple:
    """Everything a call may change: flake rows, run outcomes, ledger rows."""
    ledger_rows = conn.execute(
        "select upload_id, repo_id, commit_sha, processed_at from flakectl.processed_upload order by upload_id"
    ).fetchall()
    return all_flakes(conn), all_runs(conn), ledger_rows


def whole_snapshot(conn: psycopg.Connection, repos: list[int]) -> Snapshot:
    """The commits, reports, uploads and flakes of `repos`, every run in the
    table and the whole ledger: the state `dbdata.assert_state` compares a
    database with."""
    parts = [read_snapshot(conn, repo) for repo in repos]
    runs = conn.execute(
        "select timestamp, test_id, outcome, repo_id, upload_id, commit_sha from ta_timeseries_testrun"
        " order by upload_id, timestamp, test_id, outcome"
    ).fetchall()
    return Snapshot(
        now=parts[0].now,
        commits=tuple(c for part in parts for c in part.commits),
        reports=tuple(r for part in parts for r in part.reports),
        uploads=tuple(u for part in parts for u in part.uploads),
        testruns=tuple(TestRun(key, ts, bytes(test), outcome, repo, upload, sha)
                       for key, (ts, test, outcome, repo, upload, sha) in enumerate(runs)),
        flakes=tuple(f for part in parts for f in part.flakes),
        ledger=ledger(conn),
    )
