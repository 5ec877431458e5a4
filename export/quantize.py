"""Static int8 (QDQ) graphs, calibrated on phantoms through the real serving pipeline, with int8 parity.
(Details: docs/architecture.md, "export".)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from export.parity import ParityCase, ParityError, check_parity, dice
from inference.engines import Engine, WrappedEngine

__all__ = [
    "CALIBRATION_SEED",
    "INT8_BOUNDS",
    "INT8_MIN_DICE",
    "INT8_OPS",
    "phantom_images",
    "quantize_artifacts",
    "quantize_graph",
    "record_graph_inputs",
]

CALIBRATION_SEED = 1000  # a training seed: default-models trains on 1000-1002; held-out sets use 7000+
CALIBRATION_IMAGES = 16
CHECK_SEED = 1001
CHECK_IMAGES = 8
INT8_MIN_DICE = 0.98
# Largest abs error allowed per graph, in its output units. int8 moves probabilities near a lesion's edge
# a long way (default model, Conv + MatMul in int8: up to 0.42 on one boundary pixel, 0.06-0.32 on the
# phantoms), so this bound only catches gross faults (a missing sigmoid, a broken range: errors near 1);
# the binary masks (Dice >= 0.98, graph and whole pipeline) decide the rest.
INT8_BOUNDS: dict[str, float] = {"transunet": 0.6, "image_encoder": 1.5, "mask_decoder": 2.0, "gate": 0.2}
# Operators quantized per graph (None: every operator ONNX Runtime can quantize). TransUNet with every
# operator in int8 gave a phantom mask at Dice 0.970 against torch. Conv + MatMul kept its check phantoms >= 0.989
# but, once the served answer averaged a mirrored pass (training.calibration's segment rules), an unseen phantom
# (seed 4242) fell to 0.974; MatMul alone kept 32 unseen phantoms >= 0.996 at the same speed within noise.
INT8_OPS: dict[str, tuple[str, ...] | None] = {"transunet": ("MatMul",), "image_encoder": ("MatMul",),
                                               "mask_decoder": ("MatMul",), "gate": ("Conv",)}


class _RecordingEngine(WrappedEngine):
    """Delegates to ``inner`` and keeps a copy of every feed, per graph, one entry per call."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner)
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.setdefault(graph_name, []).append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.inner.run(graph_name, inputs)


def phantom_images(seed: int, count: int, size: int = 256) -> list[np.ndarray]:
    """``count`` breast-ultrasound phantoms (``core.phantoms``): each (size, size) float32 in [0, 1]."""
    from core.phantoms import breast_ultrasound, sample_seed

    return [breast_ultrasound(sample_seed(seed, i), size)[0].astype(np.float32) / 255.0 for i in range(count)]


def _pipeline(art_dir: Path) -> Any:
    from inference.pipeline import SegmentationPipeline

    return SegmentationPipeline.from_artifacts(art_dir, "onnxruntime", intra_op_threads=1, embedding_cache_bytes=0)


