"""Holds expire: a deadline and progress checkpoints on each hold, and a lease per server instance.

`holds.expires_at` (admission or last checkpoint + the hold TTL), `holds.progress_*` (tokens produced
so far, so a crash still bills them) and the `instances` table (one lease row per --instance-id).
Open holds from before this migration get a deadline of their admission + one hour.
"""

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BACKFILL_TTL = timedelta(hours=1)


def upgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("progress_prompt_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("progress_cached_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("progress_completion_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("progress_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_holds_status_expires", ["status", "expires_at"], unique=False)
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Give the open holds a deadline (in Python: date arithmetic differs between SQLite and PostgreSQL).
    holds = sa.table(
        "holds",
        sa.column("id", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("created_at", sa.DateTime()),
        sa.column("expires_at", sa.DateTime()),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(holds.c.id, holds.c.created_at).where(holds.c.status == "open")).all()
    for hold_id, created_at in rows:
        bind.execute(
            holds.update().where(holds.c.id == hold_id).values(expires_at=created_at + _BACKFILL_TTL)
        )


def downgrade() -> None:
    op.drop_table("instances")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_index("ix_holds_status_expires")
        batch_op.drop_column("progress_at")
        batch_op.drop_column("progress_completion_tokens")
        batch_op.drop_column("progress_cached_tokens")
        batch_op.drop_column("progress_prompt_tokens")
        batch_op.drop_column("expires_at")
