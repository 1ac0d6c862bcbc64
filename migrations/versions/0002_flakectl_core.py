"""flakectl's ledger, the one-open-flake index and the process functions (v0001).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Stops before changing anything if test_analytics_flake already holds two open
flakes for one (repoid, test_id): upstream data can, and the unique index
flakectl relies on cannot be built over them (README, "Adopting a database").
"""

from alembic import op

from flakectl.sqlfiles import install

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BODIES = [("guard", 1), ("process_upload_set", 1), ("process_commit", 1), ("process_uploads", 1)]


def upgrade() -> None:
    op.execute(
        """
        do $flakectl$
        declare
          v_rows text;
        begin
          select string_agg(format('repoid %s, test_id \\x%s: flake ids %s',
                                   repoid, encode(test_id, 'hex'), ids), E'\\n')
            into v_rows
            from (select repoid, test_id, array_agg(id order by id) as ids
                    from test_analytics_flake
                   where end_date is null
                   group by repoid, test_id
                  having count(*) > 1
                   order by repoid, test_id
                   limit 50) d;
          if v_rows is not null then
            raise exception using errcode = '23505',
              message = 'flakectl: test_analytics_flake has more than one open flake for a test; nothing was changed',
              detail = v_rows,
              hint = 'Close all but the newest open flake of each test (README, "Adopting a database"), then upgrade again.';
          end if;
        end
        $flakectl$
        """
    )
    op.execute(
        """
        create table flakectl.processed_upload (
          upload_id bigint primary key,
          repo_id bigint not null,
          commit_sha text,
          processed_at timestamptz not null default now()
        )
        """
    )
    op.execute("create index processed_upload_processed_at on flakectl.processed_upload (processed_at)")
    op.execute(
        "create unique index flakectl_flake_one_open on test_analytics_flake (repoid, test_id)"
        " where end_date is null"
    )
    op.execute(
        """
        create type flakectl.summary as (
          uploads_processed bigint,
          uploads_skipped bigint,
          testruns_considered bigint,
          flakes_created bigint,
          flakes_updated bigint,
          flakes_expired bigint,
          testruns_marked bigint
        )
        """
    )
    op.execute(
        """
        create type flakectl.flake_change as (
          flake_id bigint,
          test_id bytea,
          count integer,
          fail_count integer,
          recent_passes_count integer,
          start_date timestamptz,
          end_date timestamptz
        )
        """
    )
    for name, version in BODIES:
        install(op, name, version)


def downgrade() -> None:
    op.execute("drop function flakectl.process_uploads(bigint, bigint[], interval, integer, boolean, boolean)")
    op.execute("drop function flakectl.process_commit(bigint, text, interval, integer, boolean, boolean)")
    op.execute(
        "drop function flakectl.process_upload_set(bigint, bigint[], interval, integer, boolean, text)"
    )
    op.execute("drop function flakectl.guard(bigint, interval, integer, boolean, boolean)")
    op.execute("drop type flakectl.flake_change")
    op.execute("drop type flakectl.summary")
    op.execute("drop index flakectl_flake_one_open")
    op.execute("drop table flakectl.processed_upload")
