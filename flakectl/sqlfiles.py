"""The released SQL bodies in plpgsql/, read as package resources.

`plpgsql/<name>/vNNNN.sql` holds version NNNN of one function; a released file
never changes (a new body is a new file installed by a new revision), so a
migration names the exact versions it installs.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable


def _root() -> Traversable:
    return resources.files("flakectl.plpgsql")


def body(name: str, version: int) -> str:
    """The SQL text of version `version` of function body `name`."""
    return (_root() / name / f"v{version:04d}.sql").read_text(encoding="utf-8")


def released() -> dict[str, str]:
    """sha256 of every body file, keyed by its path under plpgsql/."""
    digests = {}
    for folder in sorted(_root().iterdir(), key=lambda t: t.name):
        if not folder.is_dir() or folder.name.startswith("__"):
            continue
        for item in sorted(folder.iterdir(), key=lambda t: t.name):
            if item.name.endswith(".sql"):
                digests[f"{folder.name}/{item.name}"] = hashlib.sha256(item.read_bytes()).hexdigest()
    return digests


def install(op, name: str, version: int) -> None:  # noqa: ANN001 - alembic.op
    """Run a body file inside a migration (works online and with --sql)."""
    op.execute(body(name, version))
