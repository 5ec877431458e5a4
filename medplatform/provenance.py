"""What a model version records about where it came from: its metrics (from run.json and an optional
evaluation JSON) and the sha256 of every file of its run and artifact directories, checked on the way in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.manifest import MANIFEST_NAME, ArtifactError, check_hashes, load_manifest
from inference.manifest import sha256_file as file_sha256
from medplatform.errors import Conflict, IntegrityFailure, InvalidValue

METRIC_NAMES = ("dice", "iou", "precision", "recall", "hd95")


@dataclass(frozen=True)
class CheckedSources:
    """A run directory and the artifact directory exported from it, both verified.

    ``run_files``/``artifact_files``: ``{file name: sha256}`` of every top-level file (what gets mirrored).
    """

    run_dir: Path
    art_dir: Path
    run: dict[str, Any]
    manifest: dict[str, Any]
    weights_sha256: str
    run_files: dict[str, str]
    artifact_files: dict[str, str]

    @property
    def artifact_version(self) -> str:
        return str(self.manifest["version"])

    @property
    def family(self) -> str:
        """``"generators"`` for generator artifacts (``pipeline.kind``), else ``"segmentation"``."""
        pipeline = self.manifest.get("pipeline")
        return "generators" if isinstance(pipeline, Mapping) and pipeline.get("kind") == "generators" \
            else "segmentation"

    def hashes(self) -> dict[str, Any]:
        """The ``ModelVersion.artifact_hashes`` record."""
        return {"artifact_version": self.artifact_version, "weights_sha256": self.weights_sha256,
                "files": dict(self.artifact_files), "run_files": dict(self.run_files), "family": self.family}


def _files(directory: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}


def check_sources(run_dir: str | os.PathLike[str], art_dir: str | os.PathLike[str]) -> CheckedSources:
    """Verify a finished run directory and its exported artifacts belong together and are intact.

    Raises:
        InvalidValue: ``run_dir`` or ``art_dir`` is missing or malformed (names the file and field).
        IntegrityFailure: the weights or a graph do not match their recorded sha256.
        Conflict: the artifacts were exported from other weights than this run's (field ``art_dir``).
    """
    from weights.checkpoints import RUN_JSON, WEIGHTS_FILE, RunDirError, read_run_json  # imports torch: ~4 s

    run_dir, art_dir = Path(run_dir), Path(art_dir)
    try:
        run = read_run_json(run_dir)
    except RunDirError as exc:
        raise InvalidValue("run_dir", str(run_dir), str(exc)) from exc
    weights = run_dir / str(run.get("weights", WEIGHTS_FILE))
    if not weights.is_file():
        raise InvalidValue("run_dir", str(run_dir), f"{weights.name} missing; {RUN_JSON} refers to it")
    weights_sha = file_sha256(weights)
    if run.get("weights_sha256") and run["weights_sha256"] != weights_sha:
        raise IntegrityFailure(str(weights), weights_sha, f"does not match weights_sha256 in {RUN_JSON}")
    try:
        manifest = load_manifest(art_dir)
    except ArtifactError as exc:
        raise InvalidValue("art_dir", str(art_dir), str(exc)) from exc
    try:
        check_hashes(art_dir, manifest)
    except ArtifactError as exc:
        raise IntegrityFailure("art_dir", str(art_dir), str(exc)) from exc
    source = manifest.get("source", {})
    exported_from = source.get("weights_sha256")
    # generator artifacts (python -m export generators) name one weights sha256 per run in source.runs
    run_shas = [str(r.get("weights_sha256")) for r in (source.get("runs") or {}).values() if isinstance(r, Mapping)]
    if exported_from != weights_sha and (exported_from is not None or weights_sha not in run_shas):
        exported = str(exported_from)[:16] if exported_from is not None else " or ".join(s[:16] for s in run_shas)
        raise Conflict("art_dir", str(art_dir), f"{MANIFEST_NAME} says it was exported from weights "
                       f"{exported}..., but {weights} is {weights_sha[:16]}...")
    return CheckedSources(run_dir=run_dir, art_dir=art_dir, run=run, manifest=manifest, weights_sha256=weights_sha,
                          run_files=_files(run_dir), artifact_files=_files(art_dir))


def version_metrics(run: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"dice", "iou", "precision", "recall", "hd95", "threshold", "thresholds", "source", ...}``.

    With an evaluation (``python -m training evaluate --json``, the same weights): its refined means (coarse for
    a TransUNet run) over ``n_cases`` held-out cases. Without: the validation Dice at the run's threshold
    from run.json; the other metrics are None (not measured), never guessed.
    """
    recorded = run.get("metrics") or {}
    metrics: dict[str, Any] = dict.fromkeys(METRIC_NAMES)
    metrics.update(threshold=float(run["threshold"]), thresholds=dict(run.get("thresholds") or {}),
                   val_dice=recorded.get("val_refined_dice_at_threshold", recorded.get("val_dice")))
    if evaluation is None:
        metrics.update(dice=metrics["val_dice"], source="run.json validation")
        return metrics
    if evaluation.get("weights_sha256") not in (None, run.get("weights_sha256")):
        raise Conflict(
            "evaluation", evaluation.get("weights_sha256"), "the evaluation is of other weights than the run"
        )
    block = evaluation.get("refined") or evaluation.get("coarse")
    if not isinstance(block, Mapping) or not isinstance(block.get("mean"), Mapping):
        raise InvalidValue("evaluation", sorted(evaluation), "expected a 'refined' or 'coarse' block with 'mean'")
    metrics.update({k: block["mean"].get(k) for k in METRIC_NAMES})
    metrics.update(source="evaluation", data=evaluation.get("data"), n_cases=evaluation.get("n_cases"))
    return metrics


def generator_metrics(run: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A generator version's metrics (``pipeline.kind == "generators"``): the consistency Dice its export
    measured (``python -m export genseg``; None for stage one, which records none), what its run recorded, and
    ``trained_by``: ``genseg``, else the registered run's phase (``pix2pix``, ``text2image``, ``rlhf``...).
    The segmentation metrics are None: a generator segments nothing."""
    source = manifest.get("source") or {}
    consistency = dict(source.get("consistency") or {})
    metrics: dict[str, Any] = dict.fromkeys(METRIC_NAMES)
    metrics.update(consistency_dice=consistency.get("dice"), consistency=consistency or None,
                   trained_by="genseg" if source.get("kind") == "genseg" else str(run.get("phase") or "pix2pix"),
                   run_metrics=dict(run.get("metrics") or {}), source="export manifest")
    return metrics
