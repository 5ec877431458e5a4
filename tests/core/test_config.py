"""core.config: one strict from_dict/to_dict for every config dataclass; committed configs still load unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.gate import GateConfig
from models.patchgan import PatchGANConfig
from models.pix2pix import Pix2PixConfig
from models.sam.config import SamConfig
from models.selector import SelectorConfig
from models.text2image import Text2ImageConfig
from models.transunet import TransUNetConfig
from models.ultrarefiner import UltraRefinerConfig
from training.augment import AugmentorConfig
from training.genseg import GenSegConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [GateConfig, PatchGANConfig, Pix2PixConfig, SamConfig, SelectorConfig, Text2ImageConfig, TransUNetConfig,
           UltraRefinerConfig, AugmentorConfig, GenSegConfig]
# run.json "config" block -> its class, for every committed checkpoint.
COMMITTED = {
    "checkpoints/default/run.json": {"transunet": TransUNetConfig, "refiner": SamConfig, "gate": GateConfig,
                                     "ultrarefiner": UltraRefinerConfig},
    "checkpoints/generators/text2image/run.json": {"text2image": Text2ImageConfig},
    "checkpoints/generators/pix2pix/run.json": {"pix2pix": Pix2PixConfig, "patchgan": PatchGANConfig},
    "checkpoints/generators/selector/run.json": {"selector": SelectorConfig},
}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_json_round_trip_gives_the_same_config(cls):
    config = cls()
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_unknown_key_names_the_key_and_the_class(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown field\(s\) \['colour'\]"):
        cls.from_dict({"colour": 1})


@pytest.mark.parametrize(("cls", "data", "field"), [
    (TransUNetConfig, {"hidden_size": "128"}, "TransUNetConfig.hidden_size: expected an integer"),
    (TransUNetConfig, {"decoder_channels": [64, 32, 16]}, r"TransUNetConfig.decoder_channels: expected 4 items"),
    (TransUNetConfig, {"resnet_units": 1}, "TransUNetConfig.resnet_units: expected a list"),
    (GateConfig, {"use_image": 1}, "GateConfig.use_image: expected true or false"),
    (GateConfig, {"gate_gamma": True}, "GateConfig.gate_gamma: expected a number"),
    (Text2ImageConfig, {"modalities": ["ct", 3]}, r"Text2ImageConfig.modalities\[1\]: expected a string"),
    (AugmentorConfig, {"weights": {"over": "high"}}, r"AugmentorConfig.weights\['over'\]: expected a number"),
])
def test_wrong_type_names_the_class_and_the_field(cls, data, field):
    with pytest.raises(ValueError, match=field):
        cls.from_dict(data)


def test_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="GateConfig.from_dict expects a dict, got list"):
        GateConfig.from_dict([("type", "none")])


@pytest.mark.parametrize("path", sorted(COMMITTED))
def test_committed_configs_load_and_write_back_unchanged(path):
    blocks = json.loads((REPO / path).read_text())["config"]
    for key, cls in COMMITTED[path].items():
        config = cls.from_dict(blocks[key])
        saved = {cls.renamed_fields.get(name, name): value for name, value in blocks[key].items()}
        assert json.dumps(config.to_dict(), sort_keys=True) == json.dumps(saved, sort_keys=True), (path, key)


def test_the_gate_reads_its_former_gamma_key():
    committed = json.loads((REPO / "checkpoints/default/run.json").read_text())["config"]["gate"]
    assert "gamma" in committed  # saved before the rename to gate_gamma
    assert GateConfig.from_dict(committed).gate_gamma == committed["gamma"]
    assert GateConfig.from_dict({"gamma": 2.5}) == GateConfig(gate_gamma=2.5)
    assert "gamma" not in GateConfig(gate_gamma=2.5).to_dict()
    with pytest.raises(ValueError, match="both 'gamma' and 'gate_gamma'"):
        GateConfig.from_dict({"gamma": 1.0, "gate_gamma": 2.0})


def test_the_committed_default_model_still_builds_from_its_run_json():
    from weights.checkpoints import DEFAULT_RUN_DIR, build_model_from_run

    model = build_model_from_run(DEFAULT_RUN_DIR)
    committed = json.loads((DEFAULT_RUN_DIR / "run.json").read_text())["config"]["gate"]
    assert model.gate.config.gate_gamma == committed["gamma"]
