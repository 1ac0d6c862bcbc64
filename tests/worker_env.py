"""Fixtures and callers for the tests of the worker's connections (issue 14).

`two_databases`: a test's own main and runs databases (copies of the migrated
template), with the Django test project (tests/django_project) aimed at them.
Django is configured once per process, with the driver named by
$FLAKECTL_DJANGO_DRIVER: psycopg2 by default (the worker's); test_connections
runs the Django tests once more in a subprocess with psycopg 3.

`CALLERS`: every kind of connection flakectl accepts, each with the
transaction handling its users write (`Caller.transaction`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest

from flakectl import reference
from flakectl.dba import migrate
from flakectl.model import Commit, CommitReport, Flake, Snapshot, Summary, TestRun, Upload

import dbdata
from conftest import TEMPLATE, create_database, drop_database

DRIVER_ENV = "FLAKECTL_DJANGO_DRIVER"
_names = itertools.count()


def django_driver() -> str:
    return os.environ.get(DRIVER_ENV) or "psycopg2"


@pytest.fixture(scope="session")
def django_project(server, template_url) -> str:  # noqa: ANN001
    """Django configured (once per process); the driver its backend uses."""
    pytest.importorskip("django", reason="Django is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the test extra: pip install -e '.[test]'")
    from django_project import settings

    driver = django_driver()
    settings.configure(template_url, template_url, driver=driver)
    return driver


@contextlib.contextmanager
def _two_databases(server) -> Iterator[tuple[str, str]]:  # noqa: ANN001
    from django.db import connections

    from django_project import settings

    n = next(_names)
    names = (f"w{os.getpid()}_{n}_main", f"w{os.getpid()}_{n}_runs")
    urls = tuple(create_database(server, name, TEMPLATE) for name in names)
    settings.point_at(*urls)
    try:
        yield urls
    finally:
        connections.close_all()
        for name in names:
            drop_database(server, name)


@pytest.fixture
def two_databases(server, django_project) -> Iterator[tuple[str, str]]:  # noqa: ANN001
    """(main URL, runs URL), a test's own: Django's `default` and `ta_timeseries`."""
    with _two_databases(server) as urls:
        yield urls


@pytest.fixture(scope="module")
def module_databases(server, django_project) -> Iterator[tuple[str, str]]:  # noqa: ANN001
    """The same, shared by a module's tests (each test then uses a repository of its own)."""
    with _two_databases(server) as urls:
        yield urls


# --- callers ------------------------------------------------------------------


class Caller:
    """A connection as its users hold it. `target` is what they pass to flakectl."""

    name = ""
    target: Any

    def execute(self, sql: str) -> Any:
        """Run `sql` the caller's way; the first column of its first row, if any."""
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self, *, isolation: str | None = None, rollback: bool = False) -> Iterator[None]:
        """The caller's own transaction: committed at the end, or rolled back."""
        raise NotImplementedError
        yield

    def pid(self) -> int:
        with self.transaction():
            return self.execute("select pg_backend_pid()")

    def close(self) -> None:
        pass


def _isolation(isolation: str | None) -> str:
    return f"set transaction isolation level {isolation}" if isolation else "select 1"


class Psycopg(Caller):
    def __init__(self, url: str, *, autocommit: bool):
        self.name = "psycopg autocommit" if autocommit else "psycopg"
        self.target = psycopg.connect(url, autocommit=autocommit)

    def execute(self, sql: str) -> Any:
        cur = self.target.execute(sql)
        row = cur.fetchone() if cur.description else None
        return row[0] if row else None

    @contextlib.contextmanager
    def transaction(self, *, isolation=None, rollback=False):  # noqa: ANN001, ANN201
        with self.target.transaction():
            self.execute(_isolation(isolation))
            yield
            if rollback:
                raise psycopg.Rollback()

    def close(self) -> None:
        self.target.close()


