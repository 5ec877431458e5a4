"""The shared trainer and the three phases, run through the CLI on a tiny phantom set."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.phantoms import write_dataset
from training.__main__ import main
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks
from weights.checkpoints import RUN_FORMAT, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset("ultrasound", 12, root / "train", 7, size=64)
    write_dataset("ultrasound", 4, root / "val", 8, size=64)
    return {"train": root / "train", "val": root / "val"}


def _common(data: dict[str, Path]) -> list[str]:
    return ["--data", str(data["train"]), "--val-data", str(data["val"]), "--config", "tiny", "--no-progress",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    p = {name: out / name for name in ("transunet", "refiner", "e2e")}
    common = _common(data)
    # 12 training cases at batch 4 = 3 steps per epoch.
    assert main(["transunet", "--out", str(p["transunet"]), "--epochs", "2", "--max-steps", "5", *common]) == 0
    assert main(["refiner", "--out", str(p["refiner"]), "--transunet", str(p["transunet"]), "--real-ratio", "0.5",
                 "--max-steps", "3", *common]) == 0
    assert main(["e2e", "--out", str(p["e2e"]), "--init", str(p["transunet"]), str(p["refiner"]), "--epochs", "2",
                 "--freeze-transunet-epochs", "1", "--transunet-grad-scale", "0.05", *common]) == 0
    return p


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("phase", "kind", "epochs"), [("transunet", "transunet", 2), ("refiner", "refiner", 1),
                                                        ("e2e", "ultrarefiner", 2)])
def test_run_directories(runs, phase, kind, epochs):
    run_dir = runs[phase]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["format"] == RUN_FORMAT and record["kind"] == kind and record["phase"] == phase
    assert 0.0 < record["threshold"] < 1.0 and record["seed"] == 0
    assert len(record["data_fingerprint"].split("+")[0]) == 64
    assert record["split"]["n_train"] == 12 and record["split"]["n_val"] == 4
    metrics = record["metrics"]
    assert 0.0 <= metrics["val_dice"] <= 1.0
    sweep_key = "threshold_sweep_coarse" if kind == "transunet" else "threshold_sweep_refined"
    sweep = metrics[sweep_key]
    assert len(sweep) == 19 and all(0.0 <= v <= 1.0 for v in sweep.values())
    assert sweep[f"{record['threshold']:g}"] == max(sweep.values())  # the stored threshold is the sweep's best
    assert record["thresholds"]["coarse"] > 0

    state = load_file(str(run_dir / "weights.safetensors"))
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert load_run(run_dir).weights_sha256 == record["weights_sha256"]
    rows = _rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert all(math.isfinite(float(r["train_loss"])) and r["val_dice"] for r in rows)
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_refiner_run_holds_the_refiner_half(runs):
    info = load_run(runs["refiner"])
    assert info.state_dict and all(k.startswith(("refiner.", "gate.")) for k in info.state_dict)
    assert info.sources["transunet"] == str(runs["transunet"])
    training = info.raw["training"]
    assert training["coarse_source"] == "transunet"
    counts = training["error_type_counts"]
    assert sum(counts.values()) == 3 * 4  # every training sample got a coarse mask
    assert set(counts) - {"real"}, "the augmentor supplied none of the coarse masks"
    assert info.config["transunet"] == load_run(runs["transunet"]).config["transunet"]
    tuning = training["gate_tuning"]  # the uncertainty gate is calibrated on validation like the threshold
    assert len(tuning["val_dice"]) == 36 and info.config["gate"] == tuning["chosen"]
    assert max(tuning["val_dice"].values()) >= tuning["val_dice"]["gamma=1,gate_min=0,gate_max=0.8"]


def test_e2e_run_records_its_protections(runs):
    info = load_run(runs["e2e"])
    assert info.config["ultrarefiner"]["prompt_grad_scale"] == 0.05
    rows = _rows(runs["e2e"])
    assert rows[0]["anchor_l2"] == ""  # frozen epoch: no anchor term
    assert float(rows[1]["anchor_l2"]) >= 0.0
    assert all(r["baseline_coarse_dice"] and r["coarse_degraded"] in ("0", "1") for r in rows)
    assert info.metrics["baseline_coarse_dice"] == pytest.approx(float(rows[0]["baseline_coarse_dice"]))
    # The TransUNet is frozen in epoch 1, so its validation Dice cannot move there.
    assert float(rows[0]["val_coarse_dice"]) == pytest.approx(float(rows[0]["baseline_coarse_dice"]))


def _transunet_distance(run_dir: Path, reference: Path) -> float:
    a, b = load_run(run_dir).state_dict, load_run(reference).state_dict
    return math.sqrt(sum(float(((a["transunet." + k] - v) ** 2).sum()) for k, v in b.items()))


def test_e2e_freeze_and_anchor_take_effect(runs, data, tmp_path):
    base = ["e2e", "--init", str(runs["transunet"]), str(runs["refiner"]), "--epochs", "1", "--transunet-lr", "1e-2",
            "--transunet-grad-scale", "1.0", *_common(data)]
    assert main([*base, "--out", str(tmp_path / "frozen"), "--freeze-transunet-epochs", "1"]) == 0
    assert _transunet_distance(tmp_path / "frozen", runs["transunet"]) == 0.0
    frozen = load_run(tmp_path / "frozen").state_dict
    refiner_before = load_run(runs["refiner"]).state_dict
    assert any(not torch.equal(frozen[k], v) for k, v in refiner_before.items())  # the refiner did train

    assert main([*base, "--out", str(tmp_path / "free"), "--freeze-transunet-epochs", "0",
                 "--transunet-weight-reg", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "anchored"), "--freeze-transunet-epochs", "0",
                 "--transunet-weight-reg", "1000"]) == 0
    free = _transunet_distance(tmp_path / "free", runs["transunet"])
    anchored = _transunet_distance(tmp_path / "anchored", runs["transunet"])
    assert free > 0.0 and anchored < free
    assert float(_rows(tmp_path / "anchored")[0]["anchor_l2"]) > 0.0


def test_e2e_warns_when_the_coarse_model_degrades(runs, caplog):
    from training.phases import E2EHooks, E2EPhase, _init_e2e_model

    model, _ = _init_e2e_model([str(runs["e2e"])])
    hooks = E2EHooks(E2EPhase(), "cpu", 0, model)
    hooks.baseline_coarse_dice = 0.8
    row = {"val_coarse_dice": 0.7}
    with caplog.at_level(logging.WARNING, logger="training.phases"):
        hooks.on_epoch_end(0, model, row)
    assert row["coarse_degraded"] == 1 and "fell below its phase-1 baseline" in caplog.text
    row = {"val_coarse_dice": 0.799}
    hooks.on_epoch_end(1, model, row)
    assert row["coarse_degraded"] == 0


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def test_evaluate_writes_the_json(runs, data, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(data["val"]), "--model", str(runs["e2e"]), "--json", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    for part in ("coarse", "refined"):
        assert set(result[part]["mean"]) == {"dice", "iou", "precision", "recall", "hd95"}
        assert len(result[part]["per_case"]) == 4
    assert result["n_cases"] == 4 and _finite(result)
    hard = result["hard_cases"]
    assert hard["count"] == sum(c["dice"] < 0.8 for c in result["coarse"]["per_case"])
    assert set(result["refined_vs_coarse"]) == {"improved", "worsened", "unchanged", "mean_dice_delta"}
    assert result["thresholds"]["refined"] == load_run(runs["e2e"]).threshold

    out_tu = tmp_path / "eval_tu.json"
    assert main(["evaluate", "--data", str(data["val"]), "--model", str(runs["transunet"]), "--json", str(out_tu),
                 "--device", "cpu"]) == 0
    tu = json.loads(out_tu.read_text())
    assert tu["refined"] is None and tu["coarse"]["mean"]["dice"] >= 0.0


def test_phantom_data_when_no_data_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDREFINE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "p1"
    assert main(["transunet", "--out", str(out), "--config", "tiny", "--phantom-count", "10", "--max-steps", "1",
                 "--no-progress", "--device", "cpu"]) == 0
    split = load_run(out).raw["split"]
    assert split["mode"] == "kfold" and split["n_train"] == 8 and split["n_val"] == 2
    assert (tmp_path / "cache" / "phantoms" / "ultrasound_n10_seed0_64px" / "images").is_dir()


# ---- the loop itself ------------------------------------------------------------------------------------------


class _ScriptedHooks(TrainHooks):
    """Least squares on a linear model; validation replays a scripted metric sequence."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.snapshots = []

    def param_groups(self, model):
        return [{"name": "weight", "params": [model.weight], "lr": 0.1},
                {"name": "bias", "params": [model.bias], "lr": 0.0}]

    def training_step(self, model, batch):
        x, y = batch
        return StepOutput(((model(x) - y) ** 2).mean() * 1e3)  # large gradients: clipping matters

    def validate(self, model, loader):
        return {"val_dice": self.scores.pop(0)}

    def on_epoch_end(self, epoch, model, row):
        self.snapshots.append({k: v.clone() for k, v in model.state_dict().items()})


