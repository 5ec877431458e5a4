"""``default-models --e2e-epochs 0``: phases 1 + 2 packaged as the final model, with CPU time and load recorded."""

from __future__ import annotations

import json

import torch

from training.__main__ import main
from weights.checkpoints import load_run


def test_zero_e2e_epochs_packages_phase_1_and_2_unchanged_with_cpu_time_and_load(tmp_path):
    out, work = tmp_path / "default", tmp_path / "work"
    argv = ["default-models", "--out", str(out), "--work", str(work), "--config", "tiny", "--size", "64",
            "--n-train", "8", "--n-val", "4", "--n-test", "4", "--n-calib", "6", "--max-steps", "1",
            "--transunet-epochs", "1", "--refiner-epochs", "1", "--e2e-epochs", "0", "--device", "cpu",
            "--threads", "1", "--keep-work"]
    assert main(argv) == 0
    info = load_run(out)
    assert info.kind == "ultrarefiner" and info.phase == "refiner"
    transunet, refiner = load_run(work / "transunet"), load_run(work / "refiner")
    # The served weights are exactly the phase-1 TransUNet and the phase-2 refiner and gate.
    for key, value in transunet.state_dict.items():
        assert torch.equal(info.state_dict["transunet." + key], value), key
    for key, value in refiner.state_dict.items():
        assert torch.equal(info.state_dict[key], value), key
    assert set(info.state_dict) == {"transunet." + k for k in transunet.state_dict} | set(refiner.state_dict)
    # Phase 2's validation choices travel with it; calibrate then replaced review / no finding.
    assert info.threshold == refiner.threshold
    assert info.raw["thresholds"] == refiner.raw["thresholds"]
    assert info.raw["calibration"]["cases"] == 6
    recipe = json.loads((out / "recipe.json").read_text())
    assert "e2e" not in recipe["commands"] and "e2e" not in recipe["phase_val_metrics"]
    steps = {"data", "transunet", "refiner", "e2e", "calibrate", "evaluate", "total"}
    assert set(recipe["seconds"]) == steps and set(recipe["cpu_seconds"]) == steps
    assert all(v >= 0 for v in recipe["cpu_seconds"].values())
    assert recipe["cpu_seconds"]["total"] <= recipe["seconds"]["total"] + 1.0  # one thread: CPU <= wall
    assert all(len(recipe["loadavg_1_5_15min"][k]) == 3 for k in ("start", "transunet", "refiner", "end"))
    # --reuse keeps phases made by the same command, with their recorded CPU time.
    recorded = json.loads((work / "refiner" / "command.json").read_text())
    assert abs(recorded["cpu_seconds"] - recipe["cpu_seconds"]["refiner"]) <= 0.05  # recipe.json rounds to 0.1 s
