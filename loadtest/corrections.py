"""The corrections loop measured end to end through the service API: simulated corrections of a shifted
phantom domain, fine-tuned into new versions whose Dice is measured (``--help`` for the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from core.imageio import encode_mask_png, encode_png
from loadtest.annotator import AnnotatorConfig, Correction, correct, decode_mask, dice

_HELP = """The corrections loop measured end to end through the service API: a simulated annotator corrects N images of
a shifted phantom domain, its corrections are saved (/feedback/segmentation), snapshot and fine-tuned (a train job
with ``init``), and each new version's Dice on a fixed test split of that domain is measured.

    python -m loadtest.corrections [--domain ood+shape] [--steps 20,50,100] [--n-test 40] [--epochs 10]
                                   [--out loadtest/results/X.json]

Starts its own server (artifacts/default as default v1, one job worker, one thread each, ``nice -n 10``) over a
temporary data directory, and stops it at the end.
"""  # the --help text

REPO_ROOT = Path(__file__).resolve().parent.parent
SEEDS = {"pool": 110_000, "test": 120_000, "in_domain_test": 130_000, "replay": 140_000}  # not GenSeg's 50k-90k
JOB_TIMEOUT_S = 3600.0


DOMAINS = ("in", "ood", "shape", "ood+shape")


def phantom_set(n: int, seed: int, size: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, S, S) uint8, masks (N, S, S) {0, 1})`` of GenSeg's phantom domains: ``in``; ``ood`` =
    forced posterior shadowing plus a scanner shift (speckle, contrast, gamma, gain; training.generators);
    ``shape`` = angular lesions (training.genseg's second shift); ``ood+shape`` = both shifts at once."""
    from core.phantoms import breast_ultrasound, sample_seed
    from training.generators import scanner_shift

    if domain not in DOMAINS:
        raise ValueError(f"domain = {domain!r}; expected one of {DOMAINS}")
    images, masks = [], []
    for i in range(n):
        own = sample_seed(seed, i)
        shifted = domain in ("ood", "ood+shape")
        image, mask = breast_ultrasound(own, size, shadow=True if shifted else None,
                                        margin="angular" if domain in ("shape", "ood+shape") else None)
        if shifted:
            image = np.round(scanner_shift(image.astype(np.float32) / 255.0, own) * 255.0).astype(np.uint8)
        images.append(image)
        masks.append(mask.astype(np.uint8))
    return np.stack(images), np.stack(masks)


