"""Replay (issue 11, SPEC rule 11): flakectl.replay, flakectl.replay_rows and
flakectl.flake_archive.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

flakectl.replay(repo_id, upload_ids, expire_after, dry_run) recomputes a
repository's flakes from the runs of the given uploads (from an empty state,
no lookback, the ledger ignored), compares them with the live rows those runs
determine and, asked to (dry_run => false), archives the live rows without an
identical replayed row into flakectl.flake_archive, inserts the replayed rows
without a live one, records the uploads and marks their failures.
flakectl.replay_rows(repo_id, upload_ids, expire_after) returns the rows a dry
run compares, for `flakectl replay` to show. Both are SECURITY DEFINER with
EXECUTE revoked from PUBLIC (the template install revokes it), and `flakectl
db grant` does not give them to the worker's role.

One state machine (SPEC: one implementation of rules 2-6): replay calls
flakectl.state_machine (revision 0005), the core process_upload_set calls,
from an empty state, without a lower bound on the runs' timestamps, marking
the failure/error runs it reads in the statement that reads them (dry_run
false); no body of 0005 changes.

flakectl.flake_archive is created LIKE the recorded Codecov schema's
test_analytics_flake (its columns, names and types, id included; not its
defaults, identity or indexes), plus archived_at.

The downgrade drops what the upgrade created; env.py refuses it while the
archive holds rows, unless drop_data.
"""

from alembic import op

from flakectl.sqlfiles import install

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ARCHIVE = """
do $flakectl$
declare
  v_schema text := (select s.name from flakectl.codecov_schema s);
begin
  execute format('create table flakectl.flake_archive (like %I.test_analytics_flake)', v_schema);
  alter table flakectl.flake_archive add column archived_at timestamptz not null;
  create index flake_archive_repoid_archived_at on flakectl.flake_archive (repoid, archived_at);
end
$flakectl$
"""

TYPES = [
    """
    create type flakectl.replay_summary as (
      uploads_replayed bigint,
      testruns_considered bigint,
      flakes_live bigint,
      flakes_replayed bigint,
      flakes_identical bigint,
      flakes_archived bigint,
      flakes_inserted bigint,
      testruns_marked bigint
    )
    """,
    """
    create type flakectl.replay_row as (
      side text,
      paired boolean,
      id bigint,
      test_id bytea,
      flags_id bytea,
      count integer,
      fail_count integer,
      recent_passes_count integer,
      start_date timestamptz,
      end_date timestamptz
    )
    """,
]

BODIES = [("replay_guard", 1), ("replay_compare", 1), ("replay", 1), ("replay_rows", 1)]


def upgrade() -> None:
    op.execute(ARCHIVE)
    for statement in TYPES:
        op.execute(statement)
    for name, version in BODIES:
        install(op, name, version)
    # every body from 0005 on is a template whose install revokes EXECUTE from PUBLIC


def downgrade() -> None:
    op.execute("drop function flakectl.replay_rows(bigint, bigint[], integer)")
    op.execute("drop function flakectl.replay(bigint, bigint[], integer, boolean)")
    op.execute("drop function flakectl.replay_compare(bigint, bigint[], integer, boolean)")
    op.execute("drop function flakectl.replay_guard(bigint, bigint[], integer, boolean)")
    op.execute("drop type flakectl.replay_row")
    op.execute("drop type flakectl.replay_summary")
    op.execute("drop table flakectl.flake_archive")
