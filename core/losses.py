"""Segmentation losses (soft Dice, BCE, weighted BCE, focal, Tversky) and weighted sums from a spec string such
as ``"dice+bce"`` (conventions and the spec grammar: docs/architecture.md, "core").
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def _check(input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if input.shape != target.shape:
        raise ValueError(f"input shape {tuple(input.shape)} differs from target shape {tuple(target.shape)}")
    if input.dim() < 2:
        raise ValueError(f"expected (B, 1, H, W) tensors, got shape {tuple(input.shape)}")
    return input.float(), target.float()


def _probabilities(input: torch.Tensor, from_logits: bool) -> torch.Tensor:
    return torch.sigmoid(input) if from_logits else input.clamp(0.0, 1.0)


def _bce_elementwise(
    input: torch.Tensor, target: torch.Tensor, from_logits: bool, pos_weight: float | None = None
) -> torch.Tensor:
    if from_logits:
        weight = (
            None if pos_weight is None else torch.tensor(pos_weight, dtype=input.dtype, device=input.device)
        )
        return F.binary_cross_entropy_with_logits(input, target, pos_weight=weight, reduction="none")
    p = input.clamp(_EPS, 1.0 - _EPS)
    w = 1.0 if pos_weight is None else pos_weight
    return -(w * target * torch.log(p) + (1.0 - target) * torch.log1p(-p))


def soft_dice_loss(
    input: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` per sample, mean over the batch.

    Args:
        input: ``(B, 1, H, W)`` logits (or probabilities with ``from_logits=False``).
        target: ``(B, 1, H, W)`` float in [0, 1].
    """
    input, target = _check(input, target)
    p = _probabilities(input, from_logits).flatten(1)
    t = target.flatten(1)
    score = (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1.0 - score).mean()


def bce_loss(input: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True) -> torch.Tensor:
    """Binary cross-entropy, mean over all pixels. ``input``: logits ``(B, 1, H, W)`` or probabilities."""
    input, target = _check(input, target)
    return _bce_elementwise(input, target, from_logits).mean()


def weighted_bce_loss(
    input: torch.Tensor, target: torch.Tensor, *, pos_weight: float = 15.0, from_logits: bool = True
) -> torch.Tensor:
    """BCE with positive pixels weighted by ``pos_weight`` (class imbalance), mean over all pixels.

    ``-(pos_weight * t * log p + (1 - t) * log(1 - p))``; ``pos_weight = 1`` gives :func:`bce_loss`.
    """
    if pos_weight <= 0:
        raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
    input, target = _check(input, target)
    return _bce_elementwise(input, target, from_logits, pos_weight).mean()


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    from_logits: bool = True,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) ``alpha_t (1 - p_t)**gamma BCE``, mean over all pixels.

    ``p_t = p t + (1 - p)(1 - t)``; ``alpha_t = alpha t + (1 - alpha)(1 - t)``, or 1 when ``alpha`` is None.
    ``gamma = 0`` with ``alpha = None`` gives :func:`bce_loss`.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
    input, target = _check(input, target)
    p = _probabilities(input, from_logits)
    ce = _bce_elementwise(input, target, from_logits)
    p_t = p * target + (1.0 - p) * (1.0 - target)
    loss = ce * (1.0 - p_t).clamp_min(0.0) ** gamma
    if alpha is not None:
        loss = (alpha * target + (1.0 - alpha) * (1.0 - target)) * loss
    return loss.mean()


