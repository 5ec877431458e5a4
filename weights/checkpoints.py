"""Run directories (``run.json`` + ``weights.safetensors``): the one on-disk format shared by training, export
and the service; the format and its kinds are in docs/architecture.md ("weights").
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes

RUN_FORMAT = "medrefine-run/1"
RUN_KINDS = ("transunet", "refiner", "ultrarefiner")  # the segmentation kinds build_model_from_run builds
_KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")
_REQUIRED_SECTIONS = {"transunet": ("transunet",), "refiner": ("refiner",), "ultrarefiner": ("transunet", "refiner")}
RUN_JSON = "run.json"
WEIGHTS_FILE = "weights.safetensors"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN_DIR = REPO_ROOT / "checkpoints" / "default"

_REQUIRED_FIELDS = ("format", "kind", "config", "threshold", "metrics")


class RunDirError(ValueError):
    """A run directory is missing, incomplete or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class RunInfo:
    """Everything in a run directory, weights included (as CPU tensors)."""

    run_dir: Path
    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    threshold: float
    metrics: dict[str, Any]
    weights_sha256: str
    phase: str | None = None
    seed: int | None = None
    data_fingerprint: str | None = None
    created: str | None = None
    code_version: str = "unknown"
    sources: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def resolve_run_dir(name_or_path: str | Path) -> Path:
    """``"default"`` -> ``<repo>/checkpoints/default`` (next to this package); anything else is a path."""
    if str(name_or_path) == "default":
        return DEFAULT_RUN_DIR
    return Path(name_or_path).expanduser()


