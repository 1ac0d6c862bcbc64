"""`flakectl split`: move a deployment to Codecov's split layout, and back.

SPEC "Deployments": flakectl, the test runs and the flakes live together in the
*runs* database R, so every write of a call stays in one local transaction;
`commits` and `reports_*` stay in the *main* database M and R reads them
through read-only postgres_fdw foreign tables; M reads the flakes through a
read-only foreign table named `test_analytics_flake`. Writes never cross the
link.

    flakectl split --main-dsn M --runs-dsn R [--dry-run]
    flakectl split --main-dsn M --runs-dsn R --undo

The split, step by step (each step finds out whether it was done already, so a
run that failed or was killed at any point is finished by running it again):

  1. runs: extension postgres_fdw
  2. runs: server flakectl_main (M) and its user mapping
  3. runs: commits, reports_commitreport, reports_upload as read-only foreign tables
  4. runs: flakectl installed (`db upgrade head`), after 3 so the install
     finds the reports tables and creates only the runs side's own
  5. main: extension postgres_fdw, server flakectl_runs (R) and its user mapping
  6. main: writers of the flake table stopped (LOCK ... IN EXCLUSIVE MODE:
     readers go on), every row copied to R with its id, with flakectl's own
     tables (ledger, archive) when M has them; R commits the copy
  7. runs: the id sequence set past the copied ids (and M's sequence)
  8. main: the table renamed to test_analytics_flake_pre_split, the read-only
     foreign table created in its place, SELECT granted as on the old table
  9. count and checksum verified: M's old table, R's table across the link
     (M's new foreign table) and R's table directly; then M commits 6-9 at once

Until M commits, nothing of M has changed; a re-run copies again (the rows R
holds are marked, by a comment on R's table, as coming from this M).

Credentials of the link: the user mappings carry the user and password of the
DSN given for the other database (or of --main-link-dsn / --runs-link-dsn).
A password goes only into the user mapping in the catalog (pg_user_mapping,
readable by superusers only): the statement that stores it runs with the
server's statement logging and pg_stat_statements' utility tracking switched
off for its transaction, and flakectl never prints it. Without a password
(certificates, a .pgpass of the server's OS account, peer/trust) nothing
secret is stored at all. docs/deployment.md has the runbook.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from flakectl.dba.connection import connect, describe
from flakectl.errors import ConnectionFailed, FlakectlError, from_psycopg

MAIN_SERVER = "flakectl_main"  # in R: the link to the main database
RUNS_SERVER = "flakectl_runs"  # in M: the link to the runs database
FLAKE = "test_analytics_flake"
PRE_SPLIT = "test_analytics_flake_pre_split"
REPORT_TABLES = ("commits", "reports_commitreport", "reports_upload")
#: flakectl's own tables that move with the flakes (ledger; archive, rule 11)
OWN_TABLES = ("processed_upload", "flake_archive")
GUARD_SCHEMA = "flakectl_split"  # in R after an undo: the guard that stops calls
MARK = "flakectl split: flakes of main database "
STOP_ENV = "FLAKECTL_SPLIT_STOP_AFTER"  # tests: exit right after step N
FDW_PACKAGE = ("postgres_fdw is a contrib module: install it on that database's server"
               " (Debian/Ubuntu: the postgresql-NN package ships it; RHEL and others:"
               " postgresqlNN-contrib or postgresql-contrib)")
LOCK_KEY = 1718381412  # session advisory lock (LOCK_KEY, 0): one split at a time per database
SPLIT_STEPS = 9
UNDO_STEPS = 5

# the user mapping's options; every other libpq option describes the server
_MAPPING_KEYS = ("user", "password", "sslkey", "sslcert", "sslpassword")
# taken over from the command's own connection (libpq's defaults stay libpq's)
_LINK_KEYS = ("hostaddr", "sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout",
              "target_session_attrs", "gssencmode", "krbsrvname")
_NEVER_LINK = ("client_encoding", "fallback_application_name", "options", "replication")


class SplitRefused(FlakectlError):
    """flakectl split refused; nothing was changed."""


class SplitFailed(FlakectlError):
    """flakectl split failed; run it again to finish the job."""


class Stopped(Exception):
    """The test hook ($FLAKECTL_SPLIT_STOP_AFTER) stopped the command after a step."""


# --------------------------------------------------------------------------
# What each side holds
# --------------------------------------------------------------------------


@dataclass
class Side:
    label: str  # "main" / "runs"
    conn: psycopg.Connection
    schema: str
    where: str  # host:port, database (no password)
    identity: str = ""  # system identifier / database name
    fdw_available: bool = False
    fdw_installed: bool = False
    kinds: dict[str, str | None] = field(default_factory=dict)  # table -> relkind
    flake_server: str | None = None  # server of a foreign flake table
    flake_comment: str | None = None
    own: tuple[str, ...] = ()  # flakectl's own tables present
    guard: bool = False
    servers: tuple[str, ...] = ()
    revision: str | None = None

    def q(self, name: str) -> sql.Composed:
        return sql.Identifier(self.schema, name)

    def kind(self, name: str) -> str | None:
        return self.kinds.get(name)


def _scalar(conn: psycopg.Connection, query, params=None):  # noqa: ANN001, ANN202
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def inspect(label: str, conn: psycopg.Connection, schema: str, where: str) -> Side:
    side = Side(label, conn, schema, where)
    sysid, db = conn.execute(
        "select (select system_identifier from pg_control_system())::text, current_database()"
    ).fetchone()
    side.identity = f"{sysid}/{db}"
    side.fdw_available = bool(_scalar(conn, "select count(*) from pg_available_extensions"
                                            " where name = 'postgres_fdw'"))
    side.fdw_installed = bool(_scalar(conn, "select count(*) from pg_extension where extname = 'postgres_fdw'"))
    for name in (*REPORT_TABLES, FLAKE, PRE_SPLIT, "ta_timeseries_testrun"):
        side.kinds[name] = _scalar(
            conn, "select c.relkind::text from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                  " where n.nspname = %s and c.relname = %s", (schema, name))
    if side.kind(FLAKE) == "f":
        side.flake_server = _scalar(
            conn, "select s.srvname from pg_foreign_table t join pg_foreign_server s on s.oid = t.ftserver"
                  " where t.ftrelid = %s::regclass", (f"{_ident(schema)}.{_ident(FLAKE)}",))
    if side.kind(FLAKE) is not None:
        side.flake_comment = _scalar(conn, "select obj_description(%s::regclass, 'pg_class')",
                                     (f"{_ident(schema)}.{_ident(FLAKE)}",))
    side.own = tuple(t for t in OWN_TABLES
                     if _scalar(conn, "select to_regclass(%s) is not null", (f"flakectl.{t}",)))
    side.guard = bool(_scalar(conn, "select count(*) from pg_namespace where nspname = %s", (GUARD_SCHEMA,)))
    side.servers = tuple(r[0] for r in conn.execute(
        "select srvname from pg_foreign_server where srvname in (%s, %s)", (MAIN_SERVER, RUNS_SERVER)))
    if _scalar(conn, "select to_regclass('alembic_version') is not null"):
        side.revision = _scalar(conn, "select version_num from alembic_version")
    return side


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _marker_of(comment: str | None) -> str | None:
    """The main database a runs side's flakes came from, by the comment on its table."""
    if comment and comment.startswith(MARK):
        return comment[len(MARK):].split(";", 1)[0].strip()
    return None


