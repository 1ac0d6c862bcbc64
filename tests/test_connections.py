"""One wrapper, the worker's connections (issue 14): psycopg 3, psycopg2,
Django's connection and connections[alias], SQLAlchemy Connection and Session
(1.4 and 2.x). For each: the same typed row, the same exceptions with their
SQLSTATEs, and the transaction rule: committed on return when the caller had
no transaction open (seen from another connection), a savepoint inside the
caller's transaction (the caller's rollback leaves nothing; an error leaves
the caller's transaction usable)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import timedelta

import psycopg
import pytest

import flakectl
from flakectl.errors import driver_error, sqlstate_of
from flakectl.model import Summary

from builders import Repo, at
from worker_env import CALLERS, DRIVER_ENV, django_driver, django_project, module_databases  # noqa: F401

_repos = itertools.count(100)
R = 0  # the repository of the running test (setup)
DONE = Summary(uploads_processed=1, testruns_considered=1, flakes_created=1, testruns_marked=1)
AGAIN = Summary(uploads_skipped=1)


@pytest.fixture(params=CALLERS, ids=[c[0] for c in CALLERS])
def setup(request, module_databases):  # noqa: ANN001, ANN201
    """(caller, monitor, upload id): one upload of `sha1` with one failing run,
    committed, in the database the caller is connected to, of a repository
    of the test's own (global R)."""
    global R
    R = next(_repos)
    _, which, factory = request.param
    url = module_databases[which]
    with psycopg.connect(url, autocommit=True) as monitor:
        repo = Repo(monitor, R)
        upload = repo.upload("sha1")
        repo.runs(upload, ("a", "failure", at(1)))
        caller = factory(url)
        try:
            yield caller, monitor, upload
        finally:
            caller.close()


def seen(monitor: psycopg.Connection, upload: int) -> tuple:
    """What another connection sees: the run's outcome, the repo's flakes, the ledger row."""
    (outcome,) = monitor.execute("select outcome from ta_timeseries_testrun where upload_id = %s",
                                 (upload,)).fetchone()
    (flakes,) = monitor.execute("select count(*) from test_analytics_flake where repoid = %s", (R,)).fetchone()
    (ledger,) = monitor.execute("select count(*) from flakectl.processed_upload where upload_id = %s",
                                (upload,)).fetchone()
    return outcome, flakes, ledger


UNTOUCHED = ("failure", 0, 0)
PROCESSED = ("flaky_fail", 1, 1)


def backend_state(monitor: psycopg.Connection, pid: int) -> str:
    (state,) = monitor.execute("select state from pg_stat_activity where pid = %s", (pid,)).fetchone()
    return state


def test_committed_on_return_when_the_caller_has_no_transaction(setup):
    caller, monitor, upload = setup
    pid = caller.pid()
    summary = flakectl.process_commit(caller.target, R, "sha1")
    assert type(summary) is Summary
    assert summary == DONE
    assert seen(monitor, upload) == PROCESSED
    assert backend_state(monitor, pid) == "idle"  # nothing left open
    assert flakectl.process_commit(caller.target, R, "sha1") == AGAIN


def test_inside_the_callers_transaction_the_caller_rolls_back(setup):
    caller, monitor, upload = setup
    pid = caller.pid()
    with caller.transaction(rollback=True):
        assert flakectl.process_commit(caller.target, R, "sha1") == DONE
        # the caller sees the call's writes; nobody else does yet
        assert caller.execute(f"select outcome from ta_timeseries_testrun where upload_id = {upload}") == "flaky_fail"
        assert seen(monitor, upload) == UNTOUCHED
        assert backend_state(monitor, pid) == "idle in transaction"
    assert seen(monitor, upload) == UNTOUCHED
    assert backend_state(monitor, pid) == "idle"


def test_inside_the_callers_transaction_the_caller_commits(setup):
    caller, monitor, upload = setup
    with caller.transaction():
        assert flakectl.process_commit(caller.target, R, "sha1") == DONE
        assert seen(monitor, upload) == UNTOUCHED
    assert seen(monitor, upload) == PROCESSED


def test_an_error_leaves_the_callers_transaction_usable(setup):
    caller, monitor, upload = setup
    with caller.transaction():
        caller.execute(f"insert into commits (commitid, repoid) values ('mine', {R})")  # the caller's own write
        with pytest.raises(flakectl.InvalidArgument):
            flakectl.process_commit(caller.target, R, "sha1", expire_after=0)
        with pytest.raises(flakectl.NotInstalled):  # fails at the server, after the savepoint began
            _not_installed(caller, upload)
        assert flakectl.process_commit(caller.target, R, "sha1") == DONE
    assert seen(monitor, upload) == PROCESSED
    assert monitor.execute(f"select count(*) from commits where commitid = 'mine' and repoid = {R}").fetchone() == (1,)


def _not_installed(caller, upload: int) -> None:  # noqa: ANN001
    """A call failing after the savepoint began: flakectl's schema renamed inside
    the caller's transaction, the call made, the schema's name restored."""
    caller.execute("alter schema flakectl rename to flakectl_away")
    try:
        flakectl.process_uploads(caller.target, R, [upload])
    finally:
        caller.execute("alter schema flakectl_away rename to flakectl")


# (id, call, exception, SQLSTATE): outside any transaction of the caller
ERRORS = [
    ("null-repo", lambda t: flakectl.process_commit(t, None, "sha1"), flakectl.NullArgument, "22004"),
    ("null-uploads", lambda t: flakectl.process_uploads(t, R, None), flakectl.NullArgument, "22004"),
    ("negative-lookback", lambda t: flakectl.process_commit(t, R, "sha1", lookback=timedelta(days=-1)),
     flakectl.InvalidArgument, "22023"),
    ("expire-after-0", lambda t: flakectl.process_uploads(t, R, [1], expire_after=0),
     flakectl.InvalidArgument, "22023"),
    ("null-lookback", lambda t: flakectl.process_uploads(t, R, [1], lookback=None), flakectl.NullArgument, "22004"),
]


