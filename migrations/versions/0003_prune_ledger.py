"""flakectl.prune_ledger(older_than interval): forget old ledger rows (v0001).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

The ledger keeps a row per processed upload forever; this function, usable
from psql and behind `flakectl prune`, deletes the rows older than an age of
at least twice the default lookback.
"""

from alembic import op

from flakectl.sqlfiles import install

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    install(op, "prune_ledger", 1)


def downgrade() -> None:
    op.execute("drop function flakectl.prune_ledger(interval)")
