"""Best-of-N ranked by the reward model instead of the selector: a scorer for
``Text2ImagePipeline.select_best`` / ``generate_best_of`` (docs/rlhf.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.generation import Text2ImagePipeline
    from inference.protocols import ImageScorer, TextEncoder


def load_reward_scorer(run_dir: str | Path) -> ImageScorer:
    """The reward model of a ``"reward"`` run dir (``training.rlhf`` writes ``GENERATORS/reward``), eval mode:
    ``score(images (B, 1, H, W) in [0, 1], modality_ids (B,)) -> predicted rating (B,)`` in (1, 5)."""
    from weights.reward import load_reward

    return load_reward(run_dir)


def with_scorer(pipe: Text2ImagePipeline, scorer: ImageScorer) -> Text2ImagePipeline:
    """A pipeline sharing ``pipe``'s denoiser, text encoder and limits whose best-of-N keeps the candidate
    ``scorer`` rates highest (``pipe`` itself is unchanged).

    Raises:
        ValueError: the scorer's modalities differ from the denoiser's (the ids would mean other modalities).
    """
    from inference.generation import Text2ImagePipeline

    scorer_modalities = tuple(scorer.config.modalities)
    if scorer_modalities != tuple(pipe.modalities):
        raise ValueError(f"scorer modalities {list(scorer_modalities)} != the generator's {list(pipe.modalities)}")
    return Text2ImagePipeline(pipe.model, pipe.text_encoder, selector=scorer, limits=pipe.limits)


def load_reward_ranked_pipeline(generators_dir: str | Path = "default", reward_run: str | Path | None = None, *,
                                text_encoder: TextEncoder | None = None) -> Text2ImagePipeline:
    """``inference.generation.load_text2image_pipeline(generators_dir)`` ranking best-of-N with the reward
    model of ``reward_run`` (default: ``generators_dir/reward``).

    Raises:
        weights.checkpoints.RunDirError: no reward run there (names the file).
    """
    from inference.generation import load_text2image_pipeline
    from weights.generators import resolve_generators_dir

    root = resolve_generators_dir(generators_dir)
    pipe = load_text2image_pipeline(root, text_encoder=text_encoder, with_selector=False)
    return with_scorer(pipe, load_reward_scorer(reward_run if reward_run is not None else root / "reward"))


__all__ = ["load_reward_ranked_pipeline", "load_reward_scorer", "with_scorer"]