class Psycopg2(Caller):
    def __init__(self, url: str, *, autocommit: bool):
        import psycopg2

        self.name = "psycopg2 autocommit" if autocommit else "psycopg2"
        self.target = psycopg2.connect(url)
        self.target.autocommit = autocommit

    def execute(self, sql: str) -> Any:
        with self.target.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone() if cur.description else None
        return row[0] if row else None

    @contextlib.contextmanager
    def transaction(self, *, isolation=None, rollback=False):  # noqa: ANN001, ANN201
        if self.target.autocommit:
            self.execute("begin")
        self.execute(_isolation(isolation))  # psycopg2 begins here when not in autocommit
        yield
        if self.target.autocommit:
            self.execute("rollback" if rollback else "commit")
        elif rollback:
            self.target.rollback()
        else:
            self.target.commit()

    def close(self) -> None:
        self.target.close()


def _engine(url: str, driver: str):  # noqa: ANN202
    from sqlalchemy import create_engine

    # One pooled connection: a Session returns it to the pool at the end of its
    # transaction, and gets the same backend again (its pid stays meaningful).
    return create_engine(f"postgresql+{driver}://" + url.split("://", 1)[1], pool_size=1, max_overflow=0)


def sqlalchemy_drivers() -> list[str]:
    """psycopg2 (the worker's) always; psycopg 3 where SQLAlchemy has its dialect (2.x)."""
    return ["psycopg2", "psycopg"] if migrate.SQLALCHEMY_2 else ["psycopg2"]


class SQLAlchemyConnection(Caller):
    def __init__(self, url: str, driver: str):
        self.name = f"sqlalchemy Connection ({driver})"
        self.engine = _engine(url, driver)
        self.target = self.engine.connect()

    def execute(self, sql: str) -> Any:
        result = self.target.exec_driver_sql(sql)
        return result.scalar() if result.returns_rows else None

    @contextlib.contextmanager
    def transaction(self, *, isolation=None, rollback=False):  # noqa: ANN001, ANN201
        tx = self.target.begin()
        self.execute(_isolation(isolation))
        yield
        tx.rollback() if rollback else tx.commit()

    def close(self) -> None:
        self.target.close()
        self.engine.dispose()


class SQLAlchemySession(Caller):
    def __init__(self, url: str, driver: str):
        from sqlalchemy.orm import Session

        self.name = f"sqlalchemy Session ({driver})"
        self.engine = _engine(url, driver)
        self.target = Session(self.engine)

    def execute(self, sql: str) -> Any:
        from sqlalchemy import text

        result = self.target.execute(text(sql))
        return result.scalar() if result.returns_rows else None

    @contextlib.contextmanager
    def transaction(self, *, isolation=None, rollback=False):  # noqa: ANN001, ANN201
        self.target.begin()
        self.execute(_isolation(isolation))
        yield
        self.target.rollback() if rollback else self.target.commit()

    def close(self) -> None:
        self.target.close()
        self.engine.dispose()


class Django(Caller):
    def __init__(self, alias: str | None):
        from django.db import connection, connections

        self.alias = alias or "default"
        self.name = f"django connections[{alias!r}]" if alias else "django.db.connection"
        self.target = connections[alias] if alias else connection

    def execute(self, sql: str) -> Any:
        from django.db import connections

        with connections[self.alias].cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone() if cur.description else None
        return row[0] if row else None

    @contextlib.contextmanager
    def transaction(self, *, isolation=None, rollback=False):  # noqa: ANN001, ANN201
        from django.db import transaction

        with transaction.atomic(using=self.alias):
            self.execute(_isolation(isolation))
            yield
            if rollback:
                transaction.set_rollback(True, using=self.alias)


#: (id, which database of `two_databases`, factory)
CALLERS = [
    ("psycopg", 0, lambda url: Psycopg(url, autocommit=False)),
    ("psycopg-autocommit", 0, lambda url: Psycopg(url, autocommit=True)),
    ("psycopg2", 0, lambda url: Psycopg2(url, autocommit=False)),
    ("psycopg2-autocommit", 0, lambda url: Psycopg2(url, autocommit=True)),
    *[(f"sqlalchemy-connection-{d}", 1, lambda url, d=d: SQLAlchemyConnection(url, d))
      for d in sqlalchemy_drivers()],
    *[(f"sqlalchemy-session-{d}", 1, lambda url, d=d: SQLAlchemySession(url, d))
      for d in sqlalchemy_drivers()],
    ("django-connection", 0, lambda url: Django(None)),
    ("django-connections-ta_timeseries", 1, lambda url: Django("ta_timeseries")),
]


