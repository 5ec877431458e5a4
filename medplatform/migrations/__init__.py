"""Alembic migrations of the platform database; run them with ``medplatform.db.upgrade(url)``."""
