"""The released SQL bodies in plpgsql/, read as package resources.

`plpgsql/<name>/vNNNN.sql` holds version NNNN of one function; a released file
never changes (a new body is a new file installed by a new revision), so a
migration names the exact versions it installs.

From revision 0005 on a body file is a *template*: Codecov's tables are
written `@codecov@.<table>`, and the install puts the Codecov schema recorded
in `flakectl.codecov_schema` in place of `@codecov@`, as a quoted identifier
(`render`). flakectl's own objects are written `flakectl.<name>`. The
substitution happens inside the database (`install` emits a DO block that
reads the record), so an online upgrade and the offline script (`flakectl db
sql`) install the same text from the same record.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from importlib.resources.abc import Traversable

#: What a template writes in place of the Codecov schema.
PLACEHOLDER = "@codecov@"

#: The schema Codecov's tables live in unless the install names another.
DEFAULT_SCHEMA = "public"

# a body's own dollar quote is $$; the install wraps it in these
_BODY_TAG = "$flakectl_body$"
_DO_TAG = "$flakectl_install$"


def _root() -> Traversable:
    return resources.files("flakectl.plpgsql")


def body(name: str, version: int) -> str:
    """The SQL text of version `version` of function body `name` (a template
    when it holds PLACEHOLDER)."""
    return (_root() / name / f"v{version:04d}.sql").read_text(encoding="utf-8")


def versions() -> dict[str, list[int]]:
    """Every body file's version, per function name, ascending."""
    found: dict[str, list[int]] = {}
    for folder in sorted(_root().iterdir(), key=lambda t: t.name):
        if not folder.is_dir() or folder.name.startswith("__"):
            continue
        for item in sorted(folder.iterdir(), key=lambda t: t.name):
            match = re.fullmatch(r"v(\d{4})\.sql", item.name)
            if match:
                found.setdefault(folder.name, []).append(int(match.group(1)))
    return found


def released() -> dict[str, str]:
    """sha256 of every body file, keyed by its path under plpgsql/."""
    digests = {}
    for name, numbers in versions().items():
        for version in numbers:
            item = _root() / name / f"v{version:04d}.sql"
            digests[f"{name}/{item.name}"] = hashlib.sha256(item.read_bytes()).hexdigest()
    return digests


def quote_ident(name: str) -> str:
    """PostgreSQL's quote_ident: bare when a lower-case plain identifier, else quoted.
    (Keywords are not known here; `render` is used with the names the database
    quoted itself, see `flakectl.dba.migrate.codecov_schema`.)"""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def render(text: str, schema_ident: str) -> str:
    """`text` with the Codecov schema, an already quoted identifier, in place."""
    return text.replace(PLACEHOLDER, schema_ident)


# The bodies released before templates (revisions 0002-0004): installed as
# they are, resolving table names on the caller's search_path.
_PLAIN = {"guard": 2, "process_commit": 2, "process_upload_set": 2, "process_uploads": 2, "prune_ledger": 1}


def is_template(name: str, version: int) -> bool:
    """Every body but those released before revision 0005 is a template."""
    return version > _PLAIN.get(name, 0)


def install_sql(name: str, version: int) -> str:
    """The SQL that installs a body: the file itself for the bodies before
    templates, else a DO block that renders it with the recorded schema and
    then revokes EXECUTE from PUBLIC on every flakectl function (a new
    function gets PUBLIC's EXECUTE by default)."""
    text = body(name, version)
    if not is_template(name, version):
        return text
    if _BODY_TAG in text or _DO_TAG in text:
        raise ValueError(f"a body must not contain {_BODY_TAG} or {_DO_TAG}")
    return (
        f"do {_DO_TAG}\n"
        "declare\n"
        "  v_schema text;\n"
        "begin\n"
        "  select quote_ident(s.name) into v_schema from flakectl.codecov_schema s;\n"
        "  if v_schema is null then\n"
        "    raise exception using errcode = '55000',\n"
        "      message = 'flakectl: no Codecov schema recorded in flakectl.codecov_schema; cannot install a body';\n"
        "  end if;\n"
        f"  execute replace({_BODY_TAG}{text}{_BODY_TAG}, '{PLACEHOLDER}', v_schema);\n"
        "  revoke execute on all functions in schema flakectl from public;\n"
        "end\n"
        f"{_DO_TAG}"
    )


def install(op, name: str, version: int) -> None:  # noqa: ANN001 - alembic.op
    """Run a body file inside a migration (works online and with --sql)."""
    op.execute(install_sql(name, version))
