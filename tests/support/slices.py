"""Stored-slice regression checks (the diffusers pattern): a seeded tiny model's output slice against numbers
pasted into the test, so numeric drift that keeps outputs in range still fails."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# fp32 on CPU: rounding moves these slices by <= 5e-7 (one vs two threads; other vector widths do the same),
# while noise of 1 % of a weight tensor's std moves them by far more than 1e-5 (see spread_weights_)
ATOL, RTOL = 1e-5, 1e-4


def assert_slice(actual: np.ndarray, expected: np.ndarray, regenerate: str, *, atol: float = ATOL) -> None:
    """Fail naming the largest deviation and the command that prints fresh numbers after a deliberate change."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=RTOL, atol=atol,
                               err_msg=f"output drifted from the stored slice; if the change is deliberate, "
                                       f"regenerate with `{regenerate}` and paste the numbers")


def print_slices(slices: dict[str, Callable[[], np.ndarray]]) -> None:
    """Print each slice as a ``NAME = np.array([...])`` line to paste into the test (torch on one thread)."""
    torch.set_num_threads(1)
    for name, compute in slices.items():
        values = [f"{v:.7f}" for v in np.asarray(compute(), dtype=np.float64).ravel()]
        rows = [", ".join(values[i:i + 8]) for i in range(0, len(values), 8)]
        print(f"{name} = np.array([\n" + "".join(f"    {row},\n" for row in rows) + "])")


def spread_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter from ``seed`` so that activations keep an O(1) spread through the network.

    Default inits shrink the signal layer by layer (eval-mode BatchNorm on unit running statistics does not undo
    it), and zero-initialised tables (position embeddings) contribute nothing, so a random-init model's output
    barely depends on its deep layers and drift there would stay under any tolerance. He-normal matrices and
    kernels (std sqrt(2 / fan_in)); vectors (norm scales, biases) keep their init plus N(0, 0.1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.copy_(noise * (2.0 / fan_in) ** 0.5)
            else:
                p.add_(0.1 * noise)
    return model
