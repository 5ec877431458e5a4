"""Alembic environment: runs on the connection ``medplatform.db.upgrade`` passes in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from medplatform.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the platform migrations through medplatform.db.upgrade(url), which passes a connection")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things: copy-and-move
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
