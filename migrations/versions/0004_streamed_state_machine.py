"""process_upload_set v0002: runs read test by test, the state machine streams;
guard v0002: READ UNCOMMITTED is accepted; process_commit and process_uploads
v0002: NULL arguments are checked in parameter order.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

v0001 read the passes of the tests that matter in one scan whose access path
the planner chose (a sequential scan of the whole table once ~20% of a
commit's tests failed), then sorted every run it read, spilling to disk from
~100k runs. v0002 reads each test's runs by one descent of (repo_id, test_id,
timestamp), in the order of the numbered test list, so the per-test order
needs only small in-memory sorts, and one window pass (v0001: two) and
the aggregates stream, sort-based; it also plans as the PL/pgSQL call runs,
without parallel workers. Same results, except that an upload recorded in
the ledger meanwhile by a call for another repository now fails the call
with 40001 (v0001 skipped it silently after processing it).

guard v0002 refuses only REPEATABLE READ and SERIALIZABLE; v0001 also
refused READ UNCOMMITTED, which PostgreSQL runs as READ COMMITTED.

process_commit and process_uploads v0002 check repo_id for NULL first, so
with several NULL arguments the first in parameter order is named, as the
reference does (v0001 named commit_sha or upload_ids first).

The downgrade re-installs the v0001 bodies.
"""

from alembic import op

from flakectl.sqlfiles import install

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    install(op, "guard", 2)
    install(op, "process_upload_set", 2)
    install(op, "process_commit", 2)
    install(op, "process_uploads", 2)


def downgrade() -> None:
    # create or replace takes the new definition's SET clauses, so v0001
    # comes back without v0002's max_parallel_workers_per_gather
    install(op, "process_uploads", 1)
    install(op, "process_commit", 1)
    install(op, "process_upload_set", 1)
    install(op, "guard", 1)
