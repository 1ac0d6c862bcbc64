"""process_upload_set v0002: runs read test by test, the state machine streams.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

v0001 read the passes of the tests that matter in one scan whose access path
the planner chose (a sequential scan of the whole table once ~20% of a
commit's tests failed), then sorted every run it read, spilling to disk from
~100k runs. v0002 reads each test's runs by one descent of (repo_id, test_id,
timestamp), in the order of the numbered test list, so the per-test order
needs only small in-memory sorts and the windows and aggregates stream; it
also plans as the PL/pgSQL call runs, without parallel workers. Same
results; the downgrade re-installs v0001.
"""

from alembic import op

from flakectl.sqlfiles import install

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    install(op, "process_upload_set", 2)


def downgrade() -> None:
    # v0002 sets a parameter v0001 does not: create or replace keeps a
    # function's SET clauses only as the new definition states them
    install(op, "process_upload_set", 1)