def code_version() -> str:
    """The git commit of the repository holding this package, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else "unknown"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch pickle read with ``weights_only=True``.

    Checkpoints wrapping the weights as ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped.
    Returns CPU tensors. Raises ``RunDirError`` naming the file when it is missing or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RunDirError(f"{path}: cannot be read with torch.load(weights_only=True): {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RunDirError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)


def _state_dict_of(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` as a safetensors file (mode 0644, replaced atomically) whose bytes depend only on the
    tensors and ``metadata``: the library writes the metadata in hash-map order, which changes from process to
    process (and so did the file's sha256), so the header is rewritten with the keys in the order given."""
    blob = _safetensors_bytes({name: tensor.contiguous() for name, tensor in tensors.items()},
                              metadata=dict(metadata))
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + length])
    header["__metadata__"] = dict(metadata)  # same key, same place in the header; only its keys' order changes
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > length:
        raise RuntimeError(f"save_safetensors: header grew from {length} to {len(text)} bytes")
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob[:8] + text.ljust(length, b" ") + blob[8 + length:])
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def save_run(
    run_dir: str | Path,
    model: torch.nn.Module | dict[str, torch.Tensor],
    config: dict[str, Any],
    threshold: float,
    metrics: dict[str, Any],
    *,
    kind: str,
    phase: str | None = None,
    seed: int | None = None,
    data_fingerprint: str | None = None,
    sources: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``weights.safetensors`` and ``run.json`` into ``run_dir`` (created if needed).

    Args:
        model: the module (its ``state_dict()`` is saved) or a state dict.
        config: ``{"transunet": {...}, ...}`` sections as in the run-directory contract.
        threshold: probability threshold in (0, 1) used to binarise the final mask.
        metrics: validation metrics (non-finite floats are stored as null).
        kind: one of ``RUN_KINDS`` or another model family's lowercase kind (e.g. ``"pix2pix"``).
        sources: run directories this run was initialised from, e.g. ``{"transunet": ".../p1"}``.
        extra: additional top-level JSON fields (must not collide with the standard ones).
    Returns:
        the run directory.
    """
    if not isinstance(kind, str) or not _KIND_PATTERN.match(kind):
        raise ValueError(f"save_run: kind = {kind!r}; expected one of {RUN_KINDS} or another lowercase identifier")
    if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) < 1.0):
        raise ValueError(f"save_run: threshold = {threshold!r}; expected a number in (0, 1)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights_path = run_dir / WEIGHTS_FILE
    # "kind" first: the order the committed default checkpoint's header has.
    save_safetensors(_state_dict_of(model), weights_path, {"kind": kind, "format": "pt"})
    record: dict[str, Any] = {
        "format": RUN_FORMAT,
        "kind": kind,
        "config": _json_safe(config),
        "threshold": float(threshold),
        "metrics": _json_safe(metrics),
        "data_fingerprint": data_fingerprint,
        "phase": phase if phase is not None else kind,
        "seed": seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "weights": WEIGHTS_FILE,
        "weights_sha256": file_sha256(weights_path),
        "sources": {k: str(v) for k, v in (sources or {}).items()},
    }
    for key, value in (extra or {}).items():
        if key in record:
            raise ValueError(f"save_run: extra field {key!r} collides with a standard run.json field")
        record[key] = _json_safe(value)
    (run_dir / RUN_JSON).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return run_dir


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``RUN_DIR/run.json`` (no weights). Raises ``RunDirError`` naming the file."""
    run_dir = resolve_run_dir(run_dir)
    path = run_dir / RUN_JSON
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise RunDirError(f"{path}: missing; a run directory needs {RUN_JSON} and {WEIGHTS_FILE}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED_FIELDS if k not in record]
    if missing:
        raise RunDirError(f"{path}: missing field(s) {missing}")
    if record["format"] != RUN_FORMAT:
        raise RunDirError(f"{path}: format = {record['format']!r}; expected {RUN_FORMAT!r}")
    if not isinstance(record["kind"], str) or not _KIND_PATTERN.match(record["kind"]):
        raise RunDirError(f"{path}: kind = {record['kind']!r}; expected a lowercase identifier such as {RUN_KINDS}")
    if not isinstance(record["config"], dict):
        raise RunDirError(f"{path}: config must be an object")
    thr = record["threshold"]
    if not (isinstance(thr, (int, float)) and 0.0 < float(thr) < 1.0):
        raise RunDirError(f"{path}: threshold = {thr!r}; expected a number in (0, 1)")
    lacking = [s for s in _REQUIRED_SECTIONS.get(record["kind"], ()) if s not in record["config"]]
    if lacking:
        raise RunDirError(f"{path}: config lacks section(s) {lacking} required for kind {record['kind']!r}")
    return record


def load_run(run_dir: str | Path, *, verify_hash: bool = True) -> RunInfo:
    """Read ``run.json`` and the weights of a run directory (``"default"`` allowed).

    Raises ``RunDirError`` naming the file at fault (missing run.json, bad field, missing weights,
    hash mismatch).
    """
    run_dir = resolve_run_dir(run_dir)
    record = read_run_json(run_dir)
    weights_path = run_dir / str(record.get("weights", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise RunDirError(f"{weights_path}: missing; {run_dir / RUN_JSON} refers to it")
    sha = file_sha256(weights_path)
    expected = record.get("weights_sha256")
    if verify_hash and expected and expected != sha:
        raise RunDirError(f"{weights_path}: sha256 {sha} does not match weights_sha256 {expected} in run.json")
    state = load_state_dict(weights_path)
    return RunInfo(
        run_dir=run_dir,
        kind=record["kind"],
        config=record["config"],
        state_dict=state,
        threshold=float(record["threshold"]),
        metrics=record.get("metrics") or {},
        weights_sha256=sha,
        phase=record.get("phase"),
        seed=record.get("seed"),
        data_fingerprint=record.get("data_fingerprint"),
        created=record.get("created"),
        code_version=record.get("code_version", "unknown"),
        sources=dict(record.get("sources") or {}),
        raw=record,
    )


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RunDirError(
            f"{origin}: weights do not match the model built from its config "
            f"(missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''})"
        )


def build_model_from_run(
    run_dir: str | Path | RunInfo,
    *,
    transunet_run: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Build the run's model from its config, load its weights, and return it in eval mode.

    ``"ultrarefiner"`` runs give an ``UltraRefiner``; ``"transunet"`` runs a ``TransUNet``;
    ``"refiner"`` runs an ``UltraRefiner`` whose TransUNet comes from ``transunet_run`` or, when
    not given, the run's ``sources["transunet"]``.
    """
    from models.build import build_transunet, build_ultrarefiner

    info = run_dir if isinstance(run_dir, RunInfo) else load_run(run_dir)
    origin = str(info.run_dir / WEIGHTS_FILE)
    if info.kind == "transunet":
        model = build_transunet(info.config["transunet"])
        _load_strict(model, info.state_dict, origin)
    elif info.kind == "ultrarefiner":
        model = build_ultrarefiner(info.config)
        _load_strict(model, info.state_dict, origin)
    elif info.kind != "refiner":
        raise RunDirError(
            f"{info.run_dir / RUN_JSON}: kind {info.kind!r} is not a segmentation model; build_model_from_run "
            f"builds {RUN_KINDS}"
        )
    else:
        source = transunet_run if transunet_run is not None else info.sources.get("transunet")
        if not source:
            raise RunDirError(
                f"{info.run_dir / RUN_JSON}: a 'refiner' run holds no TransUNet; pass transunet_run= "
                "(a phase-1 run directory) or record sources.transunet"
            )
        tu = load_run(source)
        if tu.kind != "transunet":
            raise RunDirError(f"{tu.run_dir / RUN_JSON}: kind = {tu.kind!r}; expected 'transunet'")
        config = dict(info.config, transunet=tu.config["transunet"])
        model = build_ultrarefiner(config)
        state = {f"transunet.{k}": v for k, v in tu.state_dict.items()}
        state.update(info.state_dict)
        _load_strict(model, state, f"{origin} + {tu.run_dir / WEIGHTS_FILE}")
    return model.to(device).eval()
