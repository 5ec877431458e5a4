"""A Triton Inference Server model repository from an artifact directory (one folder per graph plus the
ensemble; layout and limits in docs/architecture.md, "export").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from inference.manifest import MANIFEST_NAME, check_hashes, load_manifest

TRITON_DTYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int32": mc.TYPE_INT32,
                 "int64": mc.TYPE_INT64, "bool": mc.TYPE_BOOL, "uint8": mc.TYPE_UINT8}
ENSEMBLE_NAME = "refiner"
MANIFEST_COPY = "medrefine_manifest.json"


def _dim(value: int | str) -> int:
    """Manifest dims are ints or names of dynamic axes ("batch", "num_points", ...): names -> -1."""
    return int(value) if isinstance(value, int) else -1


def is_batchable(graph: Mapping[str, Any]) -> bool:
    """True when every input and output of a manifest graph entry has the ``batch`` axis first."""
    tensors = list(graph["inputs"]) + list(graph["outputs"])
    return all(t["shape"] and t["shape"][0] == "batch" for t in tensors)


def _add_tensors(container: Any, tensors: Sequence[Mapping[str, Any]], batching: bool, where: str) -> None:
    for tensor in tensors:
        if tensor["dtype"] not in TRITON_DTYPES:
            raise ValueError(f"{where}: tensor {tensor['name']!r} has dtype {tensor['dtype']!r}, "
                             f"not one of {sorted(TRITON_DTYPES)}")
        entry = container.add()
        entry.name = tensor["name"]
        entry.data_type = TRITON_DTYPES[tensor["dtype"]]
        shape = list(tensor["shape"])[1:] if batching else list(tensor["shape"])
        entry.dims.extend(_dim(d) for d in shape)


def graph_config(name: str, graph: Mapping[str, Any], *, max_batch_size: int = 16,
                 preferred_batch_sizes: Sequence[int] = (4, 8), max_queue_delay_us: int = 2000,
                 version: str | None = None) -> Any:
    """``ModelConfig`` for one ONNX graph of the manifest (see the module docstring for batching)."""
    batching = is_batchable(graph) and max_batch_size > 0
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size if batching else 0)
    _add_tensors(config.input, graph["inputs"], batching, name)
    _add_tensors(config.output, graph["outputs"], batching, name)
    if batching:
        config.dynamic_batching.preferred_batch_size.extend(
            b for b in preferred_batch_sizes if b <= max_batch_size)
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    group = config.instance_group.add()
    group.count = 1
    group.kind = mc.ModelInstanceGroup.KIND_AUTO
    if version:
        config.parameters["medrefine_version"].string_value = version
    return config


def ensemble_config(graphs: Mapping[str, Mapping[str, Any]], *, version: str | None = None) -> Any | None:
    """The ``refiner`` ensemble (image_encoder -> mask_decoder, wired by ``image_embeddings``) or None.

    Ensemble inputs: the encoder's ``image`` and every decoder input except ``image_embeddings``;
    outputs: the decoder's outputs. ``max_batch_size`` 0 because the decoder is not batchable; the
    encoder (batchable) still batches, Triton matching its [-1, ...] full shape.
    """
    if "image_encoder" not in graphs or "mask_decoder" not in graphs:
        return None
    enc, dec = graphs["image_encoder"], graphs["mask_decoder"]
    link = "image_embeddings"
    if link not in {t["name"] for t in enc["outputs"]} or link not in {t["name"] for t in dec["inputs"]}:
        raise ValueError(f"cannot chain image_encoder -> mask_decoder: both must name a tensor {link!r}")
    config = mc.ModelConfig(name=ENSEMBLE_NAME, platform="ensemble", max_batch_size=0)
    ens_inputs = list(enc["inputs"]) + [t for t in dec["inputs"] if t["name"] != link]
    _add_tensors(config.input, ens_inputs, False, ENSEMBLE_NAME)
    _add_tensors(config.output, dec["outputs"], False, ENSEMBLE_NAME)
    step = config.ensemble_scheduling.step.add()
    step.model_name, step.model_version = "image_encoder", -1
    for t in enc["inputs"]:
        step.input_map[t["name"]] = t["name"]
    step.output_map[link] = link
    step = config.ensemble_scheduling.step.add()
    step.model_name, step.model_version = "mask_decoder", -1
    for t in dec["inputs"]:
        step.input_map[t["name"]] = t["name"]
    for t in dec["outputs"]:
        step.output_map[t["name"]] = t["name"]
    if version:
        config.parameters["medrefine_version"].string_value = version
    return config


def write_triton_repository(art_dir: str | os.PathLike[str], repo: str | os.PathLike[str], *,
                            max_batch_size: int = 16, ensemble: bool = True) -> dict[str, Path]:
    """Write the model repository; returns {model name: its folder}.

    The artifact hashes are checked first (a corrupted artifact never reaches the repository).
    Existing model folders of the same names are replaced; other folders in ``repo`` are kept.
    """
    art_dir, repo = Path(art_dir), Path(repo)
    manifest = load_manifest(art_dir)
    check_hashes(art_dir, manifest)
    repo.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    configs = {name: graph_config(name, graph, max_batch_size=max_batch_size, version=manifest["version"])
               for name, graph in manifest["graphs"].items()}
    if ensemble:
        ens = ensemble_config(manifest["graphs"], version=manifest["version"])
        if ens is not None:
            configs[ENSEMBLE_NAME] = ens
    for name, config in configs.items():
        folder = repo / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        if name in manifest["graphs"]:
            shutil.copyfile(art_dir / manifest["graphs"][name]["file"], folder / "1" / "model.onnx")
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
        written[name] = folder
    shutil.copyfile(art_dir / MANIFEST_NAME, repo / MANIFEST_COPY)
    return written


def read_config(path: str | os.PathLike[str]) -> Any:
    """Parse a ``config.pbtxt`` back into a ``ModelConfig`` (raises ``text_format.ParseError``)."""
    return text_format.Parse(Path(path).read_text(encoding="utf-8"), mc.ModelConfig())
