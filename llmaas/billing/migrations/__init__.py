"""Alembic migrations of the billing schema, run by db.open_database at start."""
