"""indexes for per-guild and per-channel rate limits

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        where = sa.text("guild_id IS NOT NULL")
        batch_op.create_index("ix_requests_guild", ["platform", "guild_id", "created_at"], unique=False,
                              postgresql_where=where, sqlite_where=where)
        batch_op.create_index("ix_requests_channel", ["platform", "channel_id", "created_at"], unique=False,
                              postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_channel")
        batch_op.drop_index("ix_requests_guild")
