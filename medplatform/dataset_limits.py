"""Dataset limits from the environment (MEDREFINE_DATASET_*, MEDREFINE_MAX_DATASETS): one frozen value,
read when called, shared by the archive reader, the URL fetcher and the ingest."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from medplatform.errors import InvalidValue

MiB = 2**20


@dataclass(frozen=True)
class DatasetLimits:
    """What one dataset upload may hold (defaults in brackets; each has its environment variable).

    Attributes:
        max_bytes: total uncompressed bytes of an upload's entries, and the most bytes a URL fetch
            may stream [1 GiB; MEDREFINE_DATASET_MAX_BYTES].
        max_files: entries in an archive, or files in a multipart set [20 000; MEDREFINE_DATASET_MAX_FILES].
        max_ratio: uncompressed / compressed size of one entry, checked for entries above
            ``ratio_min_bytes`` (a small entry cannot hurt; the total limit bounds them) [200;
            MEDREFINE_DATASET_MAX_RATIO].
        ratio_min_bytes: entries at least this large are held to ``max_ratio`` [1 MiB].
        max_file_bytes: one image or mask file [64 MiB; MEDREFINE_DATASET_MAX_FILE_BYTES].
        max_pixels: ``H * W`` of one decoded plane, core.imageio's bomb check [40 000 000;
            MEDREFINE_DATASET_MAX_PIXELS].
        max_datasets: datasets kept at once; a new one beyond is refused [100; MEDREFINE_MAX_DATASETS].
    """

    max_bytes: int = 1024 * MiB
    max_files: int = 20_000
    max_ratio: int = 200
    ratio_min_bytes: int = 1 * MiB
    max_file_bytes: int = 64 * MiB
    max_pixels: int = 40_000_000
    max_datasets: int = 100

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValue(item.name, value, "a dataset limit must be a positive integer")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DatasetLimits:
        """Limits from ``env`` (default ``os.environ``); an unset or empty variable keeps the default."""
        env = os.environ if env is None else env
        values = {}
        for name, variable in ENV_VARIABLES.items():
            raw = (env.get(variable) or "").strip()
            if raw:
                try:
                    values[name] = int(raw.replace("_", ""))
                except ValueError:
                    raise InvalidValue(variable, raw, "expected a positive integer") from None
        return cls(**values)


ENV_VARIABLES = {
    "max_bytes": "MEDREFINE_DATASET_MAX_BYTES",
    "max_files": "MEDREFINE_DATASET_MAX_FILES",
    "max_ratio": "MEDREFINE_DATASET_MAX_RATIO",
    "max_file_bytes": "MEDREFINE_DATASET_MAX_FILE_BYTES",
    "max_pixels": "MEDREFINE_DATASET_MAX_PIXELS",
    "max_datasets": "MEDREFINE_MAX_DATASETS",
}