def _count(side: Side, table: sql.Composable) -> int:
    return _scalar(side.conn, sql.SQL("select count(*) from {}").format(table))


def _columns(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, str, bool]]:
    """(name, type, not null) of a table's columns, in order."""
    return conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull"
        "  from pg_attribute a join pg_class c on c.oid = a.attrelid"
        "  join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = %s and c.relname = %s and a.attnum > 0 and not a.attisdropped"
        " order by a.attnum", (schema, table)).fetchall()


def _checksum(conn: psycopg.Connection, table: sql.Composable, columns: list[str],
              order: list[str]) -> tuple[int, str]:
    """(rows, md5 of every row's text in `order`): equal on both sides when the rows are."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    by = sql.SQL(", ").join(sql.Identifier(c) for c in order)
    query = sql.SQL("select count(*), md5(coalesce(string_agg(row({cols})::text, E'\\n' order by {by}), ''))"
                    "  from {table}").format(cols=cols, by=by, table=table)
    rows, digest = conn.execute(query).fetchone()
    return rows, digest


# --------------------------------------------------------------------------
# Link options and credentials
# --------------------------------------------------------------------------


def link_options(conn: psycopg.Connection, link_dsn: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(server options, user mapping options) for reaching `conn`'s database
    from the other server: from `link_dsn` when given, else from the
    connection the command made (its host, port, database, user, password,
    and the TLS settings it was given)."""
    if link_dsn:
        params = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(link_dsn).items() if v is not None}
    else:
        given = conn.info.get_parameters()
        params = {k: given[k] for k in _LINK_KEYS if given.get(k)}
        params.update(host=conn.info.host, port=str(conn.info.port), dbname=conn.info.dbname,
                      user=conn.info.user)
        if conn.info.password:
            params["password"] = conn.info.password
    server = {k: str(v) for k, v in params.items() if k not in _MAPPING_KEYS and k not in _NEVER_LINK}
    mapping = {k: str(v) for k, v in params.items() if k in _MAPPING_KEYS}
    server["updatable"] = "false"  # writes never cross the link: neither
    server["truncatable"] = "false"  # row by row nor by TRUNCATE (postgres_fdw allows it by default)
    server.setdefault("connect_timeout", "10")  # a dead link fails a call, it does not hang it
    server.setdefault("fetch_size", "10000")  # rows per round trip (postgres_fdw's default: 100)
    return server, mapping


def _options_sql(current: dict[str, str] | None, wanted: dict[str, str]) -> sql.Composable | None:
    """`OPTIONS (...)` turning `current` into `wanted`; None when nothing changes."""
    if current is None:
        items = [sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in wanted.items()]
    else:
        items = []
        for k, v in wanted.items():
            if k not in current:
                items.append(sql.SQL("add {} {}").format(sql.Identifier(k), sql.Literal(v)))
            elif current[k] != v:
                items.append(sql.SQL("set {} {}").format(sql.Identifier(k), sql.Literal(v)))
        items += [sql.SQL("drop {}").format(sql.Identifier(k)) for k in current if k not in wanted]
    if not items:
        return None
    return sql.SQL("options ({})").format(sql.SQL(", ").join(items))


