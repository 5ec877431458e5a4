"""model_versions.artifact_version: the artifact manifest's version as an indexed column.

Revision ID: 0002_artifact_version
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_artifact_version"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("artifact_version", sa.String(64), nullable=True))
        batch.create_index("ix_model_versions_artifact_version", ["artifact_version"])
    # Backfill in Python: JSON path syntax differs between SQLite and PostgreSQL.
    table = sa.table("model_versions", sa.column("id", sa.Integer()), sa.column("artifact_hashes", sa.JSON()),
                     sa.column("artifact_version", sa.String(64)))
    bind = op.get_bind()
    for row_id, hashes in bind.execute(sa.select(table.c.id, table.c.artifact_hashes)).all():
        version = (hashes or {}).get("artifact_version")
        if version:
            bind.execute(sa.update(table).where(table.c.id == row_id).values(artifact_version=str(version)))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_index("ix_model_versions_artifact_version")
        batch.drop_column("artifact_version")
