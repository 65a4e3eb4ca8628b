"""The Batch API and service tiers: uploaded files, batches and their lines; the tier multipliers on
each price version (batch, flex, priority, in percent of the price); the tier a hold and a usage record
are billed at (NULL: default)."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_percent", sa.Integer(), nullable=False, server_default="50"))
        batch_op.add_column(sa.Column("flex_percent", sa.Integer(), nullable=False, server_default="50"))
        batch_op.add_column(sa.Column("priority_percent", sa.Integer(), nullable=False, server_default="200"))
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("service_tier", sa.String(length=16), nullable=True))
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("service_tier", sa.String(length=16), nullable=True))
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=256), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_files_account_id", "files", ["account_id"])
    times = [
        "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
        "cancelled_at",
    ]  # fmt: skip
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("key_id", sa.String(length=40), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("output_file_id", sa.String(length=64), nullable=True),
        sa.Column("error_file_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        *[sa.Column(name, sa.DateTime(), nullable=True) for name in times],
    )
    op.create_index("ix_batches_account_id", "batches", ["account_id"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("batch_id", sa.String(length=64), sa.ForeignKey("batches.id"), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(length=256), nullable=True),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.UniqueConstraint("batch_id", "line"),
    )
    op.create_index("ix_batch_lines_batch_status", "batch_lines", ["batch_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_batch_lines_batch_status", table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_account_id", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_files_account_id", table_name="files")
    op.drop_table("files")
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_column("service_tier")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_column("service_tier")
    with op.batch_alter_table("prices", schema=None) as batch_op:
        batch_op.drop_column("priority_percent")
        batch_op.drop_column("flex_percent")
        batch_op.drop_column("batch_percent")