def _parse_options(options: list[str] | None) -> dict[str, str]:
    return dict(o.split("=", 1) for o in options or [])


@contextmanager
def _unlogged(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction whose statements the server does not log (they carry a password)."""
    with conn.transaction():
        try:
            for setting, value in (("log_statement", "none"), ("log_min_duration_statement", "-1"),
                                   ("log_min_error_statement", "panic"),
                                   ("pg_stat_statements.track_utility", "off")):
                conn.execute("select set_config(%s, %s, true)", (setting, value))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SplitRefused(
                "cannot keep the link's password out of the server's log: switching statement"
                f" logging off needs a superuser ({exc.diag.message_primary}); run split as a"
                " superuser, or give a link DSN without a password (--main-link-dsn /"
                " --runs-link-dsn with certificates or a .pgpass the DBA manages)") from exc
        yield


def ensure_link(side: Side, server: str, server_options: dict[str, str],
                mapping_options: dict[str, str]) -> str:
    """postgres_fdw, `server` and a user mapping FOR PUBLIC in `side`; what was done."""
    conn = side.conn
    done = []
    if not _scalar(conn, "select count(*) from pg_extension where extname = 'postgres_fdw'"):
        conn.execute("create extension postgres_fdw")
        done.append("created extension postgres_fdw")
    row = conn.execute("select srvoptions from pg_foreign_server where srvname = %s", (server,)).fetchone()
    if row is None:
        conn.execute(sql.SQL("create server {} foreign data wrapper postgres_fdw {}").format(
            sql.Identifier(server), _options_sql(None, server_options)))
        done.append(f"created server {server}")
    else:
        change = _options_sql(_parse_options(row[0]), server_options)
        if change is not None:
            conn.execute(sql.SQL("alter server {} {}").format(sql.Identifier(server), change))
            done.append(f"updated server {server}")
    row = conn.execute("select umoptions from pg_user_mappings where srvname = %s and usename = 'public'",
                       (server,)).fetchone()
    statement = None
    if row is None:
        statement = sql.SQL("create user mapping for public server {} {}").format(
            sql.Identifier(server), _options_sql(None, mapping_options) or sql.SQL(""))
        done.append("created its user mapping" + (" (password stored in the catalog only)"
                                                  if "password" in mapping_options else ""))
    else:
        change = _options_sql(_parse_options(row[0]), mapping_options)
        if change is not None:
            statement = sql.SQL("alter user mapping for public server {} {}").format(
                sql.Identifier(server), change)
            done.append("updated its user mapping")
    if statement is not None:
        if "password" in mapping_options:
            with _unlogged(conn):
                conn.execute(statement)
        else:
            conn.execute(statement)
    target = f"{server_options.get('host', '(default host)')}:{server_options.get('port', '5432')}" \
             f"/{server_options.get('dbname', '(default)')}"
    return ", ".join(done) + f" ({target})" if done else f"server {server} ({target}) already there"


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


class _Run:
    def __init__(self, main: Side, runs: Side, out: Callable[[str], None], total: int):
        self.main, self.runs, self.out, self.total = main, runs, out, total
        self.stop_after = int(os.environ.get(STOP_ENV) or 0)

    def step(self, number: int, text: str) -> None:
        self.out(f"[{number}/{self.total}] {text}")
        if number == self.stop_after:
            raise Stopped(f"stopped after step {number} (${STOP_ENV})")


def _refuse(text: str) -> SplitRefused:
    return SplitRefused(f"split refused, nothing was changed: {text}")


def _preflight(main: Side, runs: Side) -> None:
    if main.identity == runs.identity:
        raise _refuse(f"--main-dsn and --runs-dsn name the same database ({main.where}); the split"
                      " layout needs two databases")
    for side in (runs, main):
        if not side.fdw_available:
            raise _refuse(f"postgres_fdw is not available in the {side.label} database ({side.where}); "
                          + FDW_PACKAGE)


def _split_state(main: Side, runs: Side) -> str:
    """'split' (done), 'todo'; refuses what it cannot split."""
    if main.kind(FLAKE) == "f":
        if main.flake_server != RUNS_SERVER:
            raise _refuse(f"{main.schema}.{FLAKE} in the main database is a foreign table of server"
                          f" {main.flake_server}, not one flakectl split made")
        if _marker_of(runs.flake_comment) != main.identity:
            raise _refuse(f"the main database is split, but not to this runs database ({runs.where})")
        return "split"
    if main.kind(FLAKE) is None:
        raise _refuse(f"the main database ({main.where}) has no {main.schema}.{FLAKE} and no split of"
                      " its own in progress; nothing to split")
    if main.kind(FLAKE) not in ("r", "p"):
        raise _refuse(f"{main.schema}.{FLAKE} in the main database is not a table (relkind"
                      f" {main.kind(FLAKE)})")
    if main.kind(PRE_SPLIT) is not None:
        raise _refuse(f"the main database holds both {FLAKE} and {PRE_SPLIT}; rename or drop the"
                      f" old {PRE_SPLIT} first")
    if runs.kind(FLAKE) == "f":
        raise _refuse(f"{runs.schema}.{FLAKE} in the runs database is a foreign table")
    if runs.kind(FLAKE) is not None and _marker_of(runs.flake_comment) != main.identity:
        rows = _count(runs, runs.q(FLAKE))
        ledger = _count(runs, sql.Identifier("flakectl", "processed_upload")) if runs.own else 0
        if rows or ledger:
            raise _refuse(f"the runs database ({runs.where}) already holds {rows} flake(s) and {ledger}"
                          " ledger row(s) that did not come from this main database")
    for name in REPORT_TABLES:
        if main.kind(name) not in ("r", "p", "v", "f"):
            raise _refuse(f"the main database ({main.where}) has no {main.schema}.{name}")
        if runs.kind(name) not in (None, "f"):
            raise _refuse(f"the runs database ({runs.where}) has a local {runs.schema}.{name}; in the"
                          " split layout it must read the main database's (a foreign table); was"
                          " flakectl installed there before the split? (docs/deployment.md)")
    return "todo"


def _copy_rows(src: psycopg.Connection, dst: psycopg.Connection, src_table: sql.Composable,
               dst_table: sql.Composable, columns: list[str]) -> int:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    with src.cursor() as rc, dst.cursor() as wc:
        with rc.copy(sql.SQL("copy (select {} from {}) to stdout").format(cols, src_table)) as out, \
                wc.copy(sql.SQL("copy {} ({}) from stdin").format(dst_table, cols)) as into:
            block = bytearray()  # psycopg yields a row at a time: write ~1 MB at a time
            for data in out:
                block += data
                if len(block) >= 1 << 20:
                    into.write(block)
                    block = bytearray()  # a fresh buffer: never change one handed to write()
            into.write(block)
    return _scalar(dst, sql.SQL("select count(*) from {}").format(dst_table))


def _own_columns(side: Side, table: str) -> list[str]:
    return [c for c, _, _ in _columns(side.conn, "flakectl", table)]


def _verify(label: str, a: tuple[int, str], b: tuple[int, str], what: str) -> None:
    if a != b:
        raise SplitFailed(f"verification failed, {what}: {a[0]} rows (md5 {a[1]}) against {b[0]} rows"
                          f" (md5 {b[1]}) {label}; nothing of the main database was changed; run again")


def _sequence_past(conn: psycopg.Connection, table: sql.Composable, at_least: int) -> int:
    """Set the id column's sequence so the next id is past max(id) and `at_least`; the last id."""
    seq = _scalar(conn, "select pg_get_serial_sequence(%s, 'id')", (table.as_string(conn),))
    top = max(_scalar(conn, sql.SQL("select coalesce(max(id), 0) from {}").format(table)), at_least)
    if seq is not None and top > 0:
        conn.execute("select setval(%s, %s, true)", (seq, top))
    return top


def _sequence_last(conn: psycopg.Connection, table: sql.Composable) -> int:
    seq = _scalar(conn, "select pg_get_serial_sequence(%s, 'id')", (table.as_string(conn),))
    if seq is None:
        return 0
    last, called = conn.execute(sql.SQL("select last_value, is_called from {}").format(
        sql.SQL(seq))).fetchone()
    return last if called else last - 1


def _flake_table_sql(main: Side, columns: list[tuple[str, str, bool]], runs_schema: str) -> sql.Composable:
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}{}").format(sql.Identifier(n), sql.SQL(t), sql.SQL(" not null" if nn else ""))
        for n, t, nn in columns)
    return sql.SQL("create foreign table {} ({}) server {} options (schema_name {}, table_name {},"
                   " updatable 'false', truncatable 'false')").format(main.q(FLAKE), cols, sql.Identifier(RUNS_SERVER),
                                                  sql.Literal(runs_schema), sql.Literal(FLAKE))


