"""feedback: corrected segmentations (and, later, ratings of generated images) from the service's users.

Revision ID: 0003_feedback
Revises: 0002_artifact_version
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from medplatform.db import UTCDateTime

revision = "0003_feedback"
down_revision = "0002_artifact_version"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("model_name", sa.String(63), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("image_key", sa.String(512), nullable=True),
        sa.Column("mask_key", sa.String(512), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("prompts", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("kind IN ('segmentation', 'generation')", name="ck_feedback_kind"),
    )
    op.create_index("ix_feedback_kind_dataset_created_at", "feedback", ["kind", "dataset", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_feedback_kind_dataset_created_at", table_name="feedback")
    op.drop_table("feedback")