def record_graph_inputs(art_dir: str | Path, images: Sequence[np.ndarray], *,
                        masks: list[np.ndarray] | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """Serve ``images`` one at a time through the artifacts' pipeline; the feeds of every graph call.

    Args:
        masks: when given, the served masks (H, W) uint8 {0, 1} are appended to it.

    Returns:
        {graph name: [{input name: array with batch 1}, ...]} in call order.
    """
    from inference.pipeline import SegmentOptions

    pipeline = _pipeline(Path(art_dir))
    recorder = _RecordingEngine(pipeline.engine)
    pipeline.engine = recorder
    for image in images:
        result = pipeline.segment([image], SegmentOptions(outputs=("mask",)))[0]
        if masks is not None:
            masks.append(result.mask)
    return recorder.feeds


def pipeline_masks(art_dir: str | Path, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The served masks (H, W) uint8 {0, 1} of ``images`` (one batch)."""
    from inference.pipeline import SegmentOptions

    results = _pipeline(Path(art_dir)).segment(list(images), SegmentOptions(outputs=("mask",)))
    return [r.mask for r in results]


class _FeedReader(CalibrationDataReader):
    """ONNX Runtime ``CalibrationDataReader`` over recorded feeds (only the graph's own inputs)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
        self._feeds: Iterator[Mapping[str, np.ndarray]] = iter(feeds)
        self._names = list(names)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        return None if feed is None else {n: np.asarray(feed[n]) for n in self._names}


def quantize_graph(src: str | Path, dst: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], *,
                   op_types: Sequence[str] | None = None) -> Path:
    """Static QDQ int8 of the ONNX graph ``src`` into ``dst``, calibrated on ``feeds``.

    uint8 activations with MinMax ranges over the feeds, int8 weights per output channel (per-tensor
    activations, per-channel weights: the combination ONNX Runtime's x86 int8 kernels run fastest).

    Raises:
        ValueError: no feeds.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    if not feeds:
        raise ValueError(f"{src}: no calibration inputs recorded for this graph")
    src, dst = Path(src), Path(dst)
    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    reader = _FeedReader(feeds, names)
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # per-channel notes about 1-D norm weights, one line per weight
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types) if op_types else None)
    finally:
        quant_logger.setLevel(level)
        prepared.unlink(missing_ok=True)
    onnx.checker.check_model(str(dst))
    return dst


def _batch_cases(feeds: Sequence[Mapping[str, np.ndarray]], label: str) -> list[ParityCase]:
    return [ParityCase(f"{label}{i}", dict(feed)) for i, feed in enumerate(feeds)]


def quantize_artifacts(stage: Path, specs: Sequence[Any], graphs: dict[str, Any], names: Sequence[str], *,
                       threads: int = 1, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Replace the graphs ``names`` in the fp32 artifact directory ``stage`` by int8 ones (module docstring).

    ``stage`` must hold a manifest over ``graphs``; the caller rewrites it with the returned block.

    Returns:
        ``graphs`` with the quantized entries updated: ``file`` bytes and ``sha256``, ``precision``
        "int8", ``parity`` (int8 vs torch), ``parity_fp32`` (the fp32 export's), ``quantization``
        (method, operators, calibration, the pipeline's mask Dice against fp32).

    Raises:
        ValueError: a name that is not one of the exported graphs.
        export.parity.ParityError: a graph or the pipeline fails its int8 parity bound.
    """
    from inference.manifest import compute_version, sha256_file, write_manifest

    say = log or (lambda _msg: None)
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(names) - set(graphs))
    if unknown:
        raise ValueError(f"--int8 graphs {unknown} are not exported here; the artifact set has {sorted(graphs)}")
    # 1. Calibration and check inputs, through the fp32 pipeline
    start = time.perf_counter()
    calibration = record_graph_inputs(stage, phantom_images(CALIBRATION_SEED, CALIBRATION_IMAGES))
    check_images = phantom_images(CHECK_SEED, CHECK_IMAGES)
    fp32_masks: list[np.ndarray] = []
    checks = record_graph_inputs(stage, check_images, masks=fp32_masks)
    say(f"  calibration: {CALIBRATION_IMAGES} phantoms through the fp32 pipeline, {time.perf_counter() - start:.1f} s")
    out = {name: dict(entry) for name, entry in graphs.items()}
    for name in names:
        # 2. Quantize; 3. graph parity
        spec, entry = by_name[name], out[name]
        path = stage / entry["file"]
        staged = path.with_name(f"{name}.int8.onnx")
        ops = INT8_OPS.get(name)
        quantize_graph(path, staged, calibration.get(name, []), op_types=ops)
        cases = list(spec.cases()) + _batch_cases(checks.get(name, []), "phantom-feed")
        parity = check_parity(name, staged, spec.reference, cases, bound=INT8_BOUNDS[name],
                              mask_outputs=spec.mask_outputs, mask_fn=spec.mask_fn, min_dice=INT8_MIN_DICE,
                              threads=threads)
        if not parity.passed:
            staged.unlink(missing_ok=True)
            raise ParityError(
                f"graph {name!r} (int8): ONNX Runtime disagrees with torch: " + "; ".join(parity.problems)
            )
        staged.replace(path)
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size, precision="int8",
                     parity=parity.to_dict() | {"min_dice": INT8_MIN_DICE}, parity_fp32=entry["parity"],
                     quantization={"method": "static QDQ, onnxruntime.quantization.quantize_static",
                                   "activations": "uint8 per tensor, MinMax", "weights": "int8 per channel",
                                   "operators": list(ops) if ops else "all quantizable",
                                   "calibration": {"kind": "ultrasound", "seed": CALIBRATION_SEED,
                                                   "images": CALIBRATION_IMAGES,
                                                   "inputs": len(calibration.get(name, []))}})
        say(f"  {name}: int8, {entry['bytes'] / 1e6:.1f} MB, max abs err {parity.max_abs_err:.3g} "
            f"(bound {INT8_BOUNDS[name]:g}), mask dice {parity.mask_dice}")
    # 4. The whole pipeline on the int8 graphs against the fp32 pipeline
    manifest = _read_manifest(stage)
    manifest["graphs"] = out
    manifest["version"] = compute_version({n: g["sha256"] for n, g in out.items()}, manifest["pipeline"])
    write_manifest(stage, manifest)
    masks = pipeline_masks(stage, check_images)
    dices = [dice(a > 0, b > 0) for a, b in zip(masks, fp32_masks, strict=True)]
    if min(dices) < INT8_MIN_DICE:
        raise ParityError(f"int8 graphs {list(names)}: the pipeline's masks differ from fp32 (min Dice "
                          f"{min(dices):.4f} over {len(dices)} phantoms, need >= {INT8_MIN_DICE})")
    for name in names:
        out[name]["quantization"]["pipeline_mask_dice_vs_fp32"] = {
            "min": round(min(dices), 6), "mean": round(float(np.mean(dices)), 6), "images": len(dices),
            "seed": CHECK_SEED}
    say(f"  pipeline masks vs fp32: min Dice {min(dices):.4f} over {len(dices)} phantoms")
    return out


def _read_manifest(stage: Path) -> dict[str, Any]:
    from inference.manifest import MANIFEST_NAME, read_json_object

    return read_json_object(stage / MANIFEST_NAME)