def _copy_grants(conn: psycopg.Connection, source: sql.Composable, target: sql.Composable) -> list[str]:
    """SELECT on `target` for every role holding any privilege on `source` (other than its owner)."""
    roles = [r for (r,) in conn.execute(
        "select distinct case when a.grantee = 0 then 'public' else pg_get_userbyid(a.grantee)::text end"
        "  from pg_class c, aclexplode(c.relacl) a"
        " where c.oid = %s::regclass and a.grantee <> c.relowner order by 1",
        (source.as_string(conn),))]
    for role in roles:
        grantee = sql.SQL("public") if role == "public" else sql.Identifier(role)
        conn.execute(sql.SQL("grant select on {} to {}").format(target, grantee))
    return roles


def _drop_guard(runs: Side) -> None:
    conn = runs.conn
    for table in (runs.q(FLAKE), *(sql.Identifier("flakectl", t) for t in runs.own)):
        conn.execute(sql.SQL("drop trigger if exists flakectl_split_moved on {}").format(table))
    conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(GUARD_SCHEMA)))


def do_split(main: Side, runs: Side, *, dry_run: bool, install: Callable[[], str],
             link: tuple[tuple[dict, dict], tuple[dict, dict]], out: Callable[[str], None]) -> int:
    _preflight(main, runs)
    state = _split_state(main, runs)
    m, r = main.conn, runs.conn
    if state == "split":
        rows = _count(main, main.q(FLAKE))
        if runs.guard:
            raise _refuse(f"an undo was started and did not finish (the runs database's calls are"
                          f" stopped by schema {GUARD_SCHEMA}): run `flakectl split --undo` again")
        out(f"already split: the main database reads its {rows} flake(s) from the runs database"
            f" ({runs.where}) through server {RUNS_SERVER}; nothing changed")
        return 0
    (main_server, main_mapping), (runs_server, runs_mapping) = link
    if dry_run:
        plan = [
            f"runs: extension postgres_fdw ({'there' if runs.fdw_installed else 'to create'})",
            f"runs: server {MAIN_SERVER} -> {main.where}, user mapping for public"
            f" (user {main_mapping.get('user', '(default)')}"
            f"{', password in the catalog' if 'password' in main_mapping else ', no password'})",
            f"runs: {', '.join(REPORT_TABLES)} as read-only foreign tables",
            f"runs: flakectl installed ({runs.revision or 'not yet'} -> head)",
            f"main: extension postgres_fdw, server {RUNS_SERVER} -> {runs.where}, user mapping for public"
            f" (user {runs_mapping.get('user', '(default)')})",
            f"main: lock {FLAKE} against writers (readers go on), copy its {_count(main, main.q(FLAKE))}"
            f" row(s) with their ids" + (f" and flakectl.{', flakectl.'.join(main.own)}" if main.own else ""),
            "runs: id sequence set past the copied ids",
            f"main: {FLAKE} renamed to {PRE_SPLIT}, a read-only foreign table {FLAKE} in its place",
            "verify count and checksum on both sides and across the link, then commit the main database",
        ]
        for number, text in enumerate(plan, 1):
            out(f"[{number}/{SPLIT_STEPS}] {text}")
        out("dry run: nothing was changed")
        return 0

    run = _Run(main, runs, out, SPLIT_STEPS)
    run.step(1, "runs: " + ("created extension postgres_fdw" if _ensure_fdw(runs)
                            else "extension postgres_fdw already there"))
    run.step(2, f"runs: {ensure_link(runs, MAIN_SERVER, main_server, main_mapping)}")
    run.step(3, f"runs: {_ensure_report_tables(main, runs)}")
    run.step(4, f"runs: {install()}")
    run.step(5, f"main: {ensure_link(main, RUNS_SERVER, runs_server, runs_mapping)}")

    runs_fresh = inspect("runs", r, runs.schema, runs.where)
    columns = _columns(m, main.schema, FLAKE)
    runs_columns = {c for c, _, _ in _columns(r, runs.schema, FLAKE)}
    missing = [c for c, _, _ in columns if c not in runs_columns]
    if missing:
        raise SplitFailed(f"the runs database's {runs.schema}.{FLAKE} lacks column(s) {', '.join(missing)}"
                          " of the main database's; nothing of the main database was changed")
    names = [c for c, _, _ in columns]
    own = [t for t in main.own if t in runs_fresh.own]
    with m.transaction():
        m.execute(sql.SQL("lock table {} in exclusive mode").format(main.q(FLAKE)))
        for t in own:
            m.execute(sql.SQL("lock table {} in exclusive mode").format(sql.Identifier("flakectl", t)))
        with r.transaction():
            if runs_fresh.guard:
                _drop_guard(runs_fresh)
            r.execute(sql.SQL("lock table {} in access exclusive mode").format(runs.q(FLAKE)))
            r.execute(sql.SQL("truncate {}").format(runs.q(FLAKE)))
            copied = _copy_rows(m, r, main.q(FLAKE), runs.q(FLAKE), names)
            moved = []
            for t in own:
                table = sql.Identifier("flakectl", t)
                r.execute(sql.SQL("truncate {}").format(table))
                moved.append(f"{_copy_rows(m, r, table, table, _own_columns(main, t))} {t}")
            r.execute(sql.SQL("comment on table {} is {}").format(
                runs.q(FLAKE), sql.Literal(f"{MARK}{main.identity}; copied by flakectl split")))
        run.step(6, f"main: writers of {FLAKE} stopped (readers go on); copied {copied} flake(s) with"
                    f" their ids" + (f" and {', '.join(moved)} row(s)" if moved else "")
                    + " to the runs database")
        last = _sequence_last(m, main.q(FLAKE))
        top = _sequence_past(r, runs.q(FLAKE), last)
        run.step(7, f"runs: next flake id after {top}")
        m.execute(sql.SQL("alter table {} rename to {}").format(main.q(FLAKE), sql.Identifier(PRE_SPLIT)))
        m.execute(_flake_table_sql(main, columns, runs.schema))
        grants = _copy_grants(m, main.q(PRE_SPLIT), main.q(FLAKE))
        m.execute(sql.SQL("comment on foreign table {} is {}").format(main.q(FLAKE), sql.Literal(
            f"flakectl split: the flakes of runs database {runs.identity}, read-only;"
            f" the table before the split is {PRE_SPLIT}")))
        run.step(8, f"main: {FLAKE} renamed to {PRE_SPLIT}; read-only foreign table {FLAKE} in its place"
                    + (f" (select granted to {', '.join(grants)})" if grants else ""))
        order = ["id"] if "id" in names else names
        old = _checksum(m, main.q(PRE_SPLIT), names, order)
        across = _checksum(m, main.q(FLAKE), names, order)
        direct = _checksum(r, runs.q(FLAKE), names, order)
        _verify("across the link", old, across, f"{FLAKE}")
        _verify("in the runs database", old, direct, f"{FLAKE}")
        for t in own:
            table = sql.Identifier("flakectl", t)
            cols = _own_columns(main, t)
            _verify("in the runs database", _checksum(m, table, cols, cols), _checksum(r, table, cols, cols),
                    f"flakectl.{t}")
        run.step(9, f"verified: {old[0]} flake(s), md5 {old[1]}, identical in the main database, across"
                    " the link and in the runs database" + (f"; {', '.join(own)} identical" if own else ""))
    out(f"split done: process in the runs database ({runs.where}); the main database reads the"
        f" flakes through {main.schema}.{FLAKE} (read-only)")
    return 0