class Server:
    """``python -m service`` on a free loopback port over ``artifacts``, with an admin key and one job worker."""

    def __init__(self, artifacts: Path, work: Path, *, threads: int = 1) -> None:
        from loadtest.system import free_port

        self.admin_key = secrets.token_hex(16)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDREFINE_")}
        env.update({"MEDREFINE_DATA_DIR": str(work / "var"), "BENTOML_HOME": str(work / "bentoml"),
                    "MEDREFINE_CACHE_DIR": str(work / "cache"), "MEDREFINE_ADMIN_KEY": self.admin_key,
                    "MEDREFINE_PLATFORM_WORKERS": "1", "MEDREFINE_JOB_DEVICE": "cpu",
                    "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "MEDREFINE_INTRA_OP_THREADS": str(threads), "BENTOML_DO_NOT_TRACK": "True",
                    "PYTHONUNBUFFERED": "1"})
        self.log_path = work / "server.log"
        grpc_port = free_port()
        command = ["nice", "-n", "10", sys.executable, "-m", "service", "--host", "127.0.0.1", "--port",
                   str(self.port), "--grpc-port", str(grpc_port), "--artifacts", str(artifacts),
                   "--backend", "onnxruntime"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and its job worker
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def measure(client: httpx.Client, model: str, test: tuple[np.ndarray, np.ndarray],
            in_domain: tuple[np.ndarray, np.ndarray], config: AnnotatorConfig) -> dict[str, Any]:
    """A version on the fixed test splits: automatic Dice (shifted and original domain), and the prompts the
    annotator needs per test image (nothing saved)."""
    def auto_dice(images: np.ndarray, masks: np.ndarray) -> list[float]:
        out = []
        for image, truth in zip(images, masks, strict=True):
            response = client.post("/segment", data={"model": model, "outputs": "mask"},
                                   files={"file": ("i.png", encode_png(image), "image/png")})
            response.raise_for_status()
            out.append(dice(decode_mask(response.json()["mask_png_base64"]), truth))
        return out

    shifted = auto_dice(*test)
    original = auto_dice(*in_domain)
    rng = np.random.default_rng(7)  # the same box jitter for every version
    sessions = [correct(client, image, truth, model=model, config=config, rng=rng) for image, truth in zip(*test,
                                                                                                           strict=True)]
    return {"model": model, "dice": float(np.mean(shifted)), "dice_std": float(np.std(shifted)),
            "in_domain_dice": float(np.mean(original)), **prompt_summary(sessions),
            "per_image_dice": [round(v, 5) for v in shifted],  # paired comparisons between versions
            "per_image_prompts": [s.prompts for s in sessions]}


def prompt_summary(sessions: Sequence[Correction]) -> dict[str, Any]:
    return {"prompts_per_image": float(np.mean([s.prompts for s in sessions])),
            "accepted_without_prompts": float(np.mean([s.prompts == 0 for s in sessions])),
            "dice_after_prompts": float(np.mean([s.dice_prompted for s in sessions])),
            "brush_pixels_per_image": float(np.mean([s.brush_pixels for s in sessions])),
            "api_seconds_per_image": float(np.mean([s.seconds for s in sessions]))}


def upload_replay(client: httpx.Client, admin: dict[str, str], n: int, size: int) -> str:
    """``n`` original-domain phantoms uploaded as a dataset (POST /datasets): the fine-tunes' replay set."""
    import io
    import zipfile

    images, masks = phantom_set(n, SEEDS["replay"], size, "in")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            zf.writestr(f"images/{i:04d}.png", encode_png(image))
            zf.writestr(f"masks/{i:04d}.png", encode_mask_png(mask))
    response = client.post("/datasets", headers=admin, files={"file": ("replay.zip", buffer.getvalue())},
                           data={"name": "original-domain replay"})
    response.raise_for_status()
    return str(response.json()["id"])


def wait_job(client: httpx.Client, job_id: str, headers: dict[str, str], *, timeout_s: float = JOB_TIMEOUT_S,
             poll_s: float = 5.0) -> dict[str, Any]:
    """``GET /jobs/{job_id}`` every ``poll_s`` until the job has finished; its last answer.

    Raises:
        RuntimeError: still running after ``timeout_s``.
    """
    from medplatform.jobs import FINISHED

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if job["status"] in FINISHED:
            return job
        time.sleep(poll_s)
    raise RuntimeError(f"job {job_id} still running after {timeout_s:.0f} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.system import machine_description
    from loadtest.tenants import busiest_processes

    steps = sorted({int(s) for s in args.steps.split(",")})
    config = AnnotatorConfig(target_dice=args.target_dice, max_prompts=args.max_prompts)
    pool = phantom_set(max(steps), SEEDS["pool"], args.size, args.domain)
    test = phantom_set(args.n_test, SEEDS["test"], args.size, args.domain)
    in_domain = phantom_set(args.n_test, SEEDS["in_domain_test"], args.size, "in")
    started = time.time()
    machine = {"start": machine_description(), "busiest_processes_start": busiest_processes()}
    work = Path(tempfile.mkdtemp(prefix="medrefine-corrections-"))
    server = Server(Path(args.artifacts), work, threads=args.threads)
    try:
        server.wait_ready()
        admin = {"Authorization": f"Bearer {server.admin_key}"}
        with httpx.Client(base_url=server.url, timeout=300.0) as client:
            base = f"{args.model}:1"
            base_info = client.get(f"/models/{args.model}/versions/1").json()
            curve = [{"n": 0, **measure(client, base, test, in_domain, config)}]
            print(json.dumps(curve[-1]), flush=True)
            # The annotator corrects the pool with the production model's masks and saves every case.
            sessions = []
            for image, truth in zip(*pool, strict=True):
                session = correct(client, image, truth, model=base, config=config, rng=np.random.default_rng(
                    len(sessions)))
                saved = client.post("/feedback/segmentation", headers=admin, data={
                    "model_version": session.model_version, "seconds": f"{session.seconds:.3f}",
                    "prompts": str(session.prompts), "dataset": "corrections-benchmark"},
                    files={"image": ("i.png", encode_png(image), "image/png"),
                           "mask": ("m.png", encode_mask_png(session.mask), "image/png")})
                saved.raise_for_status()
                sessions.append(session)
            annotation = prompt_summary(sessions)
            print(json.dumps({"annotation": annotation}), flush=True)
            replay = upload_replay(client, admin, args.replay, args.size) if args.replay else None
            jobs = []
            for n in steps:
                snap = client.post("/feedback/segmentation/snapshot", headers=admin,
                                   json={"dataset": "corrections-benchmark", "limit": n})
                snap.raise_for_status()
                hp = {"init": base, "epochs": args.epochs, "batch_size": args.batch_size, "seed": 0}
                if args.learning_rate:
                    hp["learning_rate"] = args.learning_rate
                if replay:
                    hp["replay_dataset"] = replay
                submitted = client.post("/jobs", headers=admin, json={
                    "kind": "train", "dataset": snap.json()["id"], "recipe": args.model, "hyperparameters": hp})
                submitted.raise_for_status()
                t0 = time.monotonic()
                job = wait_job(client, submitted.json()["id"], admin)
                if job["status"] != "succeeded":  # e.g. the export's parity gate: recorded, no point on the curve
                    jobs.append({"n": n, "job": job["id"], "status": job["status"], "error": job["error"],
                                 "seconds": time.monotonic() - t0})
                    print(json.dumps(jobs[-1]), flush=True)
                    continue
                version = f"{job['result']['model']}:{job['result']['version']}"
                jobs.append({"n": n, "job": job["id"], "version": version, "seconds": time.monotonic() - t0,
                             "split": job["result"]["split"], "registered_metrics": job["result"]["metrics"]})
                curve.append({"n": n, **measure(client, version, test, in_domain, config)})
                print(json.dumps(curve[-1]), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    machine.update(end=machine_description(), busiest_processes_end=busiest_processes())
    return {
        "what": "simulated-annotator corrections -> feedback dataset -> fine-tune (train job with init) -> Dice on a "
                "fixed test split of the shifted domain",
        "corrections_dice_curve": [{"n": c["n"], "dice": c["dice"]} for c in curve],
        "prompts_per_image": {"before": curve[0]["prompts_per_image"], "after": curve[-1]["prompts_per_image"]},
        "versions": curve,
        "annotation_of_pool": {"n": len(pool[0]), "model": f"{args.model}:1", **annotation},
        "base_version": {"artifact_version": base_info.get("artifact_version"),
                         "weights_sha256": (base_info.get("artifact_hashes") or {}).get("weights_sha256"),
                         "metrics": base_info.get("metrics")},
        "fine_tunes": jobs,
        "replay_dataset": replay,
        "settings": {"domain": args.domain, "domain_doc": phantom_set.__doc__,
                     "size": args.size, "seeds": SEEDS, "n_test": args.n_test, "steps": steps,
                     "annotator": vars(config), "epochs": args.epochs, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "threads": args.threads, "nice": 10,
                     "replay_original_domain_cases": args.replay,
                     "fine_tune": "e2e phase from default:1, the job's 60/20/20 split of the N cases"},
        "seconds": time.time() - started,
        "machine": machine,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.corrections", description=_HELP)
    parser.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts" / "default"))
    parser.add_argument("--model", default="default", help="the registry name (its v1 is --artifacts)")
    parser.add_argument("--steps", default="20,50,100", help="corrected images before each fine-tune")
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--domain", default="ood+shape", choices=DOMAINS, help="the shifted domain (see phantom_set)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the preset's e2e value")
    parser.add_argument("--replay", type=int, default=0,
                        help="original-domain phantoms uploaded as replay_dataset (its 60 %% train split is added)")
    parser.add_argument("--target-dice", type=float, default=0.9)
    parser.add_argument("--max-prompts", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default loadtest/results/corrections-<time>.json)")
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out or REPO_ROOT / "loadtest" / "results" / f"corrections-{time.strftime('%Y%m%d-%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"corrections_dice_curve": result["corrections_dice_curve"],
                      "prompts_per_image": result["prompts_per_image"], "out": str(out)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
