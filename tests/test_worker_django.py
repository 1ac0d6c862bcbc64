"""Codecov's shape, through Django (issue 14): two databases routed as
Codecov's router routes them, and the flake task as the worker writes it
(tests/django_project/tasks.py): upload ids from `default`, one call through
connections["ta_timeseries"]. Checked against the reference. The driver under
Django is psycopg2 here (the worker's); test_connections runs this file again
with psycopg 3."""

from __future__ import annotations

import psycopg
import pytest

import flakectl
from flakectl.model import Summary

from worker_env import (MERGED, WORKER_REPO, check, django_driver, django_project, two_databases,  # noqa: F401
                        worker_data)

R = WORKER_REPO



def test_the_router_sends_runs_to_ta_timeseries_and_reports_to_default(worker_data):
    from django.db import router

    from django_project.reports.models import ReportSession
    from django_project.ta_timeseries.models import Testrun

    (_, _), snapshot = worker_data
    assert router.db_for_read(Testrun) == "ta_timeseries"
    assert router.db_for_read(ReportSession) == router.db_for_write(ReportSession) == "default"
    assert Testrun.objects.count() == len(snapshot.testruns)  # read from the runs database
    assert ReportSession.objects.count() == len(snapshot.uploads)  # read from the main database


def test_the_worker_task_through_django(worker_data):
    from django.db import connections

    from django_project import tasks

    (main_url, runs_url), snapshot = worker_data
    assert connections["ta_timeseries"].Database.__name__ == django_driver()
    # The reports are not in the runs database: process_commit there finds nothing.
    assert flakectl.process_commit(connections["ta_timeseries"], R, MERGED, dry_run=True) == Summary()
    assert tasks.upload_ids(R, MERGED) == [101, 102]

    summary = tasks.process_flakes_for_commit(R, MERGED)

    check(main_url, runs_url, snapshot, summary)
    assert not connections["ta_timeseries"].in_atomic_block
    # exactly once: a retried or duplicated task changes nothing
    assert tasks.process_flakes_for_commit(R, MERGED) == Summary(uploads_skipped=2)
    check(main_url, runs_url, snapshot, summary)


def test_the_task_inside_the_callers_atomic_block(worker_data):
    from django.db import connections, transaction

    from django_project import tasks

    (main_url, runs_url), snapshot = worker_data
    with transaction.atomic(using="ta_timeseries"):
        summary = tasks.process_flakes_for_commit(R, MERGED)
        assert connections["ta_timeseries"].in_atomic_block
    check(main_url, runs_url, snapshot, summary)


def test_retry_mapping(worker_data):
    from django.db import connections

    from django_project import tasks

    (main_url, runs_url), snapshot = worker_data
    with psycopg.connect(runs_url) as other_worker:
        other_worker.execute("select 1")
        flakectl.process_uploads(other_worker, R, [101], dry_run=True)  # holds the repository's lock
        with pytest.raises(flakectl.LockNotAvailable) as busy:
            tasks.process_flakes_for_commit(R, MERGED)
        assert tasks.should_retry(busy.value)
        other_worker.rollback()
    with pytest.raises(flakectl.InvalidArgument) as bad:
        flakectl.process_uploads(connections["ta_timeseries"], R, [101], expire_after=0)
    assert bad.value.sqlstate == "22023"
    assert not tasks.should_retry(bad.value)
    # the retry does everything
    check(main_url, runs_url, snapshot, tasks.process_flakes_for_commit(R, MERGED))