def _ensure_fdw(side: Side) -> bool:
    if side.fdw_installed:
        return False
    side.conn.execute("create extension if not exists postgres_fdw")
    side.fdw_installed = True
    return True


def _ensure_report_tables(main: Side, runs: Side) -> str:
    conn = runs.conn
    missing = [t for t in REPORT_TABLES
               if _scalar(conn, "select c.relkind::text from pg_class c join pg_namespace n"
                                " on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s",
                          (runs.schema, t)) is None]
    with conn.transaction():
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(runs.schema)))
        if missing:
            conn.execute(sql.SQL("import foreign schema {} limit to ({}) from server {} into {}").format(
                sql.Identifier(main.schema), sql.SQL(", ").join(sql.Identifier(t) for t in missing),
                sql.Identifier(MAIN_SERVER), sql.Identifier(runs.schema)))
        for t in REPORT_TABLES:
            (options,) = conn.execute(
                "select ftoptions from pg_foreign_table where ftrelid = %s::regclass",
                (sql.Identifier(runs.schema, t).as_string(conn),)).fetchone()
            current = _parse_options(options)
            change = _options_sql(current, {**current, "updatable": "false", "truncatable": "false"})
            if change is not None:
                conn.execute(sql.SQL("alter foreign table {} {}").format(sql.Identifier(runs.schema, t), change))
    if missing:
        return f"read-only foreign table(s) {', '.join(missing)} reading the main database's"
    return f"read-only foreign tables {', '.join(REPORT_TABLES)} already there"


