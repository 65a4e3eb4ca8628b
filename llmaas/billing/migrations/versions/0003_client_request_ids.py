"""The client's own request id (X-Client-Request-Id) on holds and usage records.

`holds.client_request_id` is set at admission and copied to `usage_records.client_request_id` when the
request is settled (by its server, or by another replica after a crash), so a client's id leads to the
ledger row (indexed: looked up by it). Both nullable: a request without one, and every row from before
this migration, has none.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_LENGTH = 512  # schema.MAX_CLIENT_REQUEST_ID when this migration was written


def upgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("client_request_id", sa.String(length=_LENGTH), nullable=True))
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("client_request_id", sa.String(length=_LENGTH), nullable=True))
        batch_op.create_index("ix_usage_client_request_id", ["client_request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_client_request_id")
        batch_op.drop_column("client_request_id")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_column("client_request_id")
