"""Reward model: a small head on the frozen selector's features and learned texture energies that predicts a
1-5 rating of a generated image of a requested modality.
(Why and how it is trained: docs/rlhf.md.)"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigMixin, resolve_preset
from models.selector import SELECTOR_PRESETS, Selector, SelectorConfig, fit_size


@dataclass(frozen=True)
class RewardConfig(ConfigMixin):
    """Attributes:
    selector: the frozen selector whose features the model reads (its modalities are the model's).
    filters: learned 3x3 filters whose log mean-square response ("texture energy") joins those features.
    hidden: width of the two-layer head.
    min_rating / max_rating: the rating scale; predictions lie strictly inside it.
    """

    selector: SelectorConfig = SelectorConfig()
    filters: int = 16
    hidden: int = 64
    min_rating: float = 1.0
    max_rating: float = 5.0

    def __post_init__(self) -> None:
        for name in ("filters", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RewardConfig.{name} must be a positive int, got {value!r}")
        if not float(self.min_rating) < float(self.max_rating):
            raise ValueError(f"RewardConfig: min_rating ({self.min_rating}) must be < max_rating ({self.max_rating})")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.selector.modalities)

    @property
    def image_size(self) -> int:
        """Side the input is resized to (the selector's)."""
        return int(self.selector.image_size)


REWARD_PRESETS: dict[str, RewardConfig] = {
    "default": RewardConfig(),
    "tiny": RewardConfig(selector=SELECTOR_PRESETS["tiny"], filters=4, hidden=8),
}


class RewardModel(nn.Module):
    """``forward(images (B, 1, H, W) in [0, 1], modality_ids (B,) int64) -> ratings (B,)`` in
    ``(min_rating, max_rating)``.

    Inputs to the head: the frozen selector's pooled features and modality log-probabilities, and the log
    mean-square response of ``filters`` learned 3x3 filters (an energy per filter, e.g. of noise), plus a
    learned modality embedding. The selector is part of the state dict and is never trained here.
    """

    def __init__(self, config: RewardConfig, selector: Selector | None = None) -> None:
        super().__init__()
        self.config = config
        self.selector = selector if selector is not None else Selector(config.selector)
        if self.selector.config != config.selector:
            raise ValueError("RewardModel: the selector's config differs from RewardConfig.selector")
        self.selector.requires_grad_(False)
        self.filters = nn.Conv2d(1, config.filters, 3, bias=False)
        width = self.selector.feature_dim + len(config.modalities) + config.filters
        self.modality = nn.Embedding(len(config.modalities), width)
        self.head = nn.Sequential(nn.Linear(width, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 1))

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        self.selector.eval()  # frozen: always in eval mode
        return self

    def forward(self, images: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"RewardModel: images shape {tuple(images.shape)}; expected (B, 1, H, W)")
        if modality_ids.shape != (images.shape[0],):
            raise ValueError(f"RewardModel: modality_ids shape {tuple(modality_ids.shape)}; expected "
                             f"({images.shape[0]},)")
        with torch.no_grad():
            out = self.selector(images)
            seen = torch.cat([out.features, F.log_softmax(out.modality_logits, dim=1)], dim=1)  # (B, F + M)
        x = fit_size(images, self.config.selector.image_size)
        response = self.filters(F.pad(x, (1, 1, 1, 1), mode="replicate"))  # (B, K, S, S)
        energy = torch.log(response.pow(2).mean(dim=(2, 3)) + 1e-5)  # (B, K)
        z = self.head(torch.cat([seen, energy], dim=1) + self.modality(modality_ids))[:, 0]
        low, high = float(self.config.min_rating), float(self.config.max_rating)
        return low + (high - low) * torch.sigmoid(z)

    def score(self, images: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """The predicted rating ``(B,)``, higher is better (the ``ImageScorer`` interface of best-of-N)."""
        return self(images, modality_ids)

    def modality_ids(self, modalities: list[str]) -> torch.Tensor:
        """Names -> ``(B,) int64``; raises ``ValueError`` naming an unknown modality and the known ones."""
        index = {m: i for i, m in enumerate(self.config.modalities)}
        unknown = [m for m in modalities if m not in index]
        if unknown:
            raise ValueError(f"modalities: unknown modality {unknown[0]!r}; expected one of "
                             f"{list(self.config.modalities)}")
        return torch.tensor([index[m] for m in modalities], dtype=torch.long)


def build_reward(name_or_config: str | RewardConfig | dict[str, Any] = "default",
                 selector: Selector | None = None) -> RewardModel:
    """Build from a preset name (``REWARD_PRESETS``), a config or a config dict; ``selector`` (trained) is
    copied in when given, and then sets ``config.selector``."""
    config = resolve_preset(name_or_config, REWARD_PRESETS, RewardConfig, family="reward", builder="build_reward")
    if selector is not None:
        import copy

        config = dataclasses.replace(config, selector=selector.config)
        selector = copy.deepcopy(selector)
    return RewardModel(config, selector)


__all__ = ["REWARD_PRESETS", "RewardConfig", "RewardModel", "build_reward"]
