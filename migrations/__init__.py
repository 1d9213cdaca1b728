"""Alembic environment and versions of the service's database schema."""
