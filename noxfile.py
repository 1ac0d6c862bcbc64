"""The wrapper's and the worker integration tests on the Python versions and
SQLAlchemy series the worker and flakectl's users run (issue 14), each cell
in a virtualenv of its own (`nox` runs all four; CI, `.ci/worker-matrix`,
runs `nox -t ci`: all but the cell .venv already covers):

    wrapper(python='3.13', sqlalchemy='1.4')  the worker's environment: the issue's
                                              install line with the built wheel, and
                                              the tests run against the installed wheel
    wrapper(python='3.13', sqlalchemy='2')
    wrapper(python='3.11', sqlalchemy='1.4')  with Django 4.2 (the worker's series)
    wrapper(python='3.11', sqlalchemy='2')    also .venv's, where the whole suite runs

Only these tests run here (the full suite runs once, in .venv): the adapter
for every kind of connection, and the worker's task through Django and
SQLAlchemy, checked against the reference. Interpreters are found on PATH,
then under pyenv ($PYENV_ROOT or ~/.pyenv, whose shims may not expose them); a
version found nowhere is left out, and said so, rather than downloaded.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import nox

nox.options.error_on_missing_interpreters = True
nox.options.download_python = "never"
nox.options.default_venv_backend = "venv"

TESTS = ("tests/test_connections.py", "tests/test_worker_django.py", "tests/test_worker_sqlalchemy.py")
VERSIONS = ("3.13", "3.11")
#: the worker's install line (issue 14), the wheel appended
WORKER_PINS = ("sqlalchemy<2", "psycopg2-binary>=2.9.10", "django>=4.2.17")
#: what the tests need beside what they test
TEST_TOOLS = ("pytest>=8", "hypothesis>=6.100", "psycopg[binary]>=3.1", "testing.postgresql>=1.3")


def _works(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import venv"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def _interpreter_dir(version: str) -> str | None:
    """A directory whose `python{version}` runs (pyenv's shim may only say it is elsewhere)."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")),
                         reverse=True)
    for python in filter(None, candidates):
        if _works(python):
            return os.path.dirname(python)
    return None


def _available() -> list[str]:
    found = []
    for version in VERSIONS:
        directory = _interpreter_dir(version)
        if directory is None:
            print(f"noxfile: Python {version} not found (PATH, pyenv): its sessions are skipped",
                  file=sys.stderr)
            continue
        os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
        found.append(version)
    return found


# Python 3.11 with SQLAlchemy 2 is also .venv's (scripts/bootstrap), where the
# whole suite runs: CI (`nox -t ci`) leaves that cell out to save its minutes.
CELLS = [nox.param(python, sqlalchemy, tags=[] if (python, sqlalchemy) == ("3.11", "2") else ["ci"])
         for python in _available() for sqlalchemy in ("1.4", "2")]


@nox.session
@nox.parametrize("python,sqlalchemy", CELLS)
def wrapper(session: nox.Session, sqlalchemy: str) -> None:
    if session.python == "3.13" and sqlalchemy == "1.4":
        _worker_environment(session)
        return
    pins = ["sqlalchemy>=1.4,<2", "django>=4.2.17,<5"] if sqlalchemy == "1.4" else ["sqlalchemy>=2,<3"]
    session.install("-e", ".[test]", *pins)
    _report_versions(session)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS)


def _worker_environment(session: nox.Session) -> None:
    """The worker's install line with the wheel built from this checkout, then the
    tests run by the `pytest` script (not `python -m`, which would put the checkout
    first on sys.path): flakectl is the installed wheel's."""
    dist = session.create_tmp()
    for old in glob.glob(os.path.join(dist, "flakectl-*.whl")):
        os.remove(old)
    session.run("python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, ".")
    (wheel,) = glob.glob(os.path.join(dist, "flakectl-*.whl"))
    session.install(*WORKER_PINS, wheel)
    session.install(*TEST_TOOLS)
    _report_versions(session)
    where = session.run("python", "-I", "-c", "import flakectl; print(flakectl.__file__)", silent=True,
                        external=False).strip()
    if "site-packages" not in where:
        session.error(f"flakectl imported from {where}, not from the installed wheel")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *TESTS)


def _report_versions(session: nox.Session) -> None:
    session.run("python", "-c",
                "import sys, sqlalchemy, django, psycopg2, psycopg; print('python', sys.version.split()[0],"
                " '| sqlalchemy', sqlalchemy.__version__, '| django', django.__version__,"
                " '| psycopg2', psycopg2.__version__.split()[0], '| psycopg', psycopg.__version__)")