_GUARD_FUNCTION = """
create function {schema}.moved() returns trigger language plpgsql as $$
begin
  raise exception using errcode = '55000',
    message = 'flakectl: the flakes were moved back to the main database by `flakectl split --undo`;'
              ' this runs database takes no calls until the next `flakectl split`',
    hint = 'call flakectl in the main database, or split again (docs/deployment.md)';
end $$
"""


def _install_guard(runs: Side) -> None:
    conn = runs.conn
    schema = sql.Identifier(GUARD_SCHEMA)
    conn.execute(sql.SQL("create schema if not exists {}").format(schema))
    conn.execute(sql.SQL("drop function if exists {}.moved() cascade").format(schema))
    conn.execute(sql.SQL(_GUARD_FUNCTION).format(schema=schema))
    for table in (runs.q(FLAKE), *(sql.Identifier("flakectl", t) for t in runs.own)):
        conn.execute(sql.SQL("lock table {} in exclusive mode").format(table))
        conn.execute(sql.SQL("create trigger flakectl_split_moved before insert or update or delete or truncate"
                             " on {} for each statement execute function {}.moved()").format(table, schema))


def do_undo(main: Side, runs: Side, *, out: Callable[[str], None]) -> int:
    _preflight(main, runs)
    m, r = main.conn, runs.conn
    if main.kind(FLAKE) in ("r", "p") and main.kind(PRE_SPLIT) is None:
        out(f"not split: the main database's {FLAKE} is a regular table; nothing changed")
        return 0
    if main.kind(FLAKE) != "f" or main.flake_server != RUNS_SERVER or main.kind(PRE_SPLIT) is None:
        raise _refuse(f"the main database ({main.where}) is not split by flakectl split"
                      f" ({FLAKE}: {main.kind(FLAKE) or 'missing'}, {PRE_SPLIT}:"
                      f" {main.kind(PRE_SPLIT) or 'missing'})")
    if runs.kind(FLAKE) not in ("r", "p") or _marker_of(runs.flake_comment) != main.identity:
        raise _refuse(f"the runs database ({runs.where}) does not hold this main database's flakes")
    run = _Run(main, runs, out, UNDO_STEPS)
    with r.transaction():
        if runs.guard:
            _drop_guard(runs)
        _install_guard(runs)
    run.step(1, f"runs: calls stopped (they fail naming `flakectl split --undo`; schema {GUARD_SCHEMA})")
    columns = _columns(r, runs.schema, FLAKE)
    main_columns = {c for c, _, _ in _columns(m, main.schema, PRE_SPLIT)}
    names = [c for c, _, _ in columns if c in main_columns]
    own = [t for t in runs.own if t in main.own]
    with m.transaction():
        m.execute(sql.SQL("lock table {} in access exclusive mode").format(main.q(PRE_SPLIT)))
        m.execute(sql.SQL("truncate {}").format(main.q(PRE_SPLIT)))
        with r.transaction():
            copied = _copy_rows(r, m, runs.q(FLAKE), main.q(PRE_SPLIT), names)
            moved = []
            for t in own:
                table = sql.Identifier("flakectl", t)
                cols = _own_columns(runs, t)
                m.execute(sql.SQL("create temporary table flakectl_split_back (like {}) on commit drop").format(table))
                _copy_rows(r, m, table, sql.Identifier("flakectl_split_back"), cols)
                cur = m.execute(sql.SQL("insert into {} select * from flakectl_split_back except select * from {}"
                                        " on conflict do nothing").format(table, table))
                moved.append(f"{cur.rowcount} {t}")
                rc = _checksum(r, table, cols, cols)
                mc = m.execute(sql.SQL(
                    "select count(*), md5(coalesce(string_agg(row({c})::text, E'\\n' order by {c}), ''))"
                    " from {t} where ({k}) in (select {k} from flakectl_split_back)").format(
                    c=sql.SQL(", ").join(map(sql.Identifier, cols)), t=table,
                    k=sql.Identifier(cols[0]))).fetchone()
                _verify("in the main database", rc, tuple(mc), f"flakectl.{t}")
                m.execute("drop table flakectl_split_back")
        run.step(2, f"main: copied {copied} flake(s) with their ids back from the runs database"
                    + (f", and {', '.join(moved)} row(s) not there yet" if moved else ""))
        top = _sequence_past(m, main.q(PRE_SPLIT), _sequence_last(r, runs.q(FLAKE)))
        run.step(3, f"main: next flake id after {top}")
        order = ["id"] if "id" in names else names
        back = _checksum(m, main.q(PRE_SPLIT), names, order)
        across = _checksum(m, main.q(FLAKE), names, order)
        direct = _checksum(r, runs.q(FLAKE), names, order)
        _verify("across the link", back, across, FLAKE)
        _verify("in the runs database", back, direct, FLAKE)
        run.step(4, f"verified: {back[0]} flake(s), md5 {back[1]}, identical in the main database,"
                    " across the link and in the runs database")
        m.execute(sql.SQL("drop foreign table {}").format(main.q(FLAKE)))
        m.execute(sql.SQL("alter table {} rename to {}").format(main.q(PRE_SPLIT), sql.Identifier(FLAKE)))
        m.execute(sql.SQL("drop server {} cascade").format(sql.Identifier(RUNS_SERVER)))
        run.step(5, f"main: {FLAKE} is a regular table again; server {RUNS_SERVER} and its user mapping"
                    " dropped (the link is gone)")
    with r.transaction():
        r.execute(sql.SQL("comment on table {} is {}").format(runs.q(FLAKE), sql.Literal(
            f"{MARK}{main.identity}; moved back by flakectl split --undo, kept here as a copy")))
    out(f"undone: process in the main database again ({main.where}); calls in the runs database"
        " fail until the next `flakectl split`")
    return 0