def test_loop_keeps_the_best_epoch_and_separate_lrs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    bias0 = model.bias.detach().clone()
    x = torch.randn(16, 3)
    batches = [(x[i : i + 4], x[i : i + 4].sum(1, keepdim=True)) for i in range(0, 16, 4)]
    hooks = _ScriptedHooks([0.5, 0.9, 0.7])
    result = Trainer(LoopConfig(epochs=3, grad_clip=0.5, progress=False)).fit(model, hooks, batches, batches, tmp_path)
    assert result.best_epoch == 2 and result.best_metrics == {"val_dice": 0.9} and result.steps == 12
    assert torch.equal(model.weight, hooks.snapshots[1]["weight"])  # best epoch restored
    assert not torch.equal(hooks.snapshots[2]["weight"], hooks.snapshots[1]["weight"])
    assert torch.equal(model.bias, bias0)  # lr 0 group untouched
    rows = _rows(tmp_path)
    assert len(rows) == 3 and {"lr_weight", "lr_bias", "grad_norm", "train_loss"} <= set(rows[0])
    assert float(rows[0]["lr_weight"]) > float(rows[2]["lr_weight"]) > 0  # cosine decay
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC

    capped = Trainer(LoopConfig(epochs=3, max_steps=5, progress=False)).fit(
        torch.nn.Linear(3, 1), _ScriptedHooks([0.1, 0.2]), batches, batches, tmp_path / "capped")
    assert capped.steps == 5 and len(capped.history) == 2


