"""the queue log's time index skips the workers' lease entries

ix_audit_log_created serves the dashboard's live counters and the workers' throughput estimate,
which count generated, held, failed, retried and refused requests over the last minute or hour.
None of them reads the "claimed" and "posting" entries (a worker taking a request for generation or
for delivery), which are two of the five log rows of every request, so the index now leaves them
out: one index entry fewer per claim on the workers' hottest path. Queries that read the index
state the same condition (storage.models.COUNTED_LOG).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    where = sa.text("action NOT IN ('claimed', 'posting')")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_created")
        batch_op.create_index("ix_audit_log_created", ["created_at"], unique=False,
                              postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_created")
        batch_op.create_index("ix_audit_log_created", ["created_at"], unique=False)
