"""Released files never change.

tests/released.sha256 (sha256sum format, paths from the checkout's root)
lists every released function body (plpgsql/<name>/vNNNN.sql) and migration
(migrations/versions/*.py). A listed file that changed or vanished fails
here: a new body is a new file installed by a new revision, never an edit.

Lines starting with `#` are the manifest's history: the one released file
ever changed in place (migration 0001's schema-safety fix, issue 10) is noted
there with its hash before the fix.

Files not listed yet are allowed: they are not released. Releasing one means
adding its line, from the checkout's root:

    sha256sum plpgsql/<name>/vNNNN.sql migrations/versions/NNNN_<slug>.py >> tests/released.sha256
"""

from __future__ import annotations

import fnmatch
import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = pathlib.Path(__file__).with_name("released.sha256")
RELEASABLE = ("plpgsql/*/v*.sql", "migrations/versions/*.py")


def manifest() -> dict[str, str]:
    """{path: sha256} of the manifest; fails on a malformed or repeated line."""
    entries: dict[str, str] = {}
    for number, line in enumerate(MANIFEST.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line)
        assert match, f"tests/released.sha256 line {number} is not `<sha256>  <path>`: {line!r}"
        digest, path = match.groups()
        assert path not in entries, f"tests/released.sha256 lists {path} twice"
        entries[path] = digest
    return entries


def test_released_files_are_unchanged():
    problems = []
    for path, digest in manifest().items():
        file = ROOT / path
        if not file.is_file():
            problems.append(f"{path}: released, but gone")
        elif hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            problems.append(f"{path}: released, but changed")
    assert not problems, (
        "released files are immutable; put a changed function body in a new "
        "plpgsql/<name>/vNNNN.sql installed by a new revision (its downgrade "
        "re-installs the previous file), and restore these:\n  " + "\n  ".join(problems))


def test_manifest_lists_bodies_and_migrations_only():
    listed = manifest()
    stray = [p for p in listed
             if not any(fnmatch.fnmatch(p, pattern) for pattern in RELEASABLE) or p.endswith("__init__.py")]
    assert not stray, f"tests/released.sha256 lists files that are neither bodies nor migrations: {stray}"
    assert {p.split("/")[0] for p in listed} == {"plpgsql", "migrations"}


# The only released file ever changed in place, and its hash as first released.
CHANGED_IN_PLACE = {
    "migrations/versions/0001_codecov_tables.py":
        "b276f7524a562d57ce0d8511596fbbee942d17a0e4119a48ec9de8f1984cc044",
}


def test_history_notes_every_file_changed_in_place():
    history = "\n".join(line for line in MANIFEST.read_text(encoding="utf-8").splitlines()
                        if line.startswith("#"))
    listed = manifest()
    for path, first in CHANGED_IN_PLACE.items():
        assert path in history and first in history, f"tests/released.sha256's history must note {path}"
        assert listed[path] != first
    docstring = (ROOT / "migrations/versions/0001_codecov_tables.py").read_text(encoding="utf-8")
    assert "Fixed in place after release" in docstring
