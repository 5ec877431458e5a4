"""What serving needs from TensorRT without building engines: the GPU here, ``import tensorrt`` with an install
hint, and whether engines built elsewhere run here (``check_engine_compatible``). ``export.tensorrt`` builds them.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "install it on an NVIDIA machine with: pip install 'medrefine[gpu]'"


class MissingDependencyError(RuntimeError):
    """TensorRT or an NVIDIA GPU is missing; the message is one line saying what and how to fix it."""


class EngineCompatibilityError(RuntimeError):
    """A serialized TensorRT engine was built for another GPU or TensorRT version."""


# --------------------------------------------------------------------------- compatibility
@dataclass(frozen=True)
class GpuInfo:
    """An NVIDIA GPU: ``name`` as the driver reports it, ``compute_capability`` "major.minor"."""

    name: str
    compute_capability: str

    @classmethod
    def coerce(cls, value: GpuInfo | Mapping[str, Any]) -> GpuInfo:
        if isinstance(value, GpuInfo):
            return value
        return cls(name=str(value["name"]), compute_capability=str(value["compute_capability"]))


def check_engine_compatible(engine_record: Mapping[str, Any], current_gpu: GpuInfo | Mapping[str, Any],
                            current_trt_version: str) -> None:
    """Raise unless engines described by ``engine_record`` can run here.

    Args:
        engine_record: ``ART_DIR/trt/manifest.json`` content (or any mapping with ``gpu`` {name,
            compute_capability} and ``tensorrt_version``).
        current_gpu: this machine's GPU (``GpuInfo`` or a mapping with the same keys).
        current_trt_version: ``tensorrt.__version__`` here.

    Raises:
        EngineCompatibilityError: TensorRT version, compute capability or GPU model differ (TensorRT
            engines are specific to all three unless built in hardware-compatibility mode); the message
            names both values and how to rebuild.
        ValueError: the record lacks a field.
    """
    for key in ("gpu", "tensorrt_version"):
        if key not in engine_record:
            raise ValueError(f"TensorRT engine record lacks field {key!r}")
    built = GpuInfo.coerce(engine_record["gpu"])
    here = GpuInfo.coerce(current_gpu)
    rebuild = "rebuild the engines here with `python -m export tensorrt --onnx ART_DIR --out ART_DIR/trt`"
    problems = []
    if str(engine_record["tensorrt_version"]) != str(current_trt_version):
        problems.append(f"TensorRT {engine_record['tensorrt_version']} at build, {current_trt_version} here")
    if built.compute_capability != here.compute_capability:
        problems.append(f"compute capability {built.compute_capability} at build, {here.compute_capability} here")
    if built.name != here.name:
        problems.append(f"GPU {built.name!r} at build, {here.name!r} here")
    if problems:
        raise EngineCompatibilityError("TensorRT engines are incompatible with this machine: "
                                       + "; ".join(problems) + f"; {rebuild}")


def profile_max_batch(engine_record: Mapping[str, Any], graph: str) -> int:
    """The largest batch the engine of ``graph`` takes: the smallest first-axis maximum over its optimisation
    profiles' tensor inputs (shape inputs such as ``orig_im_size`` have no batch).

    Raises:
        KeyError: ``graph`` has no engine in the record.
    """
    profiles = engine_record["engines"][graph]["profiles"]
    return min(int(p["max"][0]) for p in profiles if not p.get("is_shape_input"))


# --------------------------------------------------------------------------- environment
def import_tensorrt() -> Any:
    """``import tensorrt`` or raise ``MissingDependencyError`` with the install hint."""
    try:
        import tensorrt  # optional GPU dependency
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed (import tensorrt failed: {exc}); "
                                     f"{INSTALL_HINT}") from exc
    return tensorrt


def query_gpu() -> GpuInfo:
    """The first NVIDIA GPU (via ``nvidia-smi``, else torch.cuda) or ``MissingDependencyError``."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            line = out.strip().splitlines()[0]
            name, cap = (part.strip() for part in line.rsplit(",", 1))
            return GpuInfo(name=name, compute_capability=cap)
        except (subprocess.SubprocessError, IndexError, ValueError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(name=torch.cuda.get_device_name(0), compute_capability=f"{major}.{minor}")
    except ImportError:
        pass
    raise MissingDependencyError("no NVIDIA GPU found (nvidia-smi and torch.cuda see none); TensorRT engines must "
                                 f"be built on the GPU that will run them; {INSTALL_HINT}")
