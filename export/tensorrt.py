"""TensorRT engines from an artifact directory: profile logic (pure), ONNX preparation, engine build
(profiles and precision: docs/architecture.md, "export").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inference.tensorrt_runtime import import_tensorrt, query_gpu

TRT_FORMAT = "medrefine-trt/1"
# Inputs whose *values* are shapes (TensorRT shape tensors): converted to int32, profiled by value.
SHAPE_INPUTS: tuple[str, ...] = ("orig_im_size",)

_ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 11: "float64", 2: "uint8"}


@dataclass(frozen=True)
class ProfileRanges:
    """(min, opt, max) per named dynamic dimension and value ranges for shape inputs.

    Args:
        batch: range of the ``batch`` axis.
        num_points: range of the decoder's ``num_points`` axis (SAM: points + 2 box corners + padding).
        image_size: (min, opt, max) of each value of a shape input such as ``orig_im_size`` (H, W).
        spatial: range of dynamic ``height`` / ``width`` axes (the learned gate's inputs).
        extra: ranges for any other named dynamic dimension.
    """

    batch: tuple[int, int, int] = (1, 8, 16)
    num_points: tuple[int, int, int] = (1, 5, 10)
    image_size: tuple[int, int, int] = (1, 256, 2048)
    spatial: tuple[int, int, int] = (16, 256, 2048)
    extra: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = {"batch": self.batch, "num_points": self.num_points, "image_size": self.image_size,
                 "spatial": self.spatial, **self.extra}
        for name, rng in named.items():
            if len(rng) != 3 or not (1 <= rng[0] <= rng[1] <= rng[2]):
                raise ValueError(f"ProfileRanges.{name} must be (min, opt, max) with 1 <= min <= opt <= max, "
                                 f"got {tuple(rng)}")

    def for_dim(self, dim_name: str) -> tuple[int, int, int] | None:
        if dim_name == "batch":
            return self.batch
        if dim_name == "num_points":
            return self.num_points
        if dim_name in ("height", "width"):
            return self.spatial
        return self.extra.get(dim_name)


@dataclass(frozen=True)
class InputProfile:
    """Profile entry for one network input.

    ``min/opt/max`` are shapes; for a shape input (``is_shape_input``) ``values_min/opt/max`` are the
    ranges of the tensor's *values* (``profile.set_shape_input``), and dtype must be int32.
    """

    name: str
    dtype: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    is_shape_input: bool = False
    values_min: tuple[int, ...] | None = None
    values_opt: tuple[int, ...] | None = None
    values_max: tuple[int, ...] | None = None

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _graph_inputs(model: Any) -> list[Any]:
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def _dims(value_info: Any) -> list[int | str]:
    dims: list[int | str] = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return dims


def profile_spec(model: Any, ranges: ProfileRanges | None = None,
                 shape_inputs: Sequence[str] = SHAPE_INPUTS) -> list[InputProfile]:
    """One ``InputProfile`` per graph input of an ONNX model (``onnx.ModelProto``).

    Static inputs get min == opt == max; every named dynamic dim gets its range from ``ranges``;
    inputs named in ``shape_inputs`` additionally get a value range from ``ranges.image_size``.

    Raises:
        ValueError: a dynamic dim has no range (names the input and axis), a shape input is not int32
            (run ``prepare_for_tensorrt`` first) or has a dynamic length.
    """
    ranges = ranges or ProfileRanges()
    profiles: list[InputProfile] = []
    for inp in _graph_inputs(model):
        dtype = _ONNX_DTYPES.get(inp.type.tensor_type.elem_type, str(inp.type.tensor_type.elem_type))
        mins, opts, maxs = [], [], []
        for axis, dim in enumerate(_dims(inp)):
            if isinstance(dim, int):
                mins.append(dim), opts.append(dim), maxs.append(dim)
                continue
            rng = ranges.for_dim(dim)
            if rng is None:
                raise ValueError(f"input {inp.name!r} axis {axis} is dynamic ({dim!r}) but ProfileRanges has no "
                                 f"range for it; pass extra={{{dim!r}: (min, opt, max)}}")
            mins.append(rng[0]), opts.append(rng[1]), maxs.append(rng[2])
        if inp.name in shape_inputs:
            if dtype != "int32":
                raise ValueError(f"shape input {inp.name!r} is {dtype}; TensorRT shape tensors must be int32 "
                                 "(run prepare_for_tensorrt on the graph first)")
            if mins != maxs or len(mins) != 1:
                raise ValueError(f"shape input {inp.name!r} must be a 1-D tensor of static length, got {_dims(inp)}")
            n = mins[0]
            lo, mid, hi = ranges.image_size
            profiles.append(InputProfile(inp.name, dtype, tuple(mins), tuple(opts), tuple(maxs), True,
                                         (lo,) * n, (mid,) * n, (hi,) * n))
        else:
            profiles.append(InputProfile(inp.name, dtype, tuple(mins), tuple(opts), tuple(maxs)))
    return profiles


def prepare_for_tensorrt(model: Any, shape_inputs: Sequence[str] = SHAPE_INPUTS) -> Any:
    """Copy of ``model`` whose float shape inputs are int32, each followed by a Cast to its old dtype.

    The consumers of ``orig_im_size`` are rewired to the Cast's output, so the graph computes the same
    thing given the same (integer-valued) sizes. Inputs already int32 are left alone.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    casts = []
    for inp in _graph_inputs(model):
        if inp.name not in shape_inputs:
            continue
        old_type = inp.type.tensor_type.elem_type
        if old_type == TensorProto.INT32:
            continue
        cast_out = f"{inp.name}__as_{_ONNX_DTYPES.get(old_type, old_type)}"
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == inp.name:
                    node.input[i] = cast_out
        for out in graph.output:
            if out.name == inp.name:  # an input passed straight through: keep the graph valid
                raise ValueError(f"shape input {inp.name!r} is also a graph output; cannot retype it")
        inp.type.tensor_type.elem_type = TensorProto.INT32
        casts.append(helper.make_node("Cast", [inp.name], [cast_out], to=old_type,
                                      name=f"{inp.name}_to_{_ONNX_DTYPES.get(old_type, old_type)}"))
    # Casts first keeps the node list topologically sorted.
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- build
def _set_fp16(trt: Any, config: Any, fp16: bool) -> None:
    if not fp16:
        return
    if hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    else:  # TensorRT without weak typing: precision comes from the (fp16) ONNX graph itself
        raise ValueError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16; export the ONNX with "
                         "`python -m export onnx --fp16` and build without --fp16")


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str],
                 ranges: ProfileRanges, *, fp16: bool = False, timing_cache: str | os.PathLike[str] | None = None,
                 workspace_gib: float = 4.0) -> list[InputProfile]:
    """Parse ``onnx_path`` (after ``prepare_for_tensorrt``), add one optimisation profile covering every
    dynamic input and shape input, build and serialize the engine to ``engine_path``.

    Returns the profiles used. Raises ``MissingDependencyError`` without TensorRT, ``RuntimeError``
    naming the ONNX file when parsing or building fails.
    """
    import onnx

    trt = import_tensorrt()
    prepared = prepare_for_tensorrt(onnx.load(str(onnx_path)))
    profiles = profile_spec(prepared, ranges)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x needs it, 10 ignores it
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(prepared.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    marked = {p.name for p in profiles if p.is_shape_input}
    shape_tensors = set()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            shape_tensors.add(tensor.name)
            if tensor.name not in marked:
                raise RuntimeError(f"{onnx_path}: input {tensor.name!r} is a shape tensor for TensorRT but not "
                                   f"listed in SHAPE_INPUTS {SHAPE_INPUTS}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    _set_fp16(trt, config, fp16)
    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for p in profiles:
        if p.is_shape_input and p.name in shape_tensors:
            profile.set_shape_input(p.name, p.values_min, p.values_opt, p.values_max)
        else:  # execution tensors (a listed shape input TensorRT computes with as data lands here too)
            profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return profiles


def ranges_for_manifest(manifest: Mapping[str, Any], *, batch: tuple[int, int, int] = (1, 8, 16),
                        num_points: tuple[int, int, int] = (1, 5, 10), max_image_size: int = 2048) -> ProfileRanges:
    """Profile ranges for an artifact set: the batch and point ranges given, ``orig_im_size`` values
    from 1 to ``max_image_size`` optimised for the refiner size, and the gate's height / width from 16
    to ``max_image_size`` optimised for the TransUNet size (the manifest's pipeline block)."""
    pipeline = manifest["pipeline"]
    refiner = int(pipeline.get("refiner_size", pipeline.get("transunet_size", 256)))
    coarse = int(pipeline.get("transunet_size", refiner))
    top = max(max_image_size, refiner, coarse)
    return ProfileRanges(batch=tuple(batch), num_points=tuple(num_points), image_size=(1, refiner, top),
                         spatial=(min(16, coarse), coarse, top))


def build_engines(art_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                  fp16: bool = False, batch: tuple[int, int, int] = (1, 8, 16),
                  num_points: tuple[int, int, int] = (1, 5, 10), max_image_size: int = 2048,
                  timing_cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Build one engine per graph of an artifact directory into ``out_dir`` (default ``ART_DIR/trt``)
    and write ``out_dir/manifest.json``; returns that record.

    Checks TensorRT and the GPU first, so a machine without them fails before any work.
    """
    from inference.manifest import check_hashes, load_manifest, sha256_file

    trt = import_tensorrt()
    gpu = query_gpu()
    art_dir = Path(art_dir)
    manifest = load_manifest(art_dir)
    check_hashes(art_dir, manifest)
    ranges = ranges_for_manifest(manifest, batch=batch, num_points=num_points, max_image_size=max_image_size)
    out_dir = Path(out_dir) if out_dir is not None else art_dir / "trt"
    out_dir.mkdir(parents=True, exist_ok=True)
    engines: dict[str, Any] = {}
    for name, graph in manifest["graphs"].items():
        engine_file = f"{name}.plan"
        start = time.perf_counter()
        profiles = build_engine(art_dir / graph["file"], out_dir / engine_file, ranges, fp16=fp16,
                                timing_cache=timing_cache)
        engines[name] = {"file": engine_file, "sha256": sha256_file(out_dir / engine_file),
                         "onnx_file": graph["file"], "onnx_sha256": graph["sha256"],
                         "build_seconds": round(time.perf_counter() - start, 2),
                         "profiles": [p.to_dict() for p in profiles]}
    record = {"format": TRT_FORMAT, "artifact_version": manifest["version"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "gpu": asdict(gpu), "tensorrt_version": str(trt.__version__),
              "precision": "fp16" if fp16 else "fp32", "engines": engines,
              "timing_cache": str(timing_cache) if timing_cache else None}
    (out_dir / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record
