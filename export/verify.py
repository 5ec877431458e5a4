"""``verify_artifacts``: re-hash an artifact directory, then re-run parity from its source run or check it
structurally.
(Details: docs/architecture.md, "export".)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.manifest import ArtifactError, check_hashes, load_manifest, sha256_file


@dataclass
class VerifyReport:
    """What ``verify_artifacts`` checked: ``mode`` is "parity" (re-run from the source run) or "structural"."""

    art_dir: str
    version: str
    mode: str
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _source_run_usable(manifest: Mapping[str, Any]) -> tuple[bool, str]:
    source = manifest.get("source", {})
    run_dir = source.get("run_dir")
    if not run_dir:
        return False, "manifest names no source run directory"
    run_path = Path(run_dir)
    weights = run_path / "weights.safetensors"
    if not weights.is_file():
        return False, f"source run {run_path} is not available"
    if sha256_file(weights) != source.get("weights_sha256"):
        return False, f"source run {run_path} has different weights now than at export"
    return True, ""


def structural_check(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """onnx.checker + input/output names and dtypes vs the manifest + an ONNX Runtime session per graph.

    Raises:
        ArtifactError: naming the graph file and the field that disagrees.
    """
    import onnx
    import onnxruntime as ort

    from export.onnx_export import describe_io

    art_dir = Path(art_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, graph in manifest["graphs"].items():
        path = art_dir / graph["file"]
        try:
            onnx.checker.check_model(str(path))
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises several unrelated types here
            raise ArtifactError(f"{path}: not a valid ONNX model ({exc})") from exc
        inputs, outputs = describe_io(model)
        for kind, actual, expected in (("inputs", inputs, graph["inputs"]), ("outputs", outputs, graph["outputs"])):
            got = [(t["name"], t["dtype"]) for t in actual]
            want = [(t["name"], t["dtype"]) for t in expected]
            if got != want:
                raise ArtifactError(f"{path}: {kind} are {got}, manifest says {want}")
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        results[name] = {"checked": "onnx.checker+io+session"}
    return results


def verify_artifacts(art_dir: str | os.PathLike[str], *, rerun_parity: bool = True,
                     threads: int = 1) -> VerifyReport:
    """Verify an artifact directory; returns what was checked or raises on the first problem.

    1. manifest structure; 2. every graph's sha256 and the version; 3. parity re-run from the source run
    (when ``rerun_parity`` and the run still exists with the same weights), else a structural check.

    Raises:
        ArtifactError: corrupted or malformed artifacts (names the file).
        export.parity.ParityError: a graph no longer matches its source model within its bound.
    """
    # 1. Structure
    manifest = load_manifest(art_dir)
    # 2. Bytes
    check_hashes(art_dir, manifest)
    report = VerifyReport(art_dir=str(art_dir), version=manifest["version"], mode="structural")
    # 3. Behaviour
    if manifest["source"].get("kind") == "generators":
        from export.generators import reverify_parity, source_runs_usable
    elif manifest["source"].get("kind") == "genseg":
        from export.genseg_export import reverify_parity, source_runs_usable
    else:
        from export.onnx_export import reverify_parity

        source_runs_usable = _source_run_usable
    usable, why = source_runs_usable(manifest) if rerun_parity else (False, "parity re-run disabled")
    if usable:
        report.mode = "parity"
        report.graphs = reverify_parity(art_dir, manifest, threads=threads)
    else:
        report.notes.append(f"structural check only: {why}")
        report.graphs = structural_check(art_dir, manifest)
    return report