def tversky_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
    from_logits: bool = True,
) -> torch.Tensor:
    """Tversky loss ``1 - (TP + s) / (TP + alpha FP + beta FN + s)`` with soft counts, per sample, batch mean.

    ``alpha`` weighs false positives and ``beta`` false negatives; ``beta > alpha`` favours recall (small
    lesions); ``alpha = beta = 0.5`` with ``smooth = s`` equals :func:`soft_dice_loss` with ``smooth = 2 s``.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    input, target = _check(input, target)
    p = _probabilities(input, from_logits).flatten(1)
    t = target.flatten(1)
    tp = (p * t).sum(1)
    fp = (p * (1.0 - t)).sum(1)
    fn = ((1.0 - p) * t).sum(1)
    return (1.0 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


# name -> (function, allowed keyword parameters)
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "dice": (soft_dice_loss, ("smooth",)),
    "bce": (bce_loss, ()),
    "wbce": (weighted_bce_loss, ("pos_weight",)),
    "focal": (focal_loss, ("alpha", "gamma")),
    "tversky": (tversky_loss, ("alpha", "beta", "smooth")),
}
DEFAULT_LOSS = "dice+bce"

_TERM = re.compile(r"^(?P<name>[a-z_]+)(?:\((?P<params>[^()]*)\))?(?::(?P<weight>[^:()]+))?$")


class CombinedLoss(nn.Module):
    """Weighted sum of named loss terms; ``forward(input, target)`` returns the scalar total.

    Args:
        terms: ``[(name, weight, {param: value})]`` with names from :data:`LOSSES`.
        from_logits: whether ``input`` holds logits (default) or probabilities.
    """

    def __init__(self, terms: list[tuple[str, float, dict[str, float]]], *, from_logits: bool = True):
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        for name, weight, params in terms:
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
            unknown = sorted(set(params) - set(LOSSES[name][1]))
            if unknown:
                allowed = ", ".join(LOSSES[name][1]) or "none"
                raise ValueError(f"loss {name!r} has no parameter {', '.join(unknown)} (allowed: {allowed})")
            if not weight >= 0:
                raise ValueError(f"weight of loss {name!r} must be >= 0, got {weight}")
        self.terms = [(name, float(weight), dict(params)) for name, weight, params in terms]
        self.from_logits = from_logits

    @property
    def spec(self) -> str:
        """The canonical spec string of this loss (round-trips through :func:`build_loss`)."""
        parts = []
        for name, weight, params in self.terms:
            args = ",".join(f"{k}={v:g}" for k, v in params.items())
            parts.append(f"{name}{f'({args})' if args else ''}:{weight:g}")
        return "+".join(parts)

    def components(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted value of every term, by name (for logging)."""
        return {
            name: LOSSES[name][0](input, target, from_logits=self.from_logits, **params)
            for name, _, params in self.terms
        }

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum; ``input (B, 1, H, W)`` logits (or probabilities), ``target`` in [0, 1]."""
        values = self.components(input, target)
        return sum(
            (weight * values[name] for name, weight, _ in self.terms), torch.zeros((), device=input.device)
        )

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, from_logits={self.from_logits}"


def parse_loss_spec(spec: str) -> list[tuple[str, float, dict[str, float]]]:
    """Parse ``"dice:0.5+tversky(alpha=0.3,beta=0.7)"`` into ``[(name, weight, params)]``.

    Raises:
        ValueError: empty spec, malformed term, unknown name or parameter, bad number, repeated term.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss spec must be a non-empty string like {DEFAULT_LOSS!r}, got {spec!r}")
    terms, seen = [], set()
    for raw in spec.replace(" ", "").lower().split("+"):
        match = _TERM.match(raw)
        if not match:
            raise ValueError(
                f"malformed loss term {raw!r} in {spec!r}; expected NAME, NAME:WEIGHT or NAME(k=v,...)"
            )
        name = match["name"]
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; known: {', '.join(LOSSES)}")
        if name in seen:
            raise ValueError(f"loss {name!r} appears twice in {spec!r}")
        seen.add(name)
        weight = _number(match["weight"], f"weight of {name!r} in {spec!r}") if match["weight"] else 1.0
        params = {}
        for item in filter(None, (match["params"] or "").split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"parameter {item!r} of {name!r} in {spec!r} must be KEY=VALUE")
            params[key] = _number(value, f"parameter {key!r} of {name!r} in {spec!r}")
        terms.append((name, weight, params))
    return terms


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise ValueError(f"{what} must be a number, got {text!r}") from exc


def build_loss(spec: str = DEFAULT_LOSS, *, from_logits: bool = True) -> CombinedLoss:
    """Build a :class:`CombinedLoss` from a spec string (grammar in the module docstring).

    Args:
        spec: e.g. ``"dice+bce"`` (default), ``"focal"``, ``"dice:0.5+bce:1.0"``, ``"wbce(pos_weight=50)"``.
        from_logits: ``False`` when the model outputs probabilities (UltraRefiner's refined mask).

    Raises:
        ValueError: see :func:`parse_loss_spec`; unknown names list the known ones.
    """
    return CombinedLoss(parse_loss_spec(spec), from_logits=from_logits)
