"""Hardening (issue 10): the Codecov schema recorded and used by name,
pinned search_path, SECURITY DEFINER entry points, EXECUTE revoked from
PUBLIC; new bodies guard v0003, process_upload_set v0003, process_commit
v0003, process_uploads v0003, prune_ledger v0002, and two new internal
functions: state_machine v0001 (rules 2-6 in one statement that also marks
the runs it read; replay reuses it) and window_start v0001 (a lookback or an
age judged by the window start it gives now).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Installs at 0004 whose 0001 ran as released have no record of the Codecov
schema: this revision records it. An explicit `-x codecov_schema=NAME` is
checked; otherwise the schema is the one holding the `test_analytics_flake`
that carries flakectl's index `flakectl_flake_one_open` (0002 built it on the
table the install used). None or several: it refuses, naming what it found,
and changes nothing. It also records, by oid, the tables 0001 created (those
listed in flakectl.created_table, found in that schema), so a downgrade to
base drops exactly those. Like 0001, it refuses when the recorded schema's
`test_analytics_flake` is a foreign table (SPEC "Deployments").

The bodies from here on are templates (flakectl.sqlfiles): Codecov's tables
qualified with the recorded schema, every function runs with
`search_path = pg_catalog, pg_temp`, so the caller's search_path and anything
planted in a schema it can write never take part in a call. process_commit
and process_uploads are SECURITY DEFINER: a worker needs EXECUTE on them
(`flakectl db grant ROLE`) and no privilege on the tables. EXECUTE is revoked
from PUBLIC on every flakectl function, and every later template install
revokes it again (docs/security.md).

The downgrade re-installs the 0004 bodies and gives EXECUTE back to PUBLIC,
as 0004 had it; the schema record stays (0001 owns it).
"""

from alembic import context, op

from flakectl.dba.migrate import foreign_flake_check, requested_codecov_schema, sql_literal
from flakectl.sqlfiles import install

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CODECOV_TABLES = ("commits", "reports_commitreport", "reports_upload",
                  "ta_timeseries_testrun", "test_analytics_flake")


def record_schema() -> str:
    """A DO block recording the Codecov schema of an install made by 0001 as released."""
    schema, explicit = requested_codecov_schema(context)
    tables = ", ".join(f"'{t}'" for t in CODECOV_TABLES)
    return f"""
do $flakectl$
declare
  v_asked text := {sql_literal(schema) if explicit else 'null'};
  v_found text[];
  v_schema text;
  v_missing text[];
  v_lost text[];
begin
  if to_regclass('flakectl.codecov_schema') is not null then
    return;  -- recorded by 0001 (as fixed in place)
  end if;
  select coalesce(array_agg(distinct n.nspname order by n.nspname), '{{}}')
    into v_found
    from pg_index i
    join pg_class ix on ix.oid = i.indexrelid
    join pg_class t on t.oid = i.indrelid
    join pg_namespace n on n.oid = t.relnamespace
   where ix.relname = 'flakectl_flake_one_open'
     and t.relname = 'test_analytics_flake';
  if v_asked is not null then
    if not v_asked = any(v_found) then
      raise exception using errcode = '22023',
        message = format('flakectl: codecov_schema %I was asked for, but flakectl''s index flakectl_flake_one_open '
                         'is on the test_analytics_flake of %s; nothing was changed',
                         v_asked, coalesce(nullif(array_to_string(v_found, ', '), ''), 'no schema'));
    end if;
    v_schema := v_asked;
  elsif cardinality(v_found) = 1 then
    v_schema := v_found[1];
  else
    raise exception using errcode = '55000',
      message = format('flakectl: cannot tell which schema holds the Codecov tables flakectl was installed for '
                       '(flakectl_flake_one_open found on the test_analytics_flake of %s); nothing was changed',
                       coalesce(nullif(array_to_string(v_found, ', '), ''), 'no schema')),
      hint = 'Upgrade with -x codecov_schema=NAME (flakectl db upgrade --codecov-schema NAME).';
  end if;
  select array_agg(t) into v_missing
    from unnest(array[{tables}]) t
   where to_regclass(format('%I.%I', v_schema, t)) is null;
  if v_missing is not null then
    raise exception using errcode = '55000',
      message = format('flakectl: schema %I lacks %s; nothing was changed', v_schema, array_to_string(v_missing, ', '));
  end if;

  create table flakectl.codecov_schema (
    one_row boolean primary key default true check (one_row),
    name text not null,
    recorded_at timestamptz not null default now()
  );
  insert into flakectl.codecov_schema (name) values (v_schema);

  -- what 0001 created, by oid: the recorded names, in the schema it used
  alter table flakectl.created_table add column relid regclass;
  update flakectl.created_table c
     set relid = to_regclass(format('%I.%I', v_schema, c.name));
  select array_agg(c.name order by c.name) into v_lost
    from flakectl.created_table c
   where c.relid is null;
  if v_lost is not null then
    raise notice 'flakectl: % recorded as created by flakectl but not in schema %; forgotten (a downgrade keeps them)',
      array_to_string(v_lost, ', '), v_schema;
    delete from flakectl.created_table c where c.relid is null;
  end if;
  alter table flakectl.created_table alter column relid set not null;
end
$flakectl$"""


def upgrade() -> None:
    op.execute(record_schema())
    op.execute(foreign_flake_check())
    install(op, "window_start", 1)
    install(op, "state_machine", 1)
    install(op, "guard", 3)
    install(op, "process_upload_set", 3)
    install(op, "process_commit", 3)
    install(op, "process_uploads", 3)
    install(op, "prune_ledger", 2)
    op.execute("revoke execute on all functions in schema flakectl from public")


def downgrade() -> None:
    # create or replace takes the old definition's attributes: SECURITY
    # INVOKER, no search_path; ACLs stay, so EXECUTE goes back to PUBLIC
    install(op, "prune_ledger", 1)
    install(op, "process_uploads", 2)
    install(op, "process_commit", 2)
    install(op, "process_upload_set", 2)
    install(op, "guard", 2)
    op.execute("drop function flakectl.state_machine(bigint, bigint[], timestamptz, integer, boolean, boolean)")
    op.execute("drop function flakectl.window_start(interval)")
    op.execute("grant execute on all functions in schema flakectl to public")
