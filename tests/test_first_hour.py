"""What a new user meets first (issue 12): every place an error's hint or a
message points to exists, and the `alembic` command from the checkout works
with key=value DSNs, says which revisions it ran, and reports a server error
as a message with its DETAIL and HINT, not a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from flakectl.dba import migrate

ROOT = Path(__file__).resolve().parent.parent
HEAD = migrate.head()

# `README, "Adopting a database"`, `README "Two commands"`: a section of the README;
# `docs/adoption.md`: a file of the checkout.
SECTION = re.compile(r"""README,? ["“]([^"”]+)["”]""")
DOC = re.compile(r"\b(docs/[\w-]+\.md)\b")
PENDING: dict[str, str] = {}  # docs written by work in progress: path -> who writes it


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("plpgsql/**/*.sql"), *ROOT.glob("migrations/**/*.py"),
                   *ROOT.glob("flakectl/**/*.py")])


def test_every_hint_and_message_points_to_a_place_that_exists():
    headings = {m.strip() for m in re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M)}
    found = set()
    for path in _sources():
        text = path.read_text()
        for section in SECTION.findall(text):
            found.add(f"README: {section}")
            assert section in headings, f"{path.relative_to(ROOT)} points to README section {section!r}"
        for doc in DOC.findall(text):
            found.add(doc)
            assert (ROOT / doc).is_file() or doc in PENDING, f"{path.relative_to(ROOT)} points to {doc}"
    # the ones a new user meets first are among them (so the scan is not vacuous)
    assert "README: Adopting a database" in found  # revision 0002's refusal of duplicate open flakes


def _key_value_dsn(url: str) -> str:
    return " ".join(f"{k}={v}" for k, v in psycopg.conninfo.conninfo_to_dict(url).items())


def alembic(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLAKECTL_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_alembic_takes_a_key_value_dsn_and_says_which_revisions_ran(empty_db_url):
    dsn = _key_value_dsn(empty_db_url)
    assert dsn.startswith("user=postgres dbname=") and " host=" in dsn
    current = alembic("current", url=dsn)
    assert (current.returncode, current.stdout) == (0, ""), current.stderr
    done = alembic("upgrade", "head", url=dsn)
    assert done.returncode == 0, done.stderr
    ran = [line for line in done.stderr.splitlines() if "Running upgrade" in line]
    revisions = [f"{a or ''} -> {b}" for a, b in zip([None, *migrate_revisions()], migrate_revisions())]
    assert [line.split("Running upgrade ")[1].split(",")[0] for line in ran] == \
        [r.replace("None", "") for r in revisions]
    assert ran[0].startswith("INFO  [alembic.runtime.migration] Running upgrade  -> 0001, ")
    current = alembic("current", url=dsn)
    assert (current.returncode, current.stdout) == (0, f"{HEAD} (head)\n"), current.stderr


def migrate_revisions() -> list[str]:
    from flakectl.dba import dbadmin

    return dbadmin.revisions()


def test_alembic_reports_a_refusal_with_its_detail_and_hint(empty_db_url):
    assert alembic("upgrade", "0001", url=empty_db_url).returncode == 0
    with psycopg.connect(empty_db_url) as c:
        c.execute("insert into test_analytics_flake (repoid, test_id, recent_passes_count, count,"
                  " fail_count, start_date) values (8, '\\xbeef', 0, 1, 1, now()),"
                  " (8, '\\xbeef', 0, 1, 1, now())")
    refused = alembic("upgrade", "head", url=empty_db_url)
    assert refused.returncode == 255  # Alembic's exit for its FAILED: messages
    assert refused.stdout.splitlines() == [
        "FAILED: flakectl: test_analytics_flake has more than one open flake for a test;"
        " nothing was changed",
        "DETAIL: repoid 8, test_id \\xbeef: flake ids {1,2}",
        'HINT: Close all but the newest open flake of each test (README, "Adopting a database"),'
        " then upgrade again.",
    ]
    assert "Traceback" not in refused.stderr
    assert migrate.current(empty_db_url) == "0001"


def test_db_sql_applied_with_psql_prints_no_result_rows(server, empty_db_url):
    from flakectl.cli import main

    out = subprocess.run([sys.executable, "-m", "flakectl", "db", "sql"], capture_output=True,
                         text=True, check=True).stdout
    assert "RETURNING" not in out
    psql = server.bin_dir / "psql"
    psql = str(psql) if psql.exists() else shutil.which("psql")
    done = subprocess.run([psql, "-X", "-v", "ON_ERROR_STOP=1", "-d", empty_db_url], input=out,
                          text=True, capture_output=True, check=True)
    assert "version_num" not in done.stdout
    assert "row)" not in done.stdout and "rows)" not in done.stdout, done.stdout
    assert main(["db", "current", "--dsn", empty_db_url]) == 0
    assert migrate.current(empty_db_url) == HEAD


def test_the_readme_opens_with_the_two_commands_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["scripts/bootstrap && .venv/bin/flakectl demo",
                        "scripts/bootstrap && .venv/bin/python -m pytest -q"]
    assert readme.index("```sh\n") < readme.index("\n## ", readme.index("## Two commands") + 1)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith("#")]
    assert ci[-1] == commands[1].split(" && ")[1]  # the README's test command, last
    assert "scripts/bootstrap" in ci
    # every .ci script runs flakectl's Python from .venv (bootstrap made it), never python3
    for script in (ROOT / ".ci").iterdir():
        for number, line in enumerate(script.read_text().splitlines(), 1):
            if not line.lstrip().startswith("#"):
                assert not re.search(r"(^|[\s(|&;])python3? ", line), f"{script.name}:{number}: {line}"
