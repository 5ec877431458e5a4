"""What a claimed job does: ``train`` (phases, held-out evaluation, ONNX export with parity, registration),
``evaluate`` and ``predict`` (a registered version over a dataset). Runs inside a worker; imports torch lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import stat
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.manifest import sha256_file
from medplatform.db import Dataset, Job
from medplatform.errors import IntegrityFailure, InvalidValue, NotFound
from medplatform.registry import run_prefix

if TYPE_CHECKING:
    from medplatform.context import Platform

log = logging.getLogger("medplatform.jobs")

SPLIT_VAL, SPLIT_TEST = 0.2, 0.2  # of the dataset's cases, at least one each (core.datasets.train_val_test_split)
MAX_ARCHIVE_MEMBERS = 100_000


@dataclass
class JobContext:
    """What a job run gets from its worker.

    ``report(progress)`` stores progress and raises when the job must stop (cancelled, worker stopping);
    ``workdir`` is an empty temporary directory removed after the job; ``device``: torch device string.
    """

    platform: Platform
    job: Job
    workdir: Path
    device: str
    report: Callable[[Mapping[str, Any]], None]


# -- data ---------------------------------------------------------------------------------------------------------


def fetch_dataset(ctx: JobContext, dataset_id: str | None = None, folder: str = "dataset") -> tuple[Dataset, Path]:
    """A dataset row (default: the job's) and its ZIP extracted under ``workdir/<folder>`` (members checked, no
    links)."""
    dataset_id = dataset_id or ctx.job.dataset_id
    with ctx.platform.sessions() as session:
        dataset = session.get(Dataset, dataset_id) if dataset_id else None
    if dataset is None or not dataset.blob_key:
        raise NotFound("dataset", dataset_id, "the job's dataset (or its archive) no longer exists")
    archive = ctx.platform.blobs.get_file(dataset.blob_key, ctx.workdir / f"{folder}.zip")
    root = ctx.workdir / folder
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise InvalidValue("dataset", dataset.id, f"archive holds {len(members)} entries")
        for member in members:
            parts = member.filename.split("/")
            if member.filename.startswith("/") or ".." in parts or "\\" in member.filename \
                    or stat.S_ISLNK(member.external_attr >> 16):
                raise InvalidValue("dataset", dataset.id, f"archive member {member.filename!r} is not a plain "
                                                          "relative path")
        zf.extractall(root)
    archive.unlink()
    return dataset, root


def split_dataset(root: Path, out: Path, seed: int) -> dict[str, Path]:
    """Copy the cases of ``root`` into ``out/{train,val,test}/{images,masks}`` by the seeded
    ``core.datasets.train_val_test_split`` (deterministic: same names and seed, same split)."""
    from core.datasets import SegmentationDataset, train_val_test_split

    dataset = SegmentationDataset(root)
    parts = dict(zip(("train", "val", "test"),
                     train_val_test_split(dataset.names, val=SPLIT_VAL, test=SPLIT_TEST, seed=seed), strict=True))
    folders = {}
    for part, names in parts.items():
        folders[part] = out / part
        for name in names:
            for relative, folder in zip(dataset.files(name), ("images", "masks"), strict=True):
                target = out / part / folder / Path(relative).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / relative, target)
    log.info("split %d cases: %s", len(dataset), ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    return folders


def fetch_run(ctx: JobContext, recipe: str) -> tuple[str, int, Path]:
    """The run directory of the registered version ``name:N`` from its blob mirror, every file's sha256 checked
    (evaluate/predict run the PyTorch weights the version's ONNX graphs passed parity against)."""
    name, _, number = recipe.partition(":")
    info = ctx.platform.registry.get_version(name, int(number))
    hashes = info.artifact_hashes
    run_dir = ctx.workdir / "run"
    prefix = run_prefix(name, hashes["weights_sha256"])
    for file, expected in hashes.get("run_files", {}).items():
        path = ctx.platform.blobs.get_file(prefix + file, run_dir / file)
        if sha256_file(path) != expected:
            raise IntegrityFailure(file, recipe, "mirrored run file does not match its recorded sha256")
    return name, int(number), run_dir


# -- train --------------------------------------------------------------------------------------------------------


def _phase_args(phase: str, argv: list[str]) -> argparse.Namespace:
    from training.phases import add_arguments

    parser = argparse.ArgumentParser(prog=f"job {phase}")
    add_arguments(parser, phase)
    args = parser.parse_args(argv)
    args.command = phase
    return args


def run_train(ctx: JobContext) -> dict[str, Any]:
    """Train the job's phases on the dataset's train split (validation on val), evaluate on test, export ONNX
    (parity-gated), register ``recipe`` version N. Returns ``{"model", "version", "metrics", "split"}``.

    A fine-tune (``init``: a registered ``name:N``) runs the e2e phase from that version's weights, with its
    run's preset unless one was given; ``replay_dataset`` adds that dataset's train split (same seeded split)
    to the training cases, so the model keeps seeing its original domain."""
    from core.datasets import SegmentationDataset
    from export.onnx_export import export_artifacts
    from training.evaluate import evaluate_run
    from training.phases import run as run_phase

    hp = dict(ctx.job.hyperparameters)
    seed = int(hp.get("seed", 0))
    dataset, root = fetch_dataset(ctx)
    folders = split_dataset(root, ctx.workdir / "splits", seed=seed)
    runs = ctx.workdir / "runs"
    extra = {"transunet": [], "refiner": ["--transunet", str(runs / "transunet")],
             "e2e": ["--init", str(runs / "transunet"), str(runs / "refiner")]}
    preset = hp.get("preset")
    if hp.get("init"):
        _, _, init_dir = fetch_run(ctx, hp["init"])
        extra["e2e"] = ["--init", str(init_dir)]
        preset = preset or _run_preset(init_dir)
        log.info("fine-tune from %s (preset %s)", hp["init"], preset)
    if hp.get("replay_dataset"):
        _, replay_root = fetch_dataset(ctx, hp["replay_dataset"], "replay")
        replay = split_dataset(replay_root, ctx.workdir / "replay_splits", seed=seed)
        added = _merge_cases(replay["train"], folders["train"], prefix="replay-")
        log.info("replay: %d cases of dataset %s added to the train split", added, hp["replay_dataset"])
    common = ["--data", str(folders["train"]), "--val-data", str(folders["val"]), "--config", preset or "default",
              "--no-progress", "--device", ctx.device, "--seed", str(seed)]
    for key, flag in (("epochs", "--epochs"), ("learning_rate", "--lr"), ("batch_size", "--batch-size")):
        if key in hp:
            common += [flag, str(hp[key])]
    phases: list[str] = list(hp["phases"])
    for phase in phases:
        ctx.report({"phase": phase, "phases": phases, "epoch": 0, "epochs": None})
        run_phase(_phase_args(phase, [*extra[phase], "--out", str(runs / phase), *common]))
    final = runs / phases[-1]

    ctx.report({"phase": "evaluate", "phases": phases})
    evaluation = evaluate_run(final, SegmentationDataset(folders["test"]), device=ctx.device)
    ctx.report({"phase": "export", "phases": phases})
    art_dir = ctx.workdir / "artifacts"
    export_artifacts(final, art_dir, log=log.info)  # raises ParityError (nothing written) on a parity failure
    ctx.report({"phase": "register", "phases": phases})  # the last point a cancel takes effect
    info = ctx.platform.registry.register(final, art_dir, name=ctx.job.recipe or "", evaluation=evaluation,
                                          hyperparameters=hp, dataset_id=dataset.id, dataset_sha256=dataset.sha256,
                                          job_id=ctx.job.id)
    split = {k: len(list((v / "images").iterdir())) for k, v in folders.items()}
    return {"model": info.name, "version": info.version, "metrics": info.metrics, "split": split}


def _run_preset(run_dir: Path) -> str:
    """The preset a run was trained with (``run.json`` ``training.preset``), ``default`` when it says none."""
    info = json.loads((run_dir / "run.json").read_text())
    preset = (info.get("training") or {}).get("preset")
    return preset if isinstance(preset, str) and preset else "default"


def _merge_cases(source: Path, target: Path, *, prefix: str) -> int:
    """Copy ``source/{images,masks}/*`` into ``target`` under ``prefix`` + name; returns the cases copied."""
    count = 0
    for folder in ("images", "masks"):
        for path in sorted((source / folder).iterdir()) if (source / folder).is_dir() else []:
            shutil.copyfile(path, target / folder / f"{prefix}{path.name}")
            count += folder == "images"
    return count


# -- evaluate / predict ---------------------------------------------------------------------------------------------


def run_evaluate(ctx: JobContext) -> dict[str, Any]:
    """Metrics of a registered version on the whole dataset: means in the result, per case in a blob."""
    from core.datasets import SegmentationDataset
    from training.evaluate import evaluate_run

    _, root = fetch_dataset(ctx)
    name, version, run_dir = fetch_run(ctx, ctx.job.recipe or "")
    ctx.report({"phase": "evaluate"})
    evaluation = evaluate_run(run_dir, SegmentationDataset(root), device=ctx.device)
    block = evaluation["refined"] or evaluation["coarse"]
    key = f"jobs/{ctx.job.id}/evaluation.json"
    ctx.platform.blobs.put_bytes(key, json.dumps(evaluation, indent=1).encode())
    return {"model": name, "version": version, "n_cases": evaluation["n_cases"], "metrics": block["mean"],
            "thresholds": evaluation["thresholds"], "evaluation": key}


def run_predict(ctx: JobContext) -> dict[str, Any]:
    """Masks of a registered version for every image (PNG 0/255, native size) in a ZIP blob, with per-case
    metrics against the dataset's masks; a DICOM image also gets ``masks/<name>.seg.dcm`` (see
    :func:`_dicom_seg`). Result ``dicom_seg``: ``{"written": n, "skipped": {name: reason}}``."""
    import numpy as np
    import torch

    from core.datasets import SegmentationDataset
    from core.imageio import encode_mask_png
    from core.metrics import METRIC_NAMES, SegmentationMetrics
    from training.phases import transunet_logits
    from weights.checkpoints import build_model_from_run, load_run

    _, root = fetch_dataset(ctx)
    name, version, run_dir = fetch_run(ctx, ctx.job.recipe or "")
    info = load_run(run_dir)
    model = build_model_from_run(info, device=ctx.device).eval()
    threshold = float(info.threshold)
    metrics = SegmentationMetrics(threshold=threshold)
    dataset = SegmentationDataset(root)
    out = ctx.workdir / "predictions.zip"
    segs_written, segs_skipped = 0, {}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf, torch.no_grad():
        for index, sample in enumerate(dataset):
            image = torch.from_numpy(np.asarray(sample.image, np.float32))[None, None].to(ctx.device)
            if info.kind == "transunet":
                prob = torch.sigmoid(transunet_logits(model, image))[0, 0]
            else:
                prob = model(image)["refined_mask"][0, 0]
            prob = prob.cpu().numpy()
            zf.writestr(f"masks/{sample.name}.png", encode_mask_png(prob > threshold))
            seg = _dicom_seg(root / dataset.files(sample.name)[0], prob > threshold, f"{name}:{version}")
            if isinstance(seg, bytes):
                zf.writestr(f"masks/{sample.name}.seg.dcm", seg)
                segs_written += 1
            elif seg is not None:
                segs_skipped[sample.name] = seg
            metrics.update(prob, np.asarray(sample.mask), names=[sample.name])
            if index % 16 == 15:
                ctx.report({"phase": "predict", "done": index + 1, "total": len(dataset)})
    report = metrics.aggregate()
    key = f"jobs/{ctx.job.id}/predictions.zip"
    ctx.platform.blobs.put_file(key, out)
    cases_key = f"jobs/{ctx.job.id}/per_case.json"
    ctx.platform.blobs.put_bytes(cases_key, json.dumps(report.cases, indent=1).encode())
    return {"model": name, "version": version, "n_cases": len(dataset), "threshold": threshold,
            "predictions": key, "per_case": cases_key, "metrics": {k: report.means[k] for k in METRIC_NAMES},
            "dicom_seg": {"written": segs_written, "skipped": segs_skipped}}


def _dicom_seg(image_path: Path, mask: Any, model_version: str) -> bytes | str | None:
    """The DICOM SEG of ``mask`` ((H, W) bool, the image's pixel frame) when ``image_path`` is DICOM (by
    content), anonymised as the service does by default; ``None`` for other formats; the reason (str) when
    the source cannot carry a SEG (no UIDs, unusable geometry): the PNG is still written, the job goes on."""
    import numpy as np

    from core.dicom_seg import build_dicom_seg
    from core.imageio import decode_image

    decoded = decode_image(image_path.read_bytes(), name=image_path.name)
    if decoded.format != "dicom" or decoded.source is None:
        return None
    try:
        return build_dicom_seg(decoded.source, np.asarray(mask, np.uint8), model_version=model_version,
                               anonymize=True)
    except ValueError as exc:
        log.warning("no DICOM SEG for %s: %s", image_path.name, exc)
        return str(exc)


RUNNERS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "train": run_train, "evaluate": run_evaluate, "predict": run_predict}
