"""a lighter claim/complete path: no foreign key check per queue-log row, no lease index

The queue log (audit_log) is append-only and written only in the same statement as the change it
records (a CTE over the UPDATE's RETURNING), and requests are never deleted, so the foreign key
from audit_log.request_id to requests.id guarded nothing that could happen, while costing an index
probe and a row lock for every log row on the workers' hottest path (claim and completion write
one each per request). ix_requests_lease duplicated what ix_requests_status_id already reaches
(the few running/posting rows, filtered on lease_expires_at) and cost one more index entry per
claim.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_constraint("fk_audit_log_request_id_requests", type_="foreignkey")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_lease")


def downgrade() -> None:
    where = sa.text("status IN ('running', 'posting')")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index("ix_requests_lease", ["lease_expires_at"], unique=False,
                              postgresql_where=where, sqlite_where=where)
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_foreign_key("fk_audit_log_request_id_requests", "requests", ["request_id"], ["id"],
                                    ondelete="CASCADE")
