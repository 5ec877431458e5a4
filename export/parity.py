"""ONNX Runtime vs torch parity: the check that decides whether an exported graph is valid (``check_parity``;
bounds and cases in docs/architecture.md, "export").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.metrics import dice_per_case

BOUNDS: dict[str, dict[str, float]] = {
    "transunet": {"fp32": 1e-5, "fp16": 1e-2},
    "image_encoder": {"fp32": 2e-4, "fp16": 5e-2},
    "mask_decoder": {"fp32": 2e-4, "fp16": 2e-2},
    "gate": {"fp32": 1e-6, "fp16": 2e-3},
    "pix2pix": {"fp32": 1e-4, "fp16": 1e-2},
    "text_encoder": {"fp32": 1e-3, "fp16": 5e-1},
    "denoiser": {"fp32": 5e-5, "fp16": 2e-2},
    "selector": {"fp32": 5e-5, "fp16": 2e-2},
    "reward": {"fp32": 1e-4, "fp16": 5e-2},  # ratings on the 1-5 scale
}
MIN_DICE = 0.99


class ParityError(RuntimeError):
    """An exported graph disagrees with its torch reference beyond its bound (message names the graph)."""


@dataclass(frozen=True)
class ParityCase:
    """One set of graph inputs: ``inputs`` maps input name -> float32/int array; ``label`` names the source."""

    label: str
    inputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ParityResult:
    """Outcome of ``check_parity``; ``to_dict`` is the manifest's ``parity`` block."""

    graph: str
    max_abs_err: float
    bound: float
    mask_dice: float | None
    passed: bool
    inputs: str
    per_output: dict[str, float] = field(default_factory=dict)
    cases: int = 0
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_err": self.max_abs_err, "bound": self.bound, "mask_dice": self.mask_dice,
                "passed": self.passed, "inputs": self.inputs, "per_output": dict(self.per_output),
                "cases": self.cases, "min_dice": MIN_DICE}

    def raise_if_failed(self, where: str = "") -> None:
        if not self.passed:
            raise ParityError(f"{where or self.graph}: ONNX Runtime disagrees with torch: " + "; ".join(self.problems))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """``core.metrics`` Dice of two boolean arrays of one shape, over all their elements; 1.0 when both are empty."""
    return float(dice_per_case(np.reshape(a, (1, -1)), np.reshape(b, (1, -1)))[0])


def make_session(onnx_path: str | os.PathLike[str], threads: int = 1) -> Any:
    """ONNX Runtime CPU session (``threads`` intra-op threads; 0 = ORT default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def check_parity(
    graph: str,
    onnx_path: str | os.PathLike[str],
    reference: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    cases: Sequence[ParityCase],
    *,
    bound: float,
    mask_outputs: Mapping[str, float] | None = None,
    mask_fn: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
    min_dice: float = MIN_DICE,
    threads: int = 1,
    session: Any = None,
) -> ParityResult:
    """Compare ONNX Runtime with the torch ``reference`` on every case.

    Args:
        graph: graph name (for messages).
        onnx_path: the exported file.
        reference: inputs -> {output name: array}; the torch computation the graph must reproduce.
        cases: input sets (at least one).
        bound: largest allowed absolute difference of any output element.
        mask_outputs: {output name: threshold}; both sides are binarised as ``x > threshold`` and their
            Dice must be >= ``min_dice``.
        mask_fn: (inputs, outputs) -> {name: boolean mask} for masks derived from the outputs (e.g. the
            refined mask a gate produces); applied to both sides, Dice as for ``mask_outputs``.
        threads: ORT intra-op threads.
        session: an existing ORT session (else one is created).

    Returns:
        ParityResult (``passed`` False with ``problems`` listing every violation; nothing is raised).
    """
    if not cases:
        raise ValueError(f"{graph}: check_parity needs at least one case")
    session = session or make_session(onnx_path, threads)
    mask_outputs = dict(mask_outputs or {})
    per_output: dict[str, float] = {}
    dices: list[float] = []
    problems: list[str] = []
    for case in cases:
        expected = {k: np.asarray(v) for k, v in reference(case.inputs).items()}
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, {k: np.asarray(v) for k, v in case.inputs.items()}), strict=True))
        for name, want in expected.items():
            if name not in got:
                problems.append(f"[{case.label}] output {name!r} is missing from the ONNX graph")
                per_output[name] = float("inf")
                continue
            have = got[name]
            if have.shape != want.shape:
                problems.append(f"[{case.label}] output {name!r} has shape {have.shape}, torch gives {want.shape}")
                per_output[name] = float("inf")
                continue
            err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            if not np.isfinite(err):
                err = float("inf")
            per_output[name] = max(per_output.get(name, 0.0), err)
            if name in mask_outputs:
                thr = mask_outputs[name]
                dices.append(dice(have > thr, want > thr))
        if mask_fn is not None and all(n in got for n in expected):
            mine, theirs = mask_fn(case.inputs, got), mask_fn(case.inputs, expected)
            dices.extend(dice(mine[k], theirs[k]) for k in theirs)
    max_err = max(per_output.values()) if per_output else float("inf")
    if max_err > bound:
        worst = max(per_output, key=per_output.get)
        problems.append(f"max abs error {max_err:.3g} (output {worst!r}) exceeds the bound {bound:g}")
    mask_dice = min(dices) if dices else None
    if mask_dice is not None and mask_dice < min_dice:
        problems.append(f"binary-mask Dice {mask_dice:.4f} is below {min_dice}")
    labels = "+".join(dict.fromkeys(c.label for c in cases))
    return ParityResult(graph=graph, max_abs_err=max_err, bound=bound, mask_dice=mask_dice,
                        passed=not problems, inputs=labels, per_output=per_output, cases=len(cases),
                        problems=tuple(problems))