# --------------------------------------------------------------------------
# Which layout a database is in (flakectl status)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    side: str  # "one" (one database), "main" or "runs" (a side of a split)
    target: str | None = None  # the other side, as the link's server options name it
    answers: bool | None = None  # the link, tried once
    error: str | None = None
    undone: bool = False  # runs side after `split --undo`: calls stopped

    def describe(self) -> str:
        if self.side == "main":
            return (f"main side of a split: the flakes are read from the runs database {self.target}"
                    f" (server {RUNS_SERVER}, read-only); process there")
        if self.side == "runs":
            text = (f"runs side of a split: the reports are read from the main database {self.target}"
                    f" (server {MAIN_SERVER}, read-only)")
            if self.undone:
                text += "; calls stopped: the flakes were moved back by `flakectl split --undo`"
            return text
        return "one database"

    def link(self) -> str | None:
        if self.side == "one":
            return None
        return "answers" if self.answers else f"does not answer: {self.error}"

    def as_json(self) -> dict:
        return {"side": self.side, "target": self.target, "link_answers": self.answers,
                "link_error": self.error, "undone": self.undone}


def layout(conn: psycopg.Connection) -> Layout:
    """The layout `conn`'s database is in, and whether its link answers (tried in a
    savepoint: a dead link leaves the caller's transaction usable)."""
    row = conn.execute(
        "select s.srvname, s.srvoptions, n.nspname, c.relname"
        "  from pg_foreign_table t join pg_foreign_server s on s.oid = t.ftserver"
        "  join pg_class c on c.oid = t.ftrelid join pg_namespace n on n.oid = c.relnamespace"
        " where (s.srvname = %s and c.relname = %s) or (s.srvname = %s and c.relname = 'commits')"
        " order by s.srvname = %s desc limit 1", (RUNS_SERVER, FLAKE, MAIN_SERVER, RUNS_SERVER)).fetchone()
    if row is None:
        return Layout("one")
    server, options, schema, table = row
    opts = _parse_options(options)
    target = f"{opts.get('host', '(default host)')}:{opts.get('port', '5432')}/{opts.get('dbname', '(default)')}"
    side = "main" if server == RUNS_SERVER else "runs"
    undone = side == "runs" and bool(_scalar(conn, "select count(*) from pg_namespace where nspname = %s",
                                             (GUARD_SCHEMA,)))
    try:
        with conn.transaction():
            conn.execute(sql.SQL("select 1 from {} limit 1").format(sql.Identifier(schema, table)))
        return Layout(side, target, True, undone=undone)
    except psycopg.Error as exc:
        return Layout(side, target, False, " ".join(str(exc).split()), undone=undone)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def _prepare(conn: psycopg.Connection) -> None:
    # the checksums compare row text: render it the same way on both sides
    for setting, value in (("timezone", "UTC"), ("datestyle", "ISO, YMD"), ("bytea_output", "hex"),
                           ("intervalstyle", "postgres"), ("extra_float_digits", "3")):
        conn.execute("select set_config(%s, %s, false)", (setting, value))


