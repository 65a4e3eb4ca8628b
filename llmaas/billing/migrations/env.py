"""Alembic environment: runs on the connection that db.open_database passes in `attributes`.

To write a new migration: change schema.py, then add a file under versions/ with the next revision
id and down_revision pointing at the current head (render_as_batch keeps SQLite ALTERs working).
"""

from alembic import context

from llmaas.billing.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
