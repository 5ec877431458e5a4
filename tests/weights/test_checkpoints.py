"""Run directories: save/load round trips, hashes, safe weight loading, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models.build import build_transunet, build_ultrarefiner, config_to_dict
from tests.support.artifact_factory import tiny_refiner
from weights.checkpoints import (
    DEFAULT_RUN_DIR,
    RUN_FORMAT,
    RunDirError,
    build_model_from_run,
    file_sha256,
    load_run,
    load_state_dict,
    read_run_json,
    resolve_run_dir,
    save_run,
)

CONFIG = config_to_dict({"transunet": "tiny", "refiner": tiny_refiner(), "gate": "learned"})


class NotWeights:
    """Pickled by test_load_state_dict_formats; torch.load(weights_only=True) must refuse it."""


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 48, 48, generator=g) * 0.3
    image[:, :, 14:30, 18:34] += 0.6  # a bright square to segment
    return image.clamp(0, 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_ultrarefiner(CONFIG).eval()
    with torch.no_grad():  # non-trivial gate weights so the gate's keys matter too
        for p in m.gate.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


def test_ultrarefiner_round_trip_gives_identical_outputs(tmp_path, model):
    run_dir = save_run(tmp_path / "run", model, model.config_dict(), 0.45, {"val_dice": 0.9, "nan": float("nan")},
                       kind="ultrarefiner", phase="e2e", seed=3, data_fingerprint="abc")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["format"] == RUN_FORMAT and record["kind"] == "ultrarefiner" and record["phase"] == "e2e"
    assert set(record["config"]) == {"transunet", "refiner", "gate", "ultrarefiner"}
    assert record["threshold"] == 0.45 and record["seed"] == 3 and record["data_fingerprint"] == "abc"
    assert record["metrics"] == {"val_dice": 0.9, "nan": None}  # non-finite stored as null
    assert record["weights_sha256"] == file_sha256(run_dir / "weights.safetensors")
    assert record["created"] and record["code_version"]

    info = load_run(run_dir)
    assert info.weights_sha256 == record["weights_sha256"] and info.threshold == 0.45
    expected = model.state_dict()
    assert set(info.state_dict) == set(expected)
    assert all(k.split(".")[0] in ("transunet", "refiner", "gate") for k in info.state_dict)
    for k, v in expected.items():
        assert torch.equal(info.state_dict[k], v), k

    rebuilt = build_model_from_run(run_dir)
    assert not rebuilt.training
    with torch.no_grad():
        a, b = model(_image()), rebuilt(_image())
    for key in ("coarse_mask", "refined_mask", "sam_mask", "gate"):
        assert torch.equal(a[key], b[key]), key


def test_transunet_and_refiner_runs(tmp_path, model):
    tu_dir = save_run(tmp_path / "p1", model.transunet, {"transunet": CONFIG["transunet"]}, 0.5, {}, kind="transunet")
    tu = build_model_from_run(tu_dir)
    size = model.transunet.config.img_size
    x = torch.rand(1, 1, size, size)
    with torch.no_grad():
        assert torch.equal(tu(x), model.transunet(x))

    partial = {k: v for k, v in model.state_dict().items() if k.startswith(("refiner.", "gate."))}
    rf_dir = save_run(tmp_path / "p2", partial, CONFIG, 0.5, {}, kind="refiner")
    with pytest.raises(RunDirError, match="holds no TransUNet"):
        build_model_from_run(rf_dir)
    full = build_model_from_run(rf_dir, transunet_run=tu_dir)
    with torch.no_grad():
        assert torch.equal(full(_image())["refined_mask"], model(_image())["refined_mask"])
    # sources.transunet is used when no transunet_run is given
    rf2 = save_run(tmp_path / "p2b", partial, CONFIG, 0.5, {}, kind="refiner", sources={"transunet": str(tu_dir)})
    assert load_run(rf2).sources == {"transunet": str(tu_dir)}
    assert isinstance(build_model_from_run(rf2), type(model))


def test_load_state_dict_formats(tmp_path, model):
    state = model.transunet.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("plain.pt", "wrapped.pth"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save({"obj": NotWeights()}, tmp_path / "pickle.pt")
    with pytest.raises(RunDirError, match="pickle.pt.*weights_only"):  # weights_only refuses arbitrary objects
        load_state_dict(tmp_path / "pickle.pt")
    with pytest.raises(RunDirError, match="missing.safetensors"):
        load_state_dict(tmp_path / "missing.safetensors")


def test_bad_run_dirs_name_the_file(tmp_path, model):
    with pytest.raises(RunDirError, match="run directory not found"):
        load_run(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=r"empty/run\.json: missing"):
        load_run(empty)

    run_dir = save_run(tmp_path / "ok", model.transunet, {"transunet": CONFIG["transunet"]}, 0.5, {}, kind="transunet")
    record = json.loads((run_dir / "run.json").read_text())

    def write(**changes):
        bad = dict(record, **changes)
        (run_dir / "run.json").write_text(json.dumps(bad))

    write(format="other/9")
    with pytest.raises(RunDirError, match=r"ok/run\.json: format"):
        read_run_json(run_dir)
    write(threshold=1.5)
    with pytest.raises(RunDirError, match="threshold"):
        read_run_json(run_dir)
    write(kind="ultrarefiner")
    with pytest.raises(RunDirError, match=r"lacks section\(s\) \['refiner'\]"):
        read_run_json(run_dir)
    (run_dir / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        read_run_json(run_dir)

    write()
    data = bytearray((run_dir / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF  # tamper with the weights
    (run_dir / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=r"weights\.safetensors: sha256 .* does not match"):
        load_run(run_dir)
    os.remove(run_dir / "weights.safetensors")
    with pytest.raises(RunDirError, match=r"weights\.safetensors: missing"):
        load_run(run_dir)


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path, model):
    other = build_transunet(dict(CONFIG["transunet"], hidden_size=64))
    run_dir = save_run(tmp_path / "mismatch", other, {"transunet": CONFIG["transunet"]}, 0.5, {}, kind="transunet")
    with pytest.raises((RunDirError, RuntimeError), match="mismatch|size"):
        build_model_from_run(run_dir)
    partial = {"transunet.bogus": torch.zeros(1)}
    bad = save_run(tmp_path / "bogus", partial, CONFIG, 0.5, {}, kind="ultrarefiner")
    with pytest.raises(RunDirError, match="do not match the model"):
        build_model_from_run(bad)


def test_save_run_validates_and_resolves_default(tmp_path, model):
    with pytest.raises(ValueError, match="kind"):
        save_run(tmp_path / "x", model, CONFIG, 0.5, {}, kind="Not A Kind")
    other = save_run(tmp_path / "gen", {"w": torch.zeros(2)}, {"generator": {}}, 0.5, {}, kind="pix2pix")
    assert load_run(other).kind == "pix2pix"  # other model families share the format
    with pytest.raises(RunDirError, match="not a segmentation model"):
        build_model_from_run(other)
    with pytest.raises(ValueError, match="threshold"):
        save_run(tmp_path / "x", model, CONFIG, 1.0, {}, kind="ultrarefiner")
    with pytest.raises(ValueError, match="collides"):
        save_run(tmp_path / "x", model, CONFIG, 0.5, {}, kind="ultrarefiner", extra={"kind": 1})
    assert resolve_run_dir("default") == DEFAULT_RUN_DIR
    assert DEFAULT_RUN_DIR.parts[-2:] == ("checkpoints", "default")
    assert (DEFAULT_RUN_DIR.parent.parent / "weights" / "checkpoints.py").is_file()
    assert resolve_run_dir(tmp_path) == tmp_path


def test_a_saved_checkpoint_has_the_same_bytes_every_time(tmp_path):
    """safetensors writes its metadata in hash-map order, different from process to process and from one map to
    the next; save_safetensors pins the order, so a rerun of the recipe gives the committed file's sha256."""
    import json
    import struct

    import safetensors.torch

    from weights.checkpoints import file_sha256, save_safetensors

    tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(3)}
    metadata = {"kind": "ultrarefiner", "format": "pt", "dtype": "float32", "zeta": "1", "alpha": "2", "mid": "3"}
    hashes = {file_sha256(save_safetensors(tensors, tmp_path / f"w{i}.safetensors", metadata)) for i in range(20)}
    assert len(hashes) == 1
    blob = (tmp_path / "w0.safetensors").read_bytes()
    header = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])
    assert list(header["__metadata__"]) == list(metadata)
    assert torch.equal(safetensors.torch.load_file(tmp_path / "w0.safetensors")["b.weight"], tensors["b.weight"])
