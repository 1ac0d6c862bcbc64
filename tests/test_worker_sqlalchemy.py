"""Codecov's shape, through SQLAlchemy sessions (issue 14): the worker's
other stack (SQLAlchemy 1.4 there; the nox sessions run this file under 1.4
and 2.x). Upload ids from a session on the main database, the call through a
session on the runs database (tests/django_project/sqla.py), psycopg2
underneath as in the worker. Checked against the reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import flakectl
from flakectl.model import Summary

from worker_env import (MERGED, WORKER_REPO, check, django_project, two_databases,  # noqa: F401
                        worker_data)

R = WORKER_REPO


@contextlib.contextmanager
def session_on(url: str) -> Iterator[Session]:
    engine = sqlalchemy.create_engine("postgresql+psycopg2://" + url.split("://", 1)[1])
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()



def test_the_worker_task_through_sqlalchemy_sessions(worker_data):
    from django_project import sqla

    (main_url, runs_url), snapshot = worker_data
    with session_on(main_url) as main, session_on(runs_url) as runs:
        summary = sqla.process_flakes_for_commit(main, runs, R, MERGED)
        assert not runs.in_transaction()  # committed on return
        check(main_url, runs_url, snapshot, summary)
        assert sqla.process_flakes_for_commit(main, runs, R, MERGED) == Summary(uploads_skipped=2)


def test_inside_the_sessions_transaction_the_caller_commits(worker_data):
    from django_project import sqla

    (main_url, runs_url), snapshot = worker_data
    with session_on(main_url) as main, session_on(runs_url) as runs:
        runs.execute(text("select 1"))  # the session's transaction is open
        summary = sqla.process_flakes_for_commit(main, runs, R, MERGED)
        assert runs.in_transaction()
        with pytest.raises(flakectl.InvalidArgument):  # rolls back its savepoint only
            flakectl.process_uploads(runs, R, [101], expire_after=0)
        runs.commit()
    check(main_url, runs_url, snapshot, summary)


def test_the_session_registry_the_worker_uses(worker_data):
    """The worker hands tasks a scoped_session: accepted as it is."""
    from django_project import sqla

    (main_url, runs_url), snapshot = worker_data
    engine = sqlalchemy.create_engine("postgresql+psycopg2://" + runs_url.split("://", 1)[1])
    registry = scoped_session(sessionmaker(bind=engine))
    try:
        with session_on(main_url) as main:
            summary = sqla.process_flakes_for_commit(main, registry, R, MERGED)
        assert not registry().in_transaction()
    finally:
        registry.remove()
        engine.dispose()
    check(main_url, runs_url, snapshot, summary)


def test_rolled_back_by_the_caller(worker_data):
    from django_project import sqla

    (main_url, runs_url), snapshot = worker_data
    with session_on(main_url) as main, session_on(runs_url) as runs:
        runs.begin()
        assert sqla.process_flakes_for_commit(main, runs, R, MERGED).uploads_processed == 2
        runs.rollback()
        # nothing of it is left: the same call does it all again
        summary = sqla.process_flakes_for_commit(main, runs, R, MERGED)
    check(main_url, runs_url, snapshot, summary)
