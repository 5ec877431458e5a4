"""Generator models (pix2pix, selector, text-to-image) built from their run directories, eval mode.

Torch is needed here (these are the nn.Modules); ``inference.generation`` wraps them in pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weights.checkpoints import REPO_ROOT, load_run

GENERATORS_DIR = REPO_ROOT / "checkpoints" / "generators"


def resolve_generators_dir(name_or_path: str | Path) -> Path:
    """``"default"`` -> ``<repo>/checkpoints/generators``; anything else is a path."""
    return GENERATORS_DIR if str(name_or_path) == "default" else Path(name_or_path).expanduser()


def _expect_kind(run_dir: Path, kind: str) -> Any:
    info = load_run(run_dir)
    if info.kind != kind:
        raise ValueError(f"{run_dir}/run.json: kind = {info.kind!r}; expected {kind!r}")
    return info


def load_pix2pix(run_dir: str | Path) -> Any:
    """The generator of a ``"pix2pix"`` run dir, eval mode."""
    from models.pix2pix import build_pix2pix

    info = _expect_kind(Path(run_dir), "pix2pix")
    generator = build_pix2pix(info.config["pix2pix"])
    generator.load_state_dict(info.state_dict)
    return generator.eval()


def load_selector(run_dir: str | Path) -> Any:
    """The selector of a ``"selector"`` run dir, eval mode."""
    from models.selector import build_selector

    info = _expect_kind(Path(run_dir), "selector")
    selector = build_selector(info.config["selector"])
    selector.load_state_dict(info.state_dict)
    return selector.eval()


def load_text2image(run_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(model in eval mode, run.json config)`` of a ``"text2image"`` run dir."""
    from models.text2image import build_text2image

    info = _expect_kind(Path(run_dir), "text2image")
    model = build_text2image(info.config["text2image"])
    model.load_state_dict(info.state_dict)
    return model.eval(), info.config
