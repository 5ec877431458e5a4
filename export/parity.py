"""ONNX Runtime vs torch parity: the check that decides whether an exported graph is valid.

``check_parity`` runs every ``ParityCase`` (named inputs, labelled "phantom" or "random") through the
torch reference and an ONNX Runtime CPU session and reports the largest absolute difference over all
outputs and cases, and the smallest Dice between binarised masks (outputs listed in ``mask_outputs``).
A graph passes when ``max_abs_err <= bound`` and every Dice >= ``min_dice`` (0.99), with identical
output shapes. Failure raises ``ParityError`` from ``ParityResult.raise_if_failed`` so that the caller
never writes the graph as valid.

Bounds (absolute, in the graph's own output units) in ``BOUNDS``: 15x or more above the largest error
measured on CPU (ONNX Runtime 1.32, torch 2.13) for the tiny test models and the paper sizes (R50-ViT-B/16
TransUNet at 224, SAM ViT-B at 1024, random weights), so numerical noise passes while a real bug — a
missing sigmoid or normalisation, a half-pixel point shift (1.9e-3 on the tiny decoder), an ignored
mask prompt (1e-1), an fp16 conversion slipping into the fp32 encoder or decoder — fails:

============== ============================= ========= ============================= =========
graph          compared outputs              fp32      measured fp32 (tiny / paper)  fp16
============== ============================= ========= ============================= =========
transunet      probability in [0, 1]         1e-5      6.0e-8 / 6.0e-8               1e-2
image_encoder  image_embeddings              2e-4      3.5e-6 / 4.4e-6               5e-2
mask_decoder   masks, low_res_masks (logits) 2e-4      8.7e-7 / 6.9e-6               2e-2
               and iou_predictions
gate           gate weights in [0, 1]        1e-6      6.0e-8 / (no learned gate)    2e-3
============== ============================= ========= ============================= =========

fp16 (graphs converted after fp32 export, compared with the fp32 torch model) measured: transunet
5.6e-6 / 6.3e-6, image_encoder 4.5e-3 (tiny), mask_decoder 2.7e-4 / 5.4e-4, gate 1.4e-4 (tiny); its
bounds also allow for trained models whose probabilities are less saturated. Binary masks must agree
at Dice >= 0.99 in both precisions.

Generator graphs (export/generators.py), measured on the committed default generators
(checkpoints/generators: pix2pix 128 px, MiniLM-L6 text encoder at 24 tokens, denoiser 32 px, selector 32 px):

============== ============================= ========= ============ ========= ============
graph          compared outputs              fp32      measured     fp16      measured
============== ============================= ========= ============ ========= ============
pix2pix        image in [0, 1]               1e-4      4.2e-6       1e-2      4.2e-6
text_encoder   text_hidden (|x| <= ~6.3)     1e-3      5.3e-5       5e-1      1.3e-1
denoiser       prediction (v, |x| ~ 1)       5e-5      1.4e-6       2e-2      1.9e-3
selector       score (log-probabilities)     5e-5      1.9e-6       2e-2      1.8e-3
============== ============================= ========= ============ ========= ============

The text encoder's largest errors sit on padded positions, which the denoiser's cross-attention masks
out (valid tokens: 3.8e-3 in fp16); the bugs its bound must catch are an order larger (token types 1
instead of 0: 5.7, attention mask ignored: 6.0, on the prompt case). The selector's binary check is the
best-of-N decision: the arg-max over each case's candidates must be the same (Dice of the one-hot picks).
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
