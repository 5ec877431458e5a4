"""``python -m export genseg``: a GenSeg run's generator as a generator artifact (manifest, parity, verify),
its consistency Dice, and its registration as a model version."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from models.pix2pix import Pix2PixConfig


class _Echo(nn.Module):
    """A "generator" drawing the mask itself (or its inverse) as the image."""

    def __init__(self, invert: bool) -> None:
        super().__init__()
        self.config, self.invert = Pix2PixConfig(image_size=32, ngf=4, num_downs=5), invert

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return 1.0 - mask if self.invert else mask


class _Threshold(nn.Module):
    """A "segmenter" calling bright pixels foreground: logits (B, 1, S, S)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - 0.5) * 50.0


def test_consistency_dice_is_the_segmenters_dice_on_generated_images():
    from export.genseg_export import consistency_dice

    assert consistency_dice(_Echo(invert=False), _Threshold()) == pytest.approx(1.0)
    assert consistency_dice(_Echo(invert=True), _Threshold()) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def genseg_run(tmp_path_factory):
    from models.pix2pix import build_pix2pix
    from tests.training.test_genseg import TINY_PIX2PIX, TINY_TRANSUNET
    from training.generators import phantom_pairs
    from training.genseg import GenSegConfig, train_genseg

    out = tmp_path_factory.mktemp("genseg") / "run"
    torch.manual_seed(0)
    config = GenSegConfig(hyper_every=1, n_real_masks=1, n_perturbed=1)
    train_genseg(phantom_pairs(4, 3, 32), build_pix2pix(TINY_PIX2PIX), out, config=config, steps=2, batch_size=2,
                 transunet=TINY_TRANSUNET)
    return out


def test_cli_exports_a_servable_generator_that_records_its_genseg_run(genseg_run, tmp_path, capsys):
    from export.__main__ import main
    from export.genseg_export import consistency_dice, load_genseg_parts
    from export.verify import verify_artifacts
    from inference.generator_artifacts import load_generators
    from weights.checkpoints import read_run_json

    out = tmp_path / "art"
    assert main(["genseg", str(genseg_run), "--out", str(out)]) == 0
    assert "consistency Dice" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert manifest["format"] == "medrefine-artifacts/1" and manifest["pipeline"]["kind"] == "generators"
    assert sorted(manifest["graphs"]) == ["pix2pix"]
    assert source["kind"] == "genseg" and source["run_dir"] == str(genseg_run.resolve())
    assert source["weights_sha256"] == read_run_json(genseg_run)["weights_sha256"]
    generator, segmenter, _ = load_genseg_parts(genseg_run)
    assert source["consistency"]["dice"] == pytest.approx(consistency_dice(generator, segmenter), abs=1e-6)

    # served by the stage-one loader, and what it serves is the run's generator
    served = load_generators(out, intra_op_threads=1).pix2pix
    masks = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        np.testing.assert_allclose(served.generator(masks).numpy(), generator(masks).numpy(), atol=1e-4)
    assert verify_artifacts(out).mode == "parity"  # export verify re-runs parity against the run


def test_cli_refuses_a_run_that_is_not_genseg(tmp_path, capsys):
    from export.__main__ import main
    from weights.generators import resolve_generators_dir

    code = main(["genseg", str(resolve_generators_dir("default") / "pix2pix"), "--out", str(tmp_path / "art")])
    assert code != 0 and "expected a 'genseg' run directory" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_registered_generator_versions_carry_the_consistency_dice(genseg_run, tmp_path):
    from export.genseg_export import export_genseg_generator
    from medplatform.context import open_platform
    from medplatform.errors import Conflict, InvalidValue
    from weights.generators import resolve_generators_dir

    manifest = export_genseg_generator(genseg_run, tmp_path / "art")
    registry = open_platform({"MEDREFINE_DATA_DIR": str(tmp_path / "var"),
                              "BENTOML_HOME": str(tmp_path / "bentoml")}).registry
    info = registry.register(genseg_run, tmp_path / "art", name="synthesizer")
    assert info.version == 1 and info.artifact_version == manifest["version"]
    assert info.metrics["consistency_dice"] == manifest["source"]["consistency"]["dice"]
    assert info.metrics["trained_by"] == "genseg" and info.metrics["dice"] is None  # not a segmenter's Dice
    assert registry.resolve("synthesizer", 1).family == "generators"
    assert (registry.materialize("synthesizer", 1) / "manifest.json").is_file()
    with pytest.raises(Conflict) as conflict:  # artifacts of other weights than this run's
        registry.register(resolve_generators_dir("default") / "pix2pix", tmp_path / "art", name="synthesizer")
    assert conflict.value.field == "art_dir"
    with pytest.raises(InvalidValue) as invalid:
        registry.register(genseg_run, tmp_path / "art", name="synthesizer", evaluation={"refined": {"mean": {}}})
    assert invalid.value.field == "evaluation"