def _check(exc: flakectl.FlakectlError, cls: type, state: str) -> None:
    assert type(exc) is cls
    assert exc.sqlstate == state
    # the driver's own error is in the chain (behind Django's or SQLAlchemy's wrapper)
    assert sqlstate_of(driver_error(exc.__cause__)) == state


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_the_same_exceptions_whatever_the_driver(setup, case):
    caller, monitor, upload = setup
    _, call, cls, state = case
    pid = caller.pid()
    with pytest.raises(cls) as info:
        call(caller.target)
    _check(info.value, cls, state)
    assert backend_state(monitor, pid) == "idle"  # rolled back, nothing left open
    assert flakectl.process_commit(caller.target, R, "sha1") == DONE  # and usable


def test_lock_not_available(setup):
    caller, monitor, upload = setup
    with psycopg.connect(monitor.info.dsn) as holder:  # another worker, mid-call for the repository
        holder.execute("select 1")
        flakectl.process_uploads(holder, R, [upload], dry_run=True)
        with pytest.raises(flakectl.LockNotAvailable) as info:
            flakectl.process_commit(caller.target, R, "sha1", wait=False)
        _check(info.value, flakectl.LockNotAvailable, "55P03")
        with caller.transaction(rollback=True), pytest.raises(flakectl.LockNotAvailable):
            flakectl.process_uploads(caller.target, R, [upload], wait=False)
        holder.rollback()
    assert flakectl.process_commit(caller.target, R, "sha1", wait=False) == DONE


def test_wrong_isolation_level(setup):
    caller, monitor, upload = setup
    with caller.transaction(isolation="repeatable read", rollback=True):
        with pytest.raises(flakectl.WrongIsolationLevel) as info:
            flakectl.process_commit(caller.target, R, "sha1")
        _check(info.value, flakectl.WrongIsolationLevel, "0A000")
        assert caller.execute("select 41 + 1") == 42  # the caller's transaction goes on
    assert seen(monitor, upload) == UNTOUCHED


def test_not_installed(setup):
    caller, monitor, upload = setup
    with caller.transaction(rollback=True):
        with pytest.raises(flakectl.NotInstalled) as info:
            _not_installed(caller, upload)
        assert type(info.value) is flakectl.NotInstalled
        assert sqlstate_of(driver_error(info.value.__cause__)) == "3F000"
        assert "flakectl db upgrade" in str(info.value)


def test_upload_id_arrays_whatever_the_driver(setup):
    caller, monitor, upload = setup
    assert flakectl.process_uploads(caller.target, R, [], dry_run=True) == Summary()
    assert flakectl.process_uploads(caller.target, R, [None], dry_run=True) == Summary()
    unknown = 1000 * R + 999  # no table knows it: recorded like any other
    assert flakectl.process_uploads(caller.target, R, (upload, None, upload, unknown)) == \
        Summary(uploads_processed=2, testruns_considered=1, flakes_created=1, testruns_marked=1)
    assert seen(monitor, upload) == PROCESSED


def test_other_objects_are_refused():
    with pytest.raises(TypeError, match="cannot call through a builtins.object"):
        flakectl.process_commit(object(), R, "sha1")


@pytest.mark.skipif(os.environ.get(DRIVER_ENV) is not None, reason="already the subprocess")
def test_django_with_the_other_driver(django_project):  # noqa: ANN001
    """Django's backend binds its driver once per process: the Django tests
    again, in a process where Django uses the other one."""
    other = "psycopg" if django_driver() == "psycopg2" else "psycopg2"
    done = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "django",
         "tests/test_connections.py", "tests/test_worker_django.py"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, DRIVER_ENV: other}, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_installing_flakectl_leaves_the_callers_driver_alone():
    """No driver is required: Django's backend prefers psycopg 3 whenever it is
    importable, so a required psycopg 3 would switch the worker's Django from
    psycopg2; and `import flakectl` loads none."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    required = [Requirement(r) for r in requires("flakectl") or ()]
    unconditional = {r.name.lower() for r in required if r.marker is None}
    assert unconditional == {"alembic", "sqlalchemy"}
    assert {str(r.specifier) for r in required if r.name.lower() == "sqlalchemy" and r.marker is None} == {">=1.4"}
    done = subprocess.run([sys.executable, "-P", "-c", "import sys, flakectl; flakectl.process_commit;"
                           " print(sorted(m for m in ('psycopg', 'psycopg2', 'django', 'sqlalchemy', 'alembic')"
                           " if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]"]


@pytest.mark.parametrize("state, cls", [("40001", flakectl.ConcurrentConflict), ("55P03", flakectl.LockNotAvailable),
                                        ("42501", flakectl.PermissionDenied)])
def test_sqlstates_the_entry_points_rarely_raise_map_alike(setup, state, cls):
    """40001 (another repository's concurrent call) and 42501 (no grant) raised
    by the server through adapter.call, the entry points' one path."""
    from flakectl import adapter

    caller, monitor, upload = setup
    with pytest.raises(flakectl.FlakectlError) as info:
        adapter.call(caller.target, f"do $$ begin raise exception 'flakectl: raised' using errcode = '{state}'; end $$",
                     {}, Summary)
    _check(info.value, cls, state)
    assert str(info.value) == "flakectl: raised"
    assert flakectl.process_commit(caller.target, R, "sha1") == DONE  # the connection goes on