# --- the worker's data, split over the two databases ---------------------------

MERGED = "merge1"
#: the repository of worker_snapshot in the worker-shaped tests
WORKER_REPO = 5


def worker_snapshot(repo_id: int) -> Snapshot:
    """A merged commit of `repo_id` with two processed test-results uploads, and
    what must not count: a started upload, a coverage report, another commit,
    another repository's run, a run older than the lookback; an open flake
    that expires, a history row, tests that only pass or skip."""
    from builders import at

    r = repo_id
    commits = (Commit(1, MERGED, r), Commit(2, "other", r), Commit(3, MERGED, r + 1))
    reports = (CommitReport(10, 1), CommitReport(11, 1, report_type="coverage"), CommitReport(12, 2),
               CommitReport(13, 3))
    uploads = (Upload(101, 10), Upload(102, 10), Upload(103, 10, state="started"), Upload(111, 11),
               Upload(121, 12), Upload(131, 13))
    runs = [
        # (upload, test, outcome, minutes after the base)
        (101, b"flaky", "failure", 1), (102, b"flaky", "pass", 2), (102, b"flaky", "failure", 3),
        (101, b"open", "pass", 1), (102, b"open", "pass", 2), (102, b"open", "failure", 4),
        (101, b"history", "error", 1),
        (101, b"pass", "pass", 1), (102, b"pass", "pass", 2), (101, b"skip", "skip", 1),
        (101, b"retried", "failure", 5), (101, b"retried", "pass", 5),
        (103, b"flaky", "failure", 6), (111, b"flaky", "failure", 6), (121, b"other", "failure", 6),
        (101, b"old", "failure", -60 * 24 * 2),
    ]
    testruns = [TestRun(key, at(minutes), test, outcome, r, upload) for key, (upload, test, outcome, minutes)
                in enumerate(runs)]
    testruns.append(TestRun(len(runs), at(1), b"flaky", "failure", r + 1, 101))  # another repository's
    flakes = (
        Flake(9001, r, b"open", None, recent_passes_count=28, count=40, fail_count=12, start_date=at(-600)),
        Flake(9002, r, b"history", b"\x01", recent_passes_count=30, count=31, fail_count=1,
              start_date=at(-900), end_date=at(-300)),
    )
    return Snapshot(now=datetime.now(timezone.utc), commits=commits, reports=reports, uploads=uploads,
                    testruns=tuple(testruns), flakes=flakes)


def load(main_url: str, runs_url: str, s: Snapshot) -> None:
    """Commits and reports into the main database; runs and flakes into the runs database."""
    with psycopg.connect(main_url) as main:
        dbdata.insert(main, replace(s, testruns=(), flakes=(), ledger=frozenset()))
    with psycopg.connect(runs_url) as runs:
        dbdata.insert(runs, replace(s, commits=(), reports=(), uploads=()))


def check(main_url: str, runs_url: str, s: Snapshot, got: Summary, *, expire_after: int = 30) -> None:
    """The call did what the reference's process_commit does, all of it in the
    runs database, and nothing in the main database."""
    want = reference.process_commit(s, s.commits[0].repoid, MERGED, expire_after=expire_after)
    assert got == want.summary
    with psycopg.connect(runs_url) as runs:
        dbdata.assert_state(runs, reference.apply(s, want), {f.id for f in s.flakes})
    with psycopg.connect(main_url) as main:
        assert dbdata.all_flakes(main) == []
        assert dbdata.all_runs(main) == Counter()
        assert dbdata.ledger(main) == frozenset()


@pytest.fixture
def worker_data(two_databases) -> tuple[tuple[str, str], Snapshot]:  # noqa: ANN001
    """((main URL, runs URL), snapshot): worker_snapshot(WORKER_REPO) loaded, split."""
    snapshot = worker_snapshot(WORKER_REPO)
    load(*two_databases, snapshot)
    return two_databases, snapshot
