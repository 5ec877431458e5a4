"""The artifact directory's ``manifest.json``, the contract between export and serving: hashing, the model
version, loading. Layout in docs/architecture.md, "Artifact directory"; verification is ``export.verify``.
(Details: docs/architecture.md, "inference".)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "medrefine-artifacts/1"
MANIFEST_NAME = "manifest.json"
REQUIRED_FIELDS = ("format", "version", "created", "code_version", "opset", "precision", "source",
                   "pipeline", "graphs")
REQUIRED_GRAPH_FIELDS = ("file", "sha256", "inputs", "outputs", "dynamic_axes", "parity")
REQUIRED_ASSET_FIELDS = ("file", "sha256")
# a graph entry's optional "precision" (absent in older manifests: the top-level one applies)
GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact directory is missing, malformed or corrupted; the message names the file at fault."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compute_version(graph_hashes: Mapping[str, str], pipeline: Mapping[str, Any],
                    asset_hashes: Mapping[str, str] | None = None) -> str:
    """The model version: sha256 over the graphs' sha256s (by graph name), the pipeline block and, when
    there are any, the assets' sha256s (by asset name).

    Canonical JSON (sorted keys, no whitespace) so the version does not depend on dict order; without
    assets the payload is the one of artifact sets that have none, so their versions do not change.
    """
    body: dict[str, Any] = {"graphs": dict(sorted(graph_hashes.items())), "pipeline": pipeline}
    if asset_hashes:
        body["assets"] = dict(sorted(asset_hashes.items()))
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def write_manifest(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write ``ART_DIR/manifest.json`` (indented, sorted keys) and return its path."""
    path = Path(art_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ArtifactError naming the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_manifest(art_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and structurally validate ``ART_DIR/manifest.json``.

    Raises:
        ArtifactError: the directory or manifest is missing, not JSON, of another format, or lacks a
            required field (the message names the file and the field).
    """
    art_dir = Path(art_dir)
    path = art_dir / MANIFEST_NAME
    if not art_dir.is_dir():
        raise ArtifactError(f"{art_dir}: artifact directory does not exist")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (expected an artifact directory written by `python -m export onnx`)")
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in REQUIRED_FIELDS:
        if key not in manifest:
            raise ArtifactError(f"{path}: missing field {key!r}")
    if not isinstance(manifest["graphs"], dict) or not manifest["graphs"]:
        raise ArtifactError(f"{path}: field 'graphs' must be a non-empty object")
    for name, graph in manifest["graphs"].items():
        for key in REQUIRED_GRAPH_FIELDS:
            if key not in graph:
                raise ArtifactError(f"{path}: graph {name!r} is missing field {key!r}")
        if graph.get("precision", "fp32") not in GRAPH_PRECISIONS:
            raise ArtifactError(f"{path}: graph {name!r} field 'precision' is {graph['precision']!r}, expected one "
                                f"of {list(GRAPH_PRECISIONS)}")
    assets = manifest.get("assets", {})
    if not isinstance(assets, dict):
        raise ArtifactError(f"{path}: field 'assets' must be an object, got {type(assets).__name__}")
    for name, asset in assets.items():
        if not isinstance(asset, dict) or any(key not in asset for key in REQUIRED_ASSET_FIELDS):
            raise ArtifactError(f"{path}: asset {name!r} needs fields {list(REQUIRED_ASSET_FIELDS)}")
        relative = Path(str(asset["file"]))
        if relative.is_absolute() or ".." in relative.parts:
            raise ArtifactError(f"{path}: asset {name!r} file must be a path inside the artifact directory, "
                                f"got {relative}")
    return manifest


def _check_file(path: Path, expected: str, what: str) -> str:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing ({what})")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{path}: sha256 mismatch (manifest {expected[:16]}..., file {actual[:16]}...): "
            "the file changed after export; re-export it")
    return actual


def check_hashes(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Re-hash every graph and asset file and re-compute the version.

    Raises:
        ArtifactError: a graph or asset file is missing or its bytes changed (names the file and both
            hashes), or the recorded version does not match the graphs, assets and pipeline block.
    """
    art_dir = Path(art_dir)
    hashes = {name: _check_file(art_dir / graph["file"], graph["sha256"],
                                f"graph {name!r} of {art_dir / MANIFEST_NAME}")
              for name, graph in manifest["graphs"].items()}
    asset_hashes = {name: _check_file(art_dir / asset["file"], asset["sha256"],
                                      f"asset {name!r} of {art_dir / MANIFEST_NAME}")
                    for name, asset in (manifest.get("assets") or {}).items()}
    version = compute_version(hashes, manifest["pipeline"], asset_hashes)
    if version != manifest["version"]:
        raise ArtifactError(
            f"{art_dir / MANIFEST_NAME}: field 'version' is {manifest['version'][:16]}..., but the graphs, "
            f"assets and pipeline block give {version[:16]}...: the manifest was edited after export")