def test_refiner_loads_a_sam_checkpoint_and_freezes_its_encoder(data, tmp_path):
    from models.build import build_sam
    from training.phases import RUN_PRESETS

    torch.manual_seed(1)
    sam_state = build_sam(RUN_PRESETS["tiny"].model["refiner"]).state_dict()
    torch.save(sam_state, tmp_path / "sam.pth")
    out = tmp_path / "p2"
    assert main(["refiner", "--out", str(out), "--sam-checkpoint", str(tmp_path / "sam.pth"), "--max-steps", "2",
                 *_common(data)]) == 0
    info = load_run(out)
    assert info.raw["training"]["settings"]["freeze_image_encoder"] is True
    assert info.raw["training"]["coarse_source"] == "augmentor"
    assert info.sources["sam_checkpoint"] == str(tmp_path / "sam.pth")
    encoder = {k: v for k, v in sam_state.items() if k.startswith("image_encoder.")}
    decoder = {k: v for k, v in sam_state.items() if k.startswith("mask_decoder.")}
    assert all(torch.equal(info.state_dict["refiner." + k], v) for k, v in encoder.items())  # frozen
    assert any(not torch.equal(info.state_dict["refiner." + k], v) for k, v in decoder.items())  # trained


def test_default_models_recipe_smoke(tmp_path):
    out, work = tmp_path / "default", tmp_path / "work"
    argv = ["default-models", "--out", str(out), "--work", str(work), "--config", "tiny", "--size", "64",
            "--n-train", "8", "--n-val", "4", "--n-test", "4", "--n-calib", "6", "--max-steps", "1",
            "--transunet-epochs", "1",
            "--refiner-epochs", "1", "--e2e-epochs", "1", "--device", "cpu"]
    assert main(argv) == 0
    info = load_run(out)
    assert info.kind == "ultrarefiner" and info.phase == "e2e"
    assert (out / "weights.safetensors").stat().st_size < 25 * 2**20
    result = json.loads((out / "eval_test.json").read_text())
    assert result["n_cases"] == 4 and result["refined"] is not None and _finite(result)
    recipe = json.loads((out / "recipe.json").read_text())
    assert set(recipe["seconds"]) == {"data", "transunet", "refiner", "e2e", "calibrate", "evaluate", "total"}
    assert recipe["seconds"]["total"] == pytest.approx(sum(v for k, v in recipe["seconds"].items() if k != "total"),
                                                       abs=0.5)
    # needs_review / no-finding thresholds come from the calibration split, recorded in the served run.json
    assert info.raw["calibration"]["cases"] == 6 and info.raw["review"]["answers"] == "automatic + box + click"
    assert 0.0 <= info.raw["no_finding"]["min_area_fraction"] <= 0.016
    assert recipe["test"]["refined_dice"] == result["refined"]["mean"]["dice"]
    for name in ("run.json", "recipe.json"):
        assert str(work) not in (out / name).read_text()  # no temporary paths in the committed files
    assert not work.exists()


