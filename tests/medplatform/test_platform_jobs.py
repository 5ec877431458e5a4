"""Platform jobs (#17) with real worker processes on one SQLite file: a tiny train job to a registered version,
evaluate and predict with it, refused hyperparameters, cancelling queued and running jobs, a worker killed with
SIGKILL (its job failed by the reaper with the reason) and queued jobs surviving into the next worker."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplatform import jobs
from medplatform.db import ModelVersion
from medplatform.errors import Conflict, InvalidValue, NotFound
from medplatform.worker import start_local_workers, stop_local_workers
from tests.support.platform_jobs_fixtures import add_phantom_dataset, open_test_platform, platform_env, wait_for

REPO = Path(__file__).resolve().parents[2]
MODEL = "tinyseg"
TINY = {"preset": "tiny", "epochs": 2, "batch_size": 4, "learning_rate": 0.001}
LONG = {"preset": "tiny", "phases": ["transunet"], "epochs": 1000}  # runs until cancelled or killed


def _finished(platform, job_id):
    job = jobs.get_job(platform, job_id)
    return job if job.status in jobs.FINISHED else None


def _running_epoch(platform, job_id):
    job = jobs.get_job(platform, job_id)
    return job if job.status == "running" and (job.progress or {}).get("epoch", 0) >= 1 else None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    env = platform_env(root)
    platform = open_test_platform(env)
    dataset = add_phantom_dataset(platform, root / "phantoms")
    return {"root": root, "env": env, "platform": platform, "dataset": dataset}


@pytest.fixture(scope="module")
def trained(world):
    """A three-phase tiny train job run by a worker subprocess, then evaluate and predict jobs with its version."""
    platform, dataset = world["platform"], world["dataset"]
    job = jobs.submit_job(platform, "train", dataset.id, MODEL, TINY)
    workers = start_local_workers(1, env=world["env"], log_dir=world["root"])
    try:
        seen = []

        def done():
            current = jobs.get_job(platform, job.id)
            seen.append(dict(current.progress or {}))
            return current if current.status in jobs.FINISHED else None

        finished = wait_for(done, 300, "the train job to finish")
        evaluate = jobs.submit_job(platform, "evaluate", dataset.id, f"{MODEL}:1")
        predict = jobs.submit_job(platform, "predict", dataset.id, f"{MODEL}:1")
        evaluated = wait_for(lambda: _finished(platform, evaluate.id), 120, "the evaluate job")
        predicted = wait_for(lambda: _finished(platform, predict.id), 120, "the predict job")
    finally:
        stop_local_workers(workers)
    return {"train": finished, "seen": seen, "evaluate": evaluated, "predict": predicted}


def test_train_job_registers_a_version_with_metrics_and_dataset_hash(world, trained):
    platform, dataset, job = world["platform"], world["dataset"], trained["train"]
    assert job.status == "succeeded", (job.error, jobs.job_log(platform, job.id)[-3000:])
    assert job.result["model"] == MODEL and job.result["version"] == 1
    assert job.result["split"] == {"train": 4, "val": 2, "test": 2}
    assert job.started_at <= job.finished_at and job.worker_pid and job.worker_id.endswith(f":{job.worker_pid}")
    info = platform.registry.get_version(MODEL, 1)
    assert info.job_id == job.id and info.dataset_id == dataset.id and info.dataset_sha256 == dataset.sha256
    assert info.hyperparameters == {**TINY, "phases": ["transunet", "refiner", "e2e"], "seed": 0}
    metrics = info.metrics
    assert metrics["source"] == "evaluation" and metrics["n_cases"] == 2  # the held-out test split
    for name in ("dice", "iou", "precision", "recall"):
        assert 0.0 <= metrics[name] <= 1.0
    assert math.isfinite(metrics["hd95"]) and 0.0 < metrics["threshold"] < 1.0
    art = platform.registry.materialize(MODEL, 1)  # hashes re-checked; the ONNX graphs passed the parity gate
    manifest = json.loads((art / "manifest.json").read_text())
    assert {"transunet", "image_encoder", "mask_decoder"} <= set(manifest["graphs"])


def test_train_job_reported_progress_and_kept_its_log(world, trained):
    platform, job = world["platform"], trained["train"]
    final = job.progress
    assert final["epoch"] == final["epochs"] == 2 and final["phases"] == ["transunet", "refiner", "e2e"]
    assert math.isfinite(final["train_loss"]) and 0.0 <= final["val_dice"] <= 1.0
    assert any(p.get("phase") in ("transunet", "refiner", "e2e") and p.get("epoch") for p in trained["seen"])
    log = jobs.job_log(platform, job.id)
    for phase in ("transunet", "refiner", "e2e"):
        assert f"{phase} epoch 2/2" in log
    assert "mask dice" in log and log.rstrip().endswith(f"job {job.id} ends succeeded")


def test_evaluate_job_stores_metrics_of_the_version(world, trained):
    job = trained["evaluate"]
    assert job.status == "succeeded", job.error
    assert job.recipe == f"{MODEL}:1" and job.result["n_cases"] == 8
    assert 0.0 <= job.result["metrics"]["dice"] <= 1.0
    per_case = json.loads(world["platform"].blobs.get_bytes(job.result["evaluation"]))
    assert len(per_case["refined"]["per_case"]) == 8


def test_predict_job_stores_masks_and_per_case_metrics(world, trained):
    platform, job = world["platform"], trained["predict"]
    assert job.status == "succeeded", job.error
    cases = {c["name"]: c for c in json.loads(platform.blobs.get_bytes(job.result["per_case"]))}
    with zipfile.ZipFile(io.BytesIO(platform.blobs.get_bytes(job.result["predictions"]))) as zf:
        names = sorted(zf.namelist())
        assert names == [f"masks/{i:04d}.png" for i in range(8)]
        for name in names:
            mask = np.asarray(Image.open(io.BytesIO(zf.read(name))))
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
            case = name.removeprefix("masks/").removesuffix(".png")
            gt = np.asarray(Image.open(world["root"] / "phantoms" / "masks" / f"{case}.png")) > 0
            pred = mask > 0
            # The stored per-case Dice is the Dice of the stored mask (both empty: 1, as core.metrics).
            total = pred.sum() + gt.sum()
            dice = 1.0 if total == 0 else 2.0 * (pred & gt).sum() / total
            assert cases[case]["dice"] == pytest.approx(dice, abs=1e-6)


@pytest.mark.parametrize(("kind", "hyperparameters", "field"), [
    ("train", {"epochs": 0}, "hyperparameters.epochs"),
    ("train", {"epochs": "3"}, "hyperparameters.epochs"),
    ("train", {"epochs": True}, "hyperparameters.epochs"),
    ("train", {"learning_rate": 2.0}, "hyperparameters.learning_rate"),
    ("train", {"learning_rate": float("nan")}, "hyperparameters.learning_rate"),
    ("train", {"batch_size": 0}, "hyperparameters.batch_size"),
    ("train", {"preset": "huge"}, "hyperparameters.preset"),
    ("train", {"phases": ["e2e"]}, "hyperparameters.phases"),
    ("train", {"momentum": 0.9}, "hyperparameters.momentum"),
    ("evaluate", {"epochs": 1}, "hyperparameters.epochs"),
    ("cook", {}, "kind"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(world, kind, hyperparameters, field):
    before = len(jobs.list_jobs(world["platform"], limit=500))
    with pytest.raises(InvalidValue) as caught:
        jobs.submit_job(world["platform"], kind, world["dataset"].id, f"{MODEL}:1", hyperparameters)
    assert caught.value.field == field
    assert len(jobs.list_jobs(world["platform"], limit=500)) == before  # nothing was queued


def test_missing_dataset_and_model_are_not_found(world):
    with pytest.raises(NotFound) as caught:
        jobs.submit_job(world["platform"], "train", "0" * 32, MODEL, {"preset": "tiny"})
    assert caught.value.field == "dataset"
    with pytest.raises(NotFound) as caught:
        jobs.submit_job(world["platform"], "predict", world["dataset"].id, "nosuchmodel:7")
    assert caught.value.field == "recipe"


def test_cancel_a_queued_job(world):
    platform = world["platform"]
    job = jobs.submit_job(platform, "train", world["dataset"].id, MODEL, {"preset": "tiny"})
    cancelled = jobs.cancel_job(platform, job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert jobs.claim_next(platform, "test-worker", os.getpid()) is None  # no worker will ever run it
    with pytest.raises(Conflict) as caught:
        jobs.cancel_job(platform, job.id)
    assert caught.value.field == "job"


def test_cancel_a_running_job(world, trained):
    platform = world["platform"]
    job = jobs.submit_job(platform, "train", world["dataset"].id, MODEL, LONG)
    workers = start_local_workers(1, env=world["env"], log_dir=world["root"])
    try:
        wait_for(lambda: _running_epoch(platform, job.id), 120, "the long job to finish an epoch")
        assert jobs.reap_stale(platform, 60.0) == []  # a live worker's job is not stale
        jobs.cancel_job(platform, job.id)
        ended = wait_for(lambda: _finished(platform, job.id), 60, "the cancelled job to stop")
        assert workers[0].poll() is None  # the worker lives on for the next job
    finally:
        stop_local_workers(workers)
    assert ended.status == "cancelled" and ended.error == "cancelled by request"
    assert ended.progress["epoch"] < 1000 and ended.result is None
    with platform.sessions() as session:  # nothing registered for the cancelled job
        assert session.query(ModelVersion).filter_by(job_id=job.id).count() == 0
    assert jobs.job_log(platform, job.id).rstrip().endswith(f"job {job.id} ends cancelled")


def test_killed_worker_is_reaped_and_queued_jobs_survive_into_the_next_worker(world, trained):
    platform = world["platform"]
    long_job = jobs.submit_job(platform, "train", world["dataset"].id, MODEL, LONG)
    queued = jobs.submit_job(platform, "evaluate", world["dataset"].id, f"{MODEL}:1")
    [worker] = start_local_workers(1, env=world["env"], log_dir=world["root"])
    try:
        wait_for(lambda: _running_epoch(platform, long_job.id), 120, "the long job to finish an epoch")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    assert jobs.get_job(platform, queued.id).status == "queued"
    assert jobs.get_job(platform, long_job.id).status == "running"  # nobody has noticed yet
    # The next worker (another process: a restart) reaps the dead one's job at start, then runs the queue.
    env = dict(world["env"], MEDREFINE_JOB_STALE_S="3")
    [restarted] = start_local_workers(1, env=env, log_dir=world["root"])
    try:
        failed = wait_for(lambda: _finished(platform, long_job.id), 60, "the reaper to fail the dead job")
        ran = wait_for(lambda: _finished(platform, queued.id), 120, "the queued job to run after the restart")
    finally:
        stop_local_workers([restarted])
    assert failed.status == "failed"
    assert failed.worker_pid == worker.pid
    assert failed.error == (f"worker {failed.worker_id} (pid {worker.pid}) stopped heartbeating at "
                            f"{failed.heartbeat_at.isoformat()}")
    assert ran.status == "succeeded" and ran.worker_pid == restarted.pid
    assert "transunet epoch 1/1000" in jobs.job_log(platform, long_job.id)  # the log up to its last beat


def test_worker_cli_runs_one_job_and_lists_jobs(world, trained):
    platform = world["platform"]
    job = jobs.submit_job(platform, "evaluate", world["dataset"].id, f"{MODEL}:1")
    cmd = [sys.executable, "-m", "medplatform"]
    subprocess.run([*cmd, "worker", "--max-jobs", "1"], env=world["env"], check=True, timeout=180,
                   capture_output=True, cwd=REPO)
    assert jobs.get_job(platform, job.id).status == "succeeded"
    listing = subprocess.run([*cmd, "jobs", "--status", "succeeded"], env=world["env"], check=True, timeout=60,
                             capture_output=True, text=True, cwd=REPO)
    assert job.id in {j["id"] for j in json.loads(listing.stdout)}


def test_worker_concurrency_runs_jobs_side_by_side(world, trained):
    platform = world["platform"]
    first, second = (jobs.submit_job(platform, "train", world["dataset"].id, MODEL, LONG) for _ in range(2))
    parent = subprocess.Popen([sys.executable, "-m", "medplatform", "worker", "--concurrency", "2"],
                              env=world["env"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        a = wait_for(lambda: _running_epoch(platform, first.id), 120, "the first job to run")
        b = wait_for(lambda: _running_epoch(platform, second.id), 120, "the second job to run beside it")
        assert a.worker_pid != b.worker_pid and parent.pid not in (a.worker_pid, b.worker_pid)
        for job in (first, second):
            jobs.cancel_job(platform, job.id)
        for job in (first, second):
            assert wait_for(lambda j=job: _finished(platform, j.id), 60, "a cancel").status == "cancelled"
    finally:
        parent.send_signal(signal.SIGTERM)  # the parent stops its worker processes, then exits
        code = parent.wait(60)
    assert code == 0


def test_a_failed_job_registers_nothing_and_keeps_its_log(world, trained):
    from medplatform.worker import WorkerSettings, serve

    platform = world["platform"]
    small = add_phantom_dataset(platform, world["root"] / "two-cases", count=2, seed=11)
    job = jobs.submit_job(platform, "train", small.id, "failing", {"preset": "tiny"})
    assert serve(platform, WorkerSettings(heartbeat_s=1, poll_s=0.1, device="cpu"), max_jobs=1) == 1
    failed = jobs.get_job(platform, job.id)
    assert failed.status == "failed" and "too few" in failed.error and failed.finished_at is not None
    log = jobs.job_log(platform, job.id)
    assert "Traceback" in log and "too few" in log and log.rstrip().endswith(f"job {job.id} ends failed")
    assert [m.name for m in platform.registry.list_models()] == [MODEL]  # nothing registered as "failing"
