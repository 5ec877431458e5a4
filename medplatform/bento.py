"""The BentoML model store as the registry's artifact home: version N of model NAME is tag ``NAME:vN``.

``bentoml models list`` shows every registered version; labels and metadata reuse ``export.bentoml_store``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from export.bentoml_store import store_metadata
from medplatform.errors import Conflict


def default_home() -> Path:
    """``$BENTOML_HOME`` or ``~/bentoml``, as BentoML itself resolves it."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def _safe(value: Any) -> Any:
    """BentoML metadata takes basic types only: None entries are dropped."""
    if isinstance(value, Mapping):
        return {str(k): _safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value if v is not None]
    return value


class BentoModels:
    """Save, find and delete registry versions in one BentoML model store (``<home>/models``).

    The store is opened explicitly rather than through BentoML's process-wide container, so a test or a
    second registry can point at another home after ``bentoml`` was imported.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()

    @cached_property
    def store(self) -> Any:
        """BentoML's ``ModelStore`` on ``<home>/models``, opened on first use (importing BentoML costs ~0.7 s)."""
        from bentoml._internal.models.model import ModelStore

        (self.home / "models").mkdir(parents=True, exist_ok=True)
        return ModelStore(str(self.home / "models"))

    @staticmethod
    def tag(name: str, version: int) -> str:
        return f"{name}:v{version}"

    def path(self, tag: str) -> Path | None:
        """The stored model's directory, or None when the tag is not in the store."""
        from bentoml.exceptions import NotFound

        try:
            return Path(self.store.get(tag).path)
        except NotFound:
            return None

    def holds(self, tag: str, manifest: Mapping[str, Any]) -> bool:
        """True when ``tag`` holds these artifacts, False when it is free.

        Raises:
            Conflict: the tag exists with other artifacts (field ``bento_tag``).
        """
        from bentoml.exceptions import NotFound

        try:
            existing = self.store.get(tag)
        except NotFound:
            return False
        if existing.info.metadata.get("version") != manifest["version"]:
            raise Conflict("bento_tag", tag, f"the BentoML store at {self.home} holds other artifacts under this "
                           "tag; `bentoml models delete` it or use another model name")
        return True

    def save(self, tag: str, art_dir: Path, manifest: Mapping[str, Any], registry: Mapping[str, Any]) -> bool:
        """Copy ``art_dir``'s files under ``tag``; True when written, False when the tag already held them.

        Raises:
            Conflict: the tag exists with other artifacts (field ``bento_tag``).
        """
        import bentoml
        from bentoml.exceptions import BentoMLException

        if self.holds(tag, manifest):
            return False
        labels, metadata = store_metadata(manifest)
        labels.update(registry_name=str(registry["name"]), registry_version=str(registry["version"]))
        metadata["registry"] = _safe(registry)
        try:
            with bentoml.models.create(tag, labels=labels, metadata=metadata, _model_store=self.store) as model:
                target = Path(model.path)
                for item in sorted(art_dir.iterdir()):
                    if item.is_file():
                        shutil.copyfile(item, target / item.name)
        except BentoMLException:  # another process saved it first (materialize restoring, say)
            if self.holds(tag, manifest):
                return False
            raise
        return True

    def delete(self, tag: str) -> None:
        """Remove a tag from the store; an absent tag is not an error."""
        from bentoml.exceptions import NotFound

        try:
            self.store.delete(tag)
        except NotFound:
            pass

    def tags(self, name: str | None = None) -> list[str]:
        """Every stored tag (of ``name``), as ``bentoml models list`` shows them."""
        return sorted(str(m.tag) for m in self.store.list(name))