# ---- early stopping and ReduceLROnPlateau (off by default) ----------------------------------------------------


def _linear_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    return [(x[i : i + 4], x[i : i + 4].sum(1, keepdim=True)) for i in range(0, 16, 4)]


def test_early_stopping_stops_after_patience_epochs_without_a_min_delta_gain(tmp_path):
    batches = _linear_batches()
    scores = [0.5, 0.6, 0.605, 0.59, 0.61, 0.9]  # epochs 3 and 4 gain < min_delta over 0.6
    config = LoopConfig(epochs=6, early_stop_patience=2, min_delta=0.01, progress=False)
    result = Trainer(config).fit(torch.nn.Linear(3, 1), _ScriptedHooks(scores), batches, batches, tmp_path / "es")
    assert result.early_stopped and len(result.history) == 4 and result.steps == 16
    assert len(_rows(tmp_path / "es")) == 4
    assert result.best_epoch == 3 and result.best_metrics == {"val_dice": 0.605}  # best weights: plain max

    default = Trainer(LoopConfig(epochs=6, progress=False)).fit(
        torch.nn.Linear(3, 1), _ScriptedHooks(scores), batches, batches, tmp_path / "off")
    assert not default.early_stopped and len(default.history) == 6 and default.best_epoch == 6
    # Patience running out on the last epoch is not an early stop.
    last = Trainer(LoopConfig(epochs=4, early_stop_patience=2, min_delta=0.01, progress=False)).fit(
        torch.nn.Linear(3, 1), _ScriptedHooks(scores), batches, batches, tmp_path / "last")
    assert not last.early_stopped and len(last.history) == 4


def test_plateau_reduces_the_lr_as_torch_reduce_lr_on_plateau(tmp_path):
    batches = _linear_batches()
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7]
    config = LoopConfig(epochs=10, scheduler="constant", plateau_factor=0.5, plateau_patience=2, progress=False)
    result = Trainer(config).fit(torch.nn.Linear(3, 1), _ScriptedHooks(scores), batches, batches, tmp_path)
    lrs = [row["lr_weight"] for row in result.history]

    # The reference: torch's scheduler over the same scores (threshold 0 = any gain counts).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2,
                                                           threshold=0.0, threshold_mode="abs")
    expected = []
    for score in scores:
        expected.append(optimizer.param_groups[0]["lr"])
        reference.step(score)
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs == pytest.approx([0.1] * 5 + [0.05] * 4 + [0.025], rel=1e-12)  # 3 flat epochs, then halved
    assert all(row["lr_bias"] == 0.0 for row in result.history)
    assert not result.early_stopped and len(result.history) == 10

    off = Trainer(LoopConfig(epochs=10, scheduler="constant", progress=False)).fit(
        torch.nn.Linear(3, 1), _ScriptedHooks(scores), batches, batches, tmp_path / "off")
    assert [row["lr_weight"] for row in off.history] == [0.1] * 10


def test_loop_config_rejects_bad_stopping_options():
    with pytest.raises(ValueError, match="early_stop_patience = 0"):
        LoopConfig(early_stop_patience=0)
    with pytest.raises(ValueError, match="plateau_factor = 1.5"):
        LoopConfig(plateau_factor=1.5)
    with pytest.raises(ValueError, match="min_delta = -0.1"):
        LoopConfig(min_delta=-0.1)


def test_transunet_cli_early_stops(data, tmp_path):
    out = tmp_path / "p1"
    # No val Dice gain can exceed 1.0, so the second epoch is already one without improvement.
    assert main(["transunet", "--out", str(out), "--epochs", "4", "--early-stop-patience", "1",
                 "--min-delta", "1.0", *_common(data)]) == 0
    assert len(_rows(out)) == 2
    record = json.loads((out / "run.json").read_text())
    assert record["training"]["early_stopped"] is True and record["training"]["best_epoch"] in (1, 2)
