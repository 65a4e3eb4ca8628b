"""Stored responses of /v1/responses (store: true): the response object and this turn's input items,
under the account that made it, kept until `expires_at` (`llmaas serve --response-retention-days`)."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("id", sa.String(length=128), primary_key=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("previous_response_id", sa.String(length=128), nullable=True),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("input_items", sa.JSON(), nullable=False),
    )
    op.create_index("ix_stored_responses_account_id", "stored_responses", ["account_id"])
    op.create_index("ix_stored_responses_expires", "stored_responses", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_stored_responses_expires", table_name="stored_responses")
    op.drop_index("ix_stored_responses_account_id", table_name="stored_responses")
    op.drop_table("stored_responses")
