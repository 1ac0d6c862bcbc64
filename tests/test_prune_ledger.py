"""flakectl.prune_ledger (revision 0003, plpgsql/prune_ledger/v0001.sql) in SQL."""

from __future__ import annotations

import psycopg
import pytest

from flakectl import sqlfiles
from flakectl.dba import migrate


def ledger(conn: psycopg.Connection) -> list[int]:
    return [u for (u,) in conn.execute("select upload_id from flakectl.processed_upload order by 1")]


def test_deletes_rows_older_than_the_age_and_counts_them(conn):
    conn.execute("insert into flakectl.processed_upload (upload_id, repo_id, processed_at) values"
                 " (1, 1, now() - interval '3 days'), (2, 1, now() - interval '2 days 1 second'),"
                 " (3, 2, now() - interval '2 days' + interval '1 minute'), (4, 2, now())")
    assert conn.execute("select flakectl.prune_ledger(older_than => interval '2 days')").fetchone() == (2,)
    assert ledger(conn) == [3, 4]
    assert conn.execute("select flakectl.prune_ledger(interval '1 year')").fetchone() == (0,)


def test_age_is_measured_in_utc_whatever_the_time_zone(conn):
    # 2 days are 48 hours, also in a zone with DST (a change inside the last
    # two days would make `now() - interval '2 days'` 47 or 49 hours there)
    conn.execute("set timezone = 'Europe/Berlin'")
    conn.execute("insert into flakectl.processed_upload (upload_id, repo_id, processed_at) values"
                 " (1, 1, now() - interval '48 hours' - interval '1 second'),"
                 " (2, 1, now() - interval '48 hours' + interval '1 second')")
    assert conn.execute("select flakectl.prune_ledger(interval '2 days')").fetchone() == (1,)
    assert ledger(conn) == [2]


@pytest.mark.parametrize("age, state, message", [
    ("null", "22004", "flakectl: argument older_than must not be NULL"),
    ("interval '1 day'", "22023",
     "flakectl: argument older_than must be at least 2 days (twice the default lookback), got 1 day"),
    ("interval '47 hours 59 minutes'", "22023",
     "flakectl: argument older_than must be at least 2 days (twice the default lookback), got 47:59:00"),
    ("interval '-30 days'", "22023",
     "flakectl: argument older_than must be at least 2 days (twice the default lookback), got -30 days"),
])
def test_refuses_null_and_short_ages(conn, age, state, message):
    conn.execute("insert into flakectl.processed_upload (upload_id, repo_id, processed_at)"
                 " values (1, 1, now() - interval '1 year')")
    with pytest.raises(psycopg.Error) as info:
        conn.execute(f"select flakectl.prune_ledger({age})")
    assert info.value.sqlstate == state
    assert info.value.diag.message_primary == message
    conn.rollback()
    assert ledger(conn) == []  # the insert was rolled back with the failed call


def _prosrc(url: str) -> str | None:
    with psycopg.connect(url) as c:
        row = c.execute("select prosrc from pg_proc where oid = to_regproc('flakectl.prune_ledger')").fetchone()
    return row[0] if row else None


def test_revision_0003_up_down_up(empty_db_url):
    migrate.upgrade(empty_db_url, "0002")
    assert _prosrc(empty_db_url) is None
    migrate.upgrade(empty_db_url, "0003")
    assert _prosrc(empty_db_url) == sqlfiles.body("prune_ledger", 1).split("$$")[1]
    migrate.downgrade(empty_db_url, "0002")
    assert _prosrc(empty_db_url) is None
    assert migrate.current(empty_db_url) == "0002"
    migrate.upgrade(empty_db_url, "0003")
    assert migrate.current(empty_db_url) == "0003"
    assert _prosrc(empty_db_url) == sqlfiles.body("prune_ledger", 1).split("$$")[1]
