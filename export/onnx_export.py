"""Export a run directory to an artifact directory of parity-checked ONNX graphs with a manifest
(``export_artifacts``; its steps: docs/architecture.md, "export").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from export.parity import BOUNDS, MIN_DICE, ParityResult, check_parity
from inference.manifest import FORMAT, compute_version, sha256_file, write_manifest

DEFAULT_OPSET = 17
_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 11: "float64", 2: "uint8"}


# --------------------------------------------------------------------------- single graphs
def export_graph(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                 output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]],
                 opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``module(*inputs.values())`` to ONNX at ``path`` and run ``onnx.checker`` on it.

    Args:
        module: the export wrapper (eval mode); its forward takes the inputs positionally, in order.
        inputs: example tensors named as the graph inputs.
        output_names: graph output names, in the order forward returns them.
        dynamic_axes: {tensor name: {axis: dim name}} e.g. {"image": {0: "batch"}}.
    """
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*ONNX.*")
        torch.onnx.export(
            module.eval(), tuple(inputs.values()), str(path), dynamo=False, opset_version=opset,
            input_names=list(inputs), output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, do_constant_folding=True,
        )
        # one sample is enough to learn the static output sizes
        first = [v[:1] if dynamic_axes.get(k, {}).get(0) == "batch" else v for k, v in inputs.items()]
        outputs = module(*first)
    _pin_static_output_dims(path, output_names, outputs, dynamic_axes)
    check_onnx(path)
    return path


