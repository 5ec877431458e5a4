"""Read and verify an exported artifact directory (``python -m export onnx`` writes it).
(Details: docs/architecture.md, "inference".)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.manifest import MANIFEST_NAME, ArtifactError, check_hashes, load_manifest, read_json_object

__all__ = ["ArtifactError", "Artifacts", "GraphFile", "PipelineSpec", "check_tensorrt_engines", "load_artifacts"]

REQUIRED_GRAPHS = ("transunet", "image_encoder", "mask_decoder")


@dataclass(frozen=True)
class GraphFile:
    """One exported graph: its verified file and its I/O signature as recorded by the exporter.

    ``inputs`` / ``outputs`` are lists of ``{"name", "shape", "dtype"}``; symbolic dims are strings
    such as ``"batch"``.
    """

    name: str
    path: Path
    sha256: str
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    dynamic_axes: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(str(spec["name"]) for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(str(spec["name"]) for spec in self.outputs)


@dataclass(frozen=True)
class PipelineSpec:
    """The constants the glue between graphs needs (manifest ``pipeline`` block).

    Sizes are square sides in pixels; ``gate`` is a ``GateConfig.to_dict()``; ``threshold`` is the
    validated probability threshold for the final mask; ``ultrarefiner`` is the model's
    ``UltraRefinerConfig.to_dict()`` (prompt and ROI settings).
    """

    transunet_size: int
    transunet_in_channels: int
    refiner_size: int
    refiner_preprocess: str
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    roi_expand_ratio: float
    mask_prompt_style: str
    gate: dict[str, Any]
    threshold: float
    ultrarefiner: dict[str, Any] = field(default_factory=dict)
    use_points: bool = True
    use_box: bool = True
    use_mask_prompt: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> PipelineSpec:
        required = (
            "transunet_size", "transunet_in_channels", "refiner_size", "refiner_preprocess", "roi_expand_ratio",
            "mask_prompt_style", "gate", "threshold",
        )
        missing = [key for key in required if key not in data]
        if missing:
            raise ArtifactError(f"{where}: pipeline block lacks {', '.join(missing)}")
        threshold = float(data["threshold"])
        if not 0.0 < threshold < 1.0:
            raise ArtifactError(f"{where}: pipeline.threshold must be in (0, 1), got {threshold}")
        return cls(
            transunet_size=int(data["transunet_size"]),
            transunet_in_channels=int(data["transunet_in_channels"]),
            refiner_size=int(data["refiner_size"]),
            refiner_preprocess=str(data["refiner_preprocess"]),
            pixel_mean=tuple(float(v) for v in data.get("pixel_mean", ())),
            pixel_std=tuple(float(v) for v in data.get("pixel_std", ())),
            roi_expand_ratio=float(data["roi_expand_ratio"]),
            mask_prompt_style=str(data["mask_prompt_style"]),
            gate=dict(data["gate"] or {}),
            threshold=threshold,
            ultrarefiner=dict(data.get("ultrarefiner") or {}),
            use_points=bool(data.get("use_points", True)),
            use_box=bool(data.get("use_box", True)),
            use_mask_prompt=bool(data.get("use_mask_prompt", True)),
        )


@dataclass(frozen=True)
class Artifacts:
    """A loaded, verified artifact directory."""

    root: Path
    version: str
    precision: str
    opset: int | None
    pipeline: PipelineSpec
    graphs: dict[str, GraphFile]
    source: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def threshold(self) -> float:
        return self.pipeline.threshold

    def graph(self, name: str) -> GraphFile:
        """The spec of graph ``name``; ArtifactError naming the available graphs if absent."""
        try:
            return self.graphs[name]
        except KeyError:
            raise ArtifactError(
                f"{self.root / MANIFEST_NAME}: no graph {name!r}; the manifest has {sorted(self.graphs)}"
            ) from None

    def verify(self) -> None:
        """Re-hash every graph file and the version against the manifest (ArtifactError on a mismatch)."""
        check_hashes(self.root, self.manifest)


def _graph_file(root: Path, name: str, entry: Any, where: str) -> GraphFile:
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        raise ArtifactError(f"{where}: graphs.{name} needs 'file' and 'sha256'")
    relative = Path(str(entry["file"]))
    if relative.is_absolute() or ".." in relative.parts:
        raise ArtifactError(f"{where}: graphs.{name}.file must be a path inside the artifact directory, got {relative}")
    parity = dict(entry.get("parity") or {})
    if parity and parity.get("passed") is False:
        raise ArtifactError(f"{root / relative}: graph {name!r} failed its export parity check ({parity})")
    return GraphFile(
        name=name,
        path=root / relative,
        sha256=str(entry["sha256"]).lower(),
        inputs=tuple(entry.get("inputs") or ()),
        outputs=tuple(entry.get("outputs") or ()),
        dynamic_axes=dict(entry.get("dynamic_axes") or {}),
        parity=parity,
    )


def load_artifacts(art_dir: str | Path, *, verify: bool = True) -> Artifacts:
    """Load ``art_dir/manifest.json`` and (by default) verify every graph's sha256 and the version.

    Args:
        art_dir: the artifact directory.
        verify: hash the graph files against the manifest (leave True outside of tests).

    Raises:
        ArtifactError: missing directory/manifest, bad JSON, wrong format, a missing required graph or
            field, a graph that failed export parity, or a missing/modified graph file.
    """
    root = Path(art_dir)
    manifest = load_manifest(root)
    where = str(root / MANIFEST_NAME)
    graphs_block = manifest["graphs"]
    missing = [name for name in REQUIRED_GRAPHS if name not in graphs_block]
    if missing:
        raise ArtifactError(f"{where}: lacks required graph(s) {missing}; has {sorted(graphs_block)}")
    graphs = {name: _graph_file(root, name, entry, where) for name, entry in graphs_block.items()}
    pipeline = PipelineSpec.from_dict(dict(manifest["pipeline"]), where)
    artifacts = Artifacts(
        root=root,
        version=str(manifest["version"]),
        precision=str(manifest.get("precision", "fp32")),
        opset=int(manifest["opset"]) if manifest.get("opset") is not None else None,
        pipeline=pipeline,
        graphs=graphs,
        source=dict(manifest.get("source") or {}),
        manifest=manifest,
    )
    if verify:
        artifacts.verify()
    return artifacts


def check_tensorrt_engines(
    artifacts: Artifacts,
    engines_dir: str | Path | None = None,
    *,
    gpu: Any = None,
    tensorrt_version: str | None = None,
) -> dict[str, Any]:
    """Check the TensorRT engine record (``ART_DIR/trt/manifest.json``) before any engine is deserialised.

    In order: the record exists and is a JSON object; it was built from these artifacts (same version);
    every engine file exists with the recorded sha256; and the engines were built for this GPU model,
    compute capability and TensorRT version (engines are not portable across any of the three).

    Args:
        artifacts: the verified artifact directory.
        engines_dir: where the engines are (default ``ART_DIR/trt``).
        gpu: this machine's GPU (``inference.tensorrt_runtime.GpuInfo`` or a mapping with ``name`` and
            ``compute_capability``); None queries it (``inference.tensorrt_runtime.query_gpu``).
        tensorrt_version: ``tensorrt.__version__`` here; None imports tensorrt to read it.

    Returns:
        The engine record.

    Raises:
        ArtifactError: missing or malformed record, artifact-version mismatch, missing or modified engine file.
        inference.tensorrt_runtime.EngineCompatibilityError: built for another GPU, compute capability or TensorRT.
        inference.tensorrt_runtime.MissingDependencyError: no TensorRT or no NVIDIA GPU here (only when asked to query).
    """
    from inference.manifest import sha256_file
    from inference.tensorrt_runtime import check_engine_compatible, import_tensorrt, query_gpu

    engines_dir = Path(engines_dir) if engines_dir is not None else artifacts.root / "trt"
    record_path = engines_dir / "manifest.json"
    if not record_path.is_file():
        raise ArtifactError(f"{record_path}: no TensorRT engine record; build engines with `python -m export tensorrt`")
    record = read_json_object(record_path)
    if record.get("artifact_version") != artifacts.version:
        raise ArtifactError(
            f"{record_path}: engines were built from artifact version {str(record.get('artifact_version'))[:16]}..., "
            f"the artifacts are {artifacts.version[:16]}...; rebuild them")
    engines = record.get("engines")
    if not isinstance(engines, Mapping) or not engines:
        raise ArtifactError(f"{record_path}: field 'engines' must be a non-empty object")
    for name, entry in engines.items():
        if not isinstance(entry, Mapping) or "file" not in entry or "sha256" not in entry:
            raise ArtifactError(f"{record_path}: engines.{name} needs 'file' and 'sha256'")
        path = engines_dir / str(entry["file"])
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (TensorRT engine for graph {name!r} of {record_path})")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from {record_path} (TensorRT engine for graph {name!r})")
    # TensorRT first: without it there is nothing to run, whatever the GPU.
    here_trt = str(import_tensorrt().__version__ if tensorrt_version is None else tensorrt_version)
    here_gpu = query_gpu() if gpu is None else gpu
    try:
        check_engine_compatible(record, here_gpu, here_trt)
    except ValueError as exc:  # the record lacks gpu / tensorrt_version
        raise ArtifactError(f"{record_path}: {exc}") from exc
    return record
