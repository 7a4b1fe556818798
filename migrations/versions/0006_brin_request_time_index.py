"""PostgreSQL: the requests' creation-time index becomes a BRIN index

ix_requests_created serves one thing, the dashboard's time-range filter (and its text-search
window, a time range too). Requests are appended in creation order, so the table is physically
sorted by created_at and a block-range (BRIN) index answers those ranges from a few dozen bytes
per 128 pages. A B-tree instead took one new entry for every state change of every request
(PostgreSQL writes a fresh entry into each B-tree on an update that changes an indexed column,
and the status does on each transition), two of them on the workers' claim-and-complete path; a
BRIN index only widens a range summary when a value falls outside it, which an update of an old
request never does. SQLite keeps the B-tree (it has no BRIN, and its update path is different).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_requests_created", table_name="requests")
    op.create_index("ix_requests_created", "requests", ["created_at"], unique=False, postgresql_using="brin")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_requests_created", table_name="requests")
    op.create_index("ix_requests_created", "requests", ["created_at"], unique=False)