def _pin_static_output_dims(path: Path, output_names: Sequence[str], outputs: Any,
                            dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give every output axis that is not declared dynamic its traced size.

    The TorchScript exporter's shape inference leaves some static axes symbolic (e.g. the encoder's
    16 x 16 grid becomes "Addimage_embeddings_dim_2"), which would show up as -1 in Triton configs and
    TensorRT profiles.
    """
    import onnx

    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    sizes = {name: tuple(t.shape) for name, t in zip(output_names, outputs, strict=True)}
    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for value_info in model.graph.output:
        declared = dynamic_axes.get(value_info.name, {})
        dims = value_info.type.tensor_type.shape.dim
        if value_info.name not in sizes or len(dims) != len(sizes[value_info.name]):
            continue
        for axis, dim in enumerate(dims):
            if axis in declared:
                if dim.dim_param != declared[axis]:
                    dim.dim_param = declared[axis]
                    changed = True
            elif not dim.HasField("dim_value"):
                dim.dim_value = int(sizes[value_info.name][axis])
                changed = True
    if changed:
        # rewrite only the graph proto: external-data tensors (graphs > 2 GiB) keep their files
        onnx.save(model, str(path))


def check_onnx(path: str | os.PathLike[str]) -> None:
    """``onnx.checker.check_model`` on a file (by path, so graphs over 2 GiB work)."""
    import onnx

    onnx.checker.check_model(str(path))


def _float16_converter() -> Any:
    try:
        from onnxconverter_common import float16
    except ImportError:
        from onnxruntime.transformers import float16
    return float16.convert_float_to_float16


def topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` in place so every node follows the producers of its inputs.

    The float16 converters append their Cast nodes at the end, which onnx.checker rejects.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({n for node in remaining for n in node.input if n not in available})
            raise ValueError(f"graph has a cycle or undefined inputs: {missing[:5]}")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def convert_to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """fp32 ONNX -> fp16 weights and compute; graph inputs and outputs stay float32 (``keep_io_types``)."""
    import onnx

    model = onnx.load(str(src))
    converted = _float16_converter()(model, keep_io_types=True)
    topological_sort(converted.graph)
    onnx.save(converted, str(dst))
    check_onnx(dst)
    return Path(dst)


def describe_io(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Graph inputs and outputs as manifest entries ``{"name", "shape", "dtype"}``.

    Shapes list ints for static dims and the dim name ("batch", "num_points", ...) for dynamic ones.
    """
    initializers = {i.name for i in model.graph.initializer}

    def entry(value_info: Any) -> dict[str, Any]:
        tensor_type = value_info.type.tensor_type
        shape: list[int | str] = []
        for dim in tensor_type.shape.dim:
            shape.append(int(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?"))
        return {"name": value_info.name, "shape": shape,
                "dtype": _DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))}

    inputs = [entry(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [entry(v) for v in model.graph.output]


# --------------------------------------------------------------------------- whole artifact sets
@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``out_dir``; on success the caller's content replaces ``out_dir``.

    On any exception the staging directory is deleted and ``out_dir`` is left as it was.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    stage.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_one(spec: Any, stage: Path, *, fp16: bool, opset: int, threads: int) -> dict[str, Any]:
    import onnx

    from export.parity import ParityError

    final = stage / f"{spec.name}.onnx"
    fp32_path = stage / f"{spec.name}.fp32.onnx" if fp16 else final
    start = time.perf_counter()
    export_graph(spec.module, spec.example, fp32_path, output_names=spec.output_names,
                 dynamic_axes=spec.dynamic_axes, opset=opset)
    export_seconds = time.perf_counter() - start
    cases = spec.cases()
    start = time.perf_counter()
    parity_fp32 = check_parity(spec.name, fp32_path, spec.reference, cases, bound=spec.bound("fp32"),
                               mask_outputs=spec.mask_outputs, mask_fn=spec.mask_fn, threads=threads)
    parity_fp32.raise_if_failed(f"graph {spec.name!r} (fp32)")
    parity: ParityResult = parity_fp32
    if fp16:
        convert_to_fp16(fp32_path, final)
        fp32_path.unlink()
        parity = check_parity(spec.name, final, spec.reference, cases, bound=spec.bound("fp16"),
                              mask_outputs=spec.mask_outputs, mask_fn=spec.mask_fn, threads=threads)
        if not parity.passed:
            raise ParityError(f"graph {spec.name!r} (fp16): ONNX Runtime disagrees with torch: "
                              + "; ".join(parity.problems))
    parity_seconds = time.perf_counter() - start
    inputs, outputs = describe_io(onnx.load(str(final), load_external_data=False))
    entry = {"file": final.name, "sha256": sha256_file(final), "bytes": final.stat().st_size,
             "inputs": inputs, "outputs": outputs,
             "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
             "precision": "fp16" if fp16 else "fp32",
             "parity": parity.to_dict(), "export_seconds": round(export_seconds, 3),
             "parity_seconds": round(parity_seconds, 3)}
    if fp16:
        entry["parity_fp32"] = parity_fp32.to_dict()
    return entry


def export_specs(specs: Sequence[Any], stage: Path, *, fp16: bool = False, opset: int = DEFAULT_OPSET,
                 threads: int = 1, log: Any = None) -> dict[str, Any]:
    """Export + parity-check every ``GraphSpec`` into ``stage``; returns the manifest's ``graphs`` block.

    Shared by the segmentation and the generator exporters.

    Raises:
        export.parity.ParityError: a graph failed parity (the caller's staging directory is dropped).
    """
    say = log or (lambda _msg: None)
    graphs: dict[str, Any] = {}
    for spec in specs:
        say(f"exporting {spec.name} ...")
        graphs[spec.name] = entry = _export_one(spec, stage, fp16=fp16, opset=opset, threads=threads)
        p = entry["parity"]
        say(f"  {spec.name}: {entry['bytes'] / 1e6:.1f} MB, export {entry['export_seconds']:.1f} s, "
            f"max abs err {p['max_abs_err']:.2e} (bound {p['bound']:g}), mask dice {p['mask_dice']}")
    return graphs


def write_artifact_manifest(stage: Path, graphs: Mapping[str, Any], *, pipeline: Mapping[str, Any],
                            source: Mapping[str, Any], opset: int, fp16: bool,
                            assets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the manifest (format, version over graphs + pipeline [+ assets], provenance) and write it.

    ``assets`` maps an asset name to ``{"file": path relative to the artifact directory, "sha256", ...}``.
    """
    from weights.checkpoints import code_version

    asset_hashes = {name: a["sha256"] for name, a in (assets or {}).items()}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": compute_version({n: g["sha256"] for n, g in graphs.items()}, pipeline, asset_hashes),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "opset": opset,
        "precision": _overall_precision(graphs, "fp16" if fp16 else "fp32"),
        "source": dict(source),
        "pipeline": dict(pipeline),
        "graphs": dict(graphs),
    }
    if assets:
        manifest["assets"] = {name: dict(a) for name, a in assets.items()}
    write_manifest(stage, manifest)
    return manifest


def _overall_precision(graphs: Mapping[str, Any], default: str) -> str:
    """The graphs' one precision, or e.g. "fp32+int8" when they differ (each graph entry has its own)."""
    return "+".join(sorted({str(g.get("precision", default)) for g in graphs.values()})) or default


def export_artifacts(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, fp16: bool = False,
                     opset: int = DEFAULT_OPSET, threads: int = 1, only: Sequence[str] | None = None,
                     int8: Sequence[str] = (), fuse_rel_pos: bool = False, log: Any = None) -> dict[str, Any]:
    """Export every served graph of a run directory into ``out_dir``; returns the manifest.

    ``only`` restricts the export to some graph names (a partial artifact set, e.g. for tests or a
    TransUNet-only deployment); unknown names raise ``ValueError``. ``int8`` names graphs replaced by
    static int8 ones after the fp32 export (export/quantize.py); ``fuse_rel_pos`` exports the image
    encoder with its relative-position term inside the attention matmul (export/fused_encoder.py).

    Raises:
        weights.checkpoints.RunDirError: the run directory is missing or inconsistent.
        export.parity.ParityError: a graph failed parity (nothing is written).
    """
    from export.graphs import build_graph_specs, pipeline_block
    from weights.checkpoints import build_model_from_run, load_run

    # 1. Load the run and its model
    info = load_run(run_dir)
    model = build_model_from_run(info)
    # 2. Graph specs and the pipeline block
    specs = build_graph_specs(model, info)
    if only is not None:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"graphs {unknown} are not produced by run {info.run_dir}; it has "
                             f"{[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    if fuse_rel_pos:
        from export.fused_encoder import fused_encoder_spec

        specs = [fused_encoder_spec(s) if s.name == "image_encoder" else s for s in specs]
    pipeline = pipeline_block(model, info)
    source = {"run_dir": str(Path(info.run_dir).resolve()), "kind": info.kind,
              "weights_sha256": info.weights_sha256, "config": info.config,
              "threshold": info.threshold, "metrics": info.metrics,
              "data_fingerprint": info.data_fingerprint}
    # 3. Export + parity per graph, in a staging directory; 4. the manifest
    with staging_dir(Path(out_dir)) as stage:
        graphs = export_specs(specs, stage, fp16=fp16, opset=opset, threads=threads, log=log)
        manifest = write_artifact_manifest(stage, graphs, pipeline=pipeline, source=source, opset=opset, fp16=fp16)
        if int8:
            from export.quantize import quantize_artifacts

            graphs = quantize_artifacts(stage, specs, graphs, list(int8), threads=threads, log=log)
            manifest = write_artifact_manifest(stage, graphs, pipeline=pipeline, source=source, opset=opset,
                                               fp16=fp16)
    return manifest


def reverify_specs(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any], specs: Mapping[str, Any], *,
                   threads: int = 1, source: str = "the source run") -> dict[str, dict[str, Any]]:
    """Re-run parity of every graph in the manifest against ``specs`` (name -> GraphSpec), with the bound
    recorded in the manifest.

    Raises:
        ValueError: a graph that ``specs`` does not produce (names the graph file).
        export.parity.ParityError: names the graph file on failure.
    """
    results: dict[str, dict[str, Any]] = {}
    for name, graph in manifest["graphs"].items():
        path = Path(art_dir) / graph["file"]
        if name not in specs:
            raise ValueError(f"{path}: graph {name!r} is not produced by {source} (it produces {sorted(specs)})")
        spec = specs[name]
        result = check_parity(name, path, spec.reference, spec.cases(), bound=float(graph["parity"]["bound"]),
                              mask_outputs=spec.mask_outputs, mask_fn=spec.mask_fn, threads=threads,
                              min_dice=float(graph["parity"].get("min_dice", MIN_DICE)))
        result.raise_if_failed(str(path))
        results[name] = result.to_dict()
    return results


def reverify_parity(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any], *,
                    threads: int = 1) -> dict[str, dict[str, Any]]:
    """Re-run parity of every graph in ``art_dir`` against a model rebuilt from the source run.

    Uses the bound recorded in the manifest. Raises ``ParityError`` naming the graph file on failure.
    """
    from export.graphs import build_graph_specs
    from weights.checkpoints import build_model_from_run, load_run

    info = load_run(manifest["source"]["run_dir"])
    specs = {s.name: s for s in build_graph_specs(build_model_from_run(info), info)}
    return reverify_specs(art_dir, manifest, specs, threads=threads, source=f"the source run {info.run_dir}")


def default_bound(graph: str, precision: str) -> float:
    """The bound in ``export.parity.BOUNDS`` for a graph and precision ("fp32" / "fp16")."""
    return BOUNDS[graph][precision]
