"""The reward model of a ``"reward"`` run directory (``training.rlhf`` writes it), eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weights.checkpoints import load_run


def load_reward(run_dir: str | Path) -> Any:
    """The ``models.reward.RewardModel`` of a ``"reward"`` run dir, eval mode.

    Raises:
        ValueError: the run is of another kind. weights.checkpoints.RunDirError: a missing or bad file.
    """
    from models.reward import build_reward

    info = load_run(Path(run_dir))
    if info.kind != "reward":
        raise ValueError(f"{run_dir}/run.json: kind = {info.kind!r}; expected 'reward'")
    model = build_reward(info.config["reward"])
    model.load_state_dict(info.state_dict)
    return model.eval()


__all__ = ["load_reward"]