def _recorded_schema(conn: psycopg.Connection) -> str | None:
    """The Codecov schema a flakectl install recorded (revision 0005), if any."""
    if not _scalar(conn, "select to_regclass('flakectl.codecov_schema') is not null"):
        return None
    return _scalar(conn, "select name from flakectl.codecov_schema")


def _connect(dsn: str, label: str, flag: str) -> psycopg.Connection:
    try:
        return connect(dsn)
    except ConnectionFailed as exc:
        reason = str(exc).split(": ", 1)[-1].rsplit("; check", 1)[0]
        raise ConnectionFailed(f"cannot connect to the {label} database at {describe(dsn)}: {reason};"
                               f" check {flag}") from exc


def split(main_dsn: str, runs_dsn: str, *, undo: bool = False, dry_run: bool = False,
          schema: str | None = None, main_link_dsn: str | None = None, runs_link_dsn: str | None = None,
          out: Callable[[str], None] = print) -> int:
    """Run the split (or its undo); the exit code. Raises SplitRefused / SplitFailed / FlakectlError."""
    with _connect(main_dsn, "main", "--main-dsn") as m, _connect(runs_dsn, "runs", "--runs-dsn") as r:
        try:
            _prepare(m)
            _prepare(r)
            schema = schema or _recorded_schema(m) or _recorded_schema(r) or "public"
            main = inspect("main", m, schema, describe(main_dsn))
            runs = inspect("runs", r, schema, describe(runs_dsn))
            _preflight(main, runs)
            for conn, label in ((m, "main"), (r, "runs")):
                if not _scalar(conn, "select pg_try_advisory_lock(%s, 0)", (LOCK_KEY,)):
                    raise _refuse(f"another flakectl split is running on the {label} database")
            if undo:
                return do_undo(main, runs, out=out)

            def install() -> str:
                from alembic import command

                from flakectl.dba import dbadmin

                def upgrade(cfg, revision: str) -> None:  # noqa: ANN001 - alembic Config
                    cfg.attributes["codecov_schema"] = schema  # R's install records M's schema
                    command.upgrade(cfg, revision)

                before, after = dbadmin._run(runs_dsn, upgrade, "head")  # noqa: SLF001
                return (f"flakectl installed ({before or 'nothing'} -> {after})" if before != after
                        else f"flakectl already at {after}")

            link = (link_options(m, main_link_dsn), link_options(r, runs_link_dsn))
            return do_split(main, runs, dry_run=dry_run, install=install, link=link, out=out)
        except psycopg.Error as exc:
            error = from_psycopg(exc)
            raise SplitFailed(f"split{' --undo' if undo else ''} failed ({error.sqlstate or 'no SQLSTATE'}):"
                              f" {' '.join(str(error).split())}; run it again to finish the job") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flakectl.dba import options as o

    o.example(parser,
              "  flakectl split --main-dsn postgresql://postgres@main/codecov \\\n"
              "                 --runs-dsn postgresql://postgres@timescale/ta --dry-run\n"
              "  flakectl split --main-dsn ... --runs-dsn ...          # do it\n"
              "  flakectl split --main-dsn ... --runs-dsn ... --undo   # and back\n\n"
              "Run again after a failure at any step: it finishes the job; on a split deployment\n"
              "it changes nothing and says so. The link's user mappings get the user and password\n"
              "of --main-dsn / --runs-dsn (or of --main-link-dsn / --runs-link-dsn); a password is\n"
              "stored in the catalog only, never printed or logged. docs/deployment.md: the runbook.")
    o.option(parser, "--main-dsn", metavar="DSN", required=True,
             help="the main database (commits, reports_*, the flakes before the split)")
    o.option(parser, "--runs-dsn", metavar="DSN", required=True,
             help="the runs database (ta_timeseries_testrun; flakectl and the flakes go here)")
    o.option(parser, "--undo", switch=True,
             help="bring every flake back into the main database as a regular table, remove the link")
    o.option(parser, "--dry-run", switch=True, help="print the plan, change nothing")
    o.option(parser, "--codecov-schema", metavar="NAME",
             help="the schema of Codecov's tables, on both sides (default: the one a flakectl install"
                  " recorded in either database, else public)")
    o.option(parser, "--main-link-dsn", metavar="DSN",
             help="how the runs database's server reaches the main one (default: from --main-dsn)")
    o.option(parser, "--runs-link-dsn", metavar="DSN",
             help="how the main database's server reaches the runs one (default: from --runs-dsn)")


def run(args: argparse.Namespace) -> int:
    from flakectl.dba import options as o

    try:
        return split(args.main_dsn, args.runs_dsn, undo=args.undo, dry_run=args.dry_run,
                     schema=args.codecov_schema, main_link_dsn=args.main_link_dsn,
                     runs_link_dsn=args.runs_link_dsn, out=o.out)
    except Stopped as exc:
        o.err(f"flakectl: {exc}")
        return 3
