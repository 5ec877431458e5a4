"""Register an artifact directory in the BentoML model store (BentoML 1.4 ``bentoml.models.create``).
(Details: docs/architecture.md, "export".)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inference.manifest import check_hashes, load_manifest

DEFAULT_NAME = "medrefine"
VERSION_CHARS = 20


def _metadata_safe(value: Any) -> Any:
    """BentoML metadata accepts only basic types: drop None entries from dicts, None in lists -> "null"."""
    if isinstance(value, Mapping):
        return {str(k): _metadata_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return ["null" if v is None else _metadata_safe(v) for v in value]
    return value


def store_metadata(manifest: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(labels, metadata) for a manifest; labels are strings as BentoML requires."""
    source = manifest["source"]
    labels = {
        "format": manifest["format"].replace("/", "-"),
        "precision": str(manifest["precision"]),
        "opset": str(manifest["opset"]),
        "kind": str(source.get("kind", "ultrarefiner")),
        "graphs": "+".join(sorted(manifest["graphs"])),
        "version": manifest["version"][:VERSION_CHARS],
    }
    metadata = {
        "version": manifest["version"],
        "created": manifest["created"],
        "code_version": manifest["code_version"],
        "threshold": source.get("threshold"),
        "metrics": source.get("metrics", {}),
        "config": source.get("config", {}),
        "data_fingerprint": source.get("data_fingerprint"),
        "pipeline": manifest["pipeline"],
        "graphs": {name: {"file": g["file"], "sha256": g["sha256"],
                          "max_abs_err": g["parity"].get("max_abs_err"), "bound": g["parity"].get("bound"),
                          "mask_dice": g["parity"].get("mask_dice")}
                   for name, g in manifest["graphs"].items()},
    }
    return labels, _metadata_safe(metadata)


def register_artifacts(art_dir: str | os.PathLike[str], name: str = DEFAULT_NAME) -> str:
    """Copy an artifact directory into the BentoML model store; returns the tag ``name:version``.

    The hashes are checked first. If the tag already exists its stored manifest must have the same
    version (then nothing is written); otherwise a ``ValueError`` names the conflict.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    art_dir = Path(art_dir)
    manifest = load_manifest(art_dir)
    check_hashes(art_dir, manifest)
    tag = f"{name}:{manifest['version'][:VERSION_CHARS]}"
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        stored = existing.info.metadata.get("version")
        if stored != manifest["version"]:
            raise ValueError(f"BentoML model {tag} exists with version {stored}, not {manifest['version']}")
        return str(existing.tag)
    labels, metadata = store_metadata(manifest)
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        target = Path(model.path)
        for item in sorted(art_dir.iterdir()):
            if item.is_file():
                shutil.copyfile(item, target / item.name)
    return str(model.tag)
