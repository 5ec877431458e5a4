"""``python -m training quality-report``: every quality figure of an answer, measured THROUGH the service's API."""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.machine import cpu_model
from core.metrics import dice  # the project's one Dice; re-exported for tests/service/test_quality.py

log = logging.getLogger("training.quality")

REPO_ROOT = Path(__file__).resolve().parent.parent
LESION_SEED = 7000  # held out: default-models trains on data seeds 1000-1002
NORMAL_SEED = 7001
PROMPT_SEED = 7002
REVIEW_DICE = 0.7
API_KEY = "quality-report-key-0123"


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "quality-report") -> None:
    parser.add_argument("--artifacts", default="artifacts/default", help="artifact directory to serve")
    parser.add_argument("--url", help="use a running service at this URL instead of starting one")
    parser.add_argument("--api-key", help="bearer key of --url's service")
    parser.add_argument("--out", default="docs/quality.json")
    parser.add_argument("--n-lesion", type=int, default=40, help="held-out lesion phantoms")
    parser.add_argument("--n-normal", type=int, default=40, help="held-out lesion-free phantoms")
    parser.add_argument("--size", type=int, default=256)


# ------------------------------------------------------------------ statistics


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """AUROC of ``score`` for ``positive`` (Mann-Whitney, ties one half); None without both classes."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


# ------------------------------------------------------------------ the service


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A ``python -m service`` child on loopback (stopped by ``close``), or a running one at ``url``."""

    def __init__(self, artifacts: str, url: str | None, api_key: str | None, work: Path) -> None:
        import httpx

        self.process = None
        if url is None:
            port, grpc = _free_port(), _free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MEDREFINE_")}
            # A fresh platform data directory: the server registers --artifacts as the production version there,
            # so a registry left by other runs (its production alias on an older model) cannot answer instead.
            env.update({"MEDREFINE_DATA_DIR": str(work / "platform"),
                        "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
                        "OMP_NUM_THREADS": "1", "MEDREFINE_INTRA_OP_THREADS": "1", "QUALITY_KEY": API_KEY})
            self.log_path = work / "server.log"
            with open(self.log_path, "wb") as out:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
                     str(grpc), "--artifacts", artifacts, "--backend", "onnxruntime", "--api-key-env", "QUALITY_KEY"],
                    cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            url, api_key = f"http://127.0.0.1:{port}", API_KEY
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=120.0)
        deadline = time.monotonic() + 180
        while True:
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the service exited ({self.process.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service at {url} was not ready within 180 s")
            time.sleep(0.5)

    def post(self, path: str, png: bytes, data: dict[str, str] | None = None,
             prior: bytes | None = None) -> dict[str, Any]:
        files = [("file", ("image.png", png, "image/png"))]
        if prior is not None:
            files.append(("prior_mask", ("prior.png", prior, "image/png")))
        response = self.client.post(path, files=files, data=data or {})
        if response.status_code != 200:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def close(self) -> None:
        self.client.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def png_bytes(array: np.ndarray) -> bytes:
    from core.imageio import encode_png

    return encode_png(np.asarray(array, dtype=np.uint8))


def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as picture:
        return np.asarray(picture)


# ------------------------------------------------------------------ prompts


def one_click(mask: np.ndarray, rng: np.random.Generator) -> list[float]:
    """A foreground click where a user clicks: a pixel of the lesion eroded by 2 px."""
    from training.interactive import _inside, _pick

    return [float(v) for v in _pick(_inside(mask > 0), rng)]


def jittered(mask: np.ndarray, rng: np.random.Generator) -> list[float]:
    from training.interactive import jittered_box

    return [float(v) for v in jittered_box(mask > 0, rng)]


# ------------------------------------------------------------------ the measurement


def measure(service: Service, n_lesion: int, n_normal: int, size: int) -> dict[str, Any]:
    """All figures (module docstring) from ``n_lesion`` + ``n_normal`` held-out phantoms and one blank image."""
    from core.phantoms import breast_ultrasound, sample_seed

    rng = np.random.default_rng(PROMPT_SEED)
    rows: list[dict[str, Any]] = []  # one per answer: kind, dice, iou, needs_review
    cache = {"first_prompt_hits": 0, "later_prompt_hits": 0, "later_prompts": 0, "encoder_ms": [], "decoder_ms": []}
    gate_std, gate_range = [], []
    for i in range(n_lesion):
        image, truth = breast_ultrasound(sample_seed(LESION_SEED, i), size)
        png = png_bytes(image)
        seg = service.post("/segment", png, {"outputs": "mask,gate"})
        seg_mask = png_array(seg["mask_png_base64"]) > 0
        rows.append({"kind": "segment", "case": i, "dice": dice(seg_mask, truth), "iou": seg["iou"],
                     "needs_review": seg["needs_review"], "lesion_found": seg["lesion_found"],
                     "uncertainty": seg["uncertainty"]})
        if "gate_png_base64" in seg:
            g = png_array(seg["gate_png_base64"]).astype(np.float64) / 255.0
            gate_std.append(float(g.std()))
            gate_range.append(float(g.max() - g.min()))
        box = jittered(truth, rng)
        prompts = {
            "refine_box": ({"box": json.dumps(box)}, None),
            "refine_point": ({"points": json.dumps([one_click(truth, rng)]), "point_labels": "[1]"}, None),
            "refine_box_prior": ({"box": json.dumps(box)}, png_bytes(seg_mask.astype(np.uint8) * 255)),
        }
        for n, (kind, (data, prior)) in enumerate(prompts.items()):
            if prior is not None and not seg_mask.any():
                continue  # an empty prior is refused (400): nothing to refine
            answer = service.post("/refine", png, {**data, "outputs": "mask"}, prior)
            mask = png_array(answer["mask_png_base64"]) > 0
            rows.append({"kind": kind, "case": i, "dice": dice(mask, truth), "iou": answer["iou"],
                         "needs_review": answer["needs_review"], "lesion_found": answer["lesion_found"]})
            timings = answer.get("timings_ms", {})
            if n == 0:
                cache["first_prompt_hits"] += int(answer["cache_hit"])
            else:
                cache["later_prompts"] += 1
                cache["later_prompt_hits"] += int(answer["cache_hit"])
            # a click alone after the box is another window (an encoder pass): time answers by what ran
            if "image_encoder" in timings:
                cache["encoder_ms"].append(timings["total"])
            elif answer["cache_hit"]:
                cache["decoder_ms"].append(timings.get("total", float("nan")))
    normal_found, normal_review = [], []
    for i in range(n_normal):
        image, _ = breast_ultrasound(sample_seed(NORMAL_SEED, i), size, lesion=False)
        seg = service.post("/segment", png_bytes(image), {"outputs": "mask"})
        nonempty = bool((png_array(seg["mask_png_base64"]) > 0).any())
        normal_found.append((nonempty, bool(seg["lesion_found"])))
        normal_review.append(bool(seg["needs_review"]))
        rows.append({"kind": "segment_normal", "case": i, "dice": 0.0 if nonempty else 1.0, "iou": seg["iou"],
                     "needs_review": seg["needs_review"], "lesion_found": seg["lesion_found"]})
    blank = service.post("/segment", png_bytes(np.zeros((size, size), np.uint8)), {"outputs": "mask"})
    blank_pixels = int((png_array(blank["mask_png_base64"]) > 0).sum())
    return summarise(rows, cache, gate_std, gate_range, normal_found, normal_review,
                     {"lesion_found": blank["lesion_found"], "mask_pixels": blank_pixels, "iou": blank["iou"]})


def _confidence(rows: list[dict[str, Any]]) -> dict[str, Any]:
    d = np.array([r["dice"] for r in rows])
    p = np.array([r["iou"] for r in rows], dtype=np.float64)
    flag = np.array([r["needs_review"] for r in rows], dtype=bool)
    bad = d < REVIEW_DICE
    extra = {}
    if rows and all("uncertainty" in r for r in rows):  # the gate's mean as the alternative review score
        u = np.array([r["uncertainty"] for r in rows], dtype=np.float64)
        a = auroc(u, bad)
        extra = {"gate_uncertainty_auroc": None if a is None else round(a, 4),
                 "spearman_uncertainty_dice": round(spearman(-u, d), 4) if np.ptp(u) > 0 else None}
    return {**extra,
        "n": len(rows), "n_dice_below_0.7": int(bad.sum()),
        "spearman_iou_dice": round(spearman(p, d), 4) if len(rows) > 2 and np.ptp(p) > 0 else None,
        "review_auroc": None if (a := auroc(-p, bad)) is None else round(a, 4),
        "sensitivity": round(float(flag[bad].mean()), 4) if bad.any() else None,
        "specificity": round(float((~flag[~bad]).mean()), 4) if (~bad).any() else None,
        "flagged": int(flag.sum()),
    }


def summarise(rows, cache, gate_std, gate_range, normal_found, normal_review, blank) -> dict[str, Any]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    dice_table = {k: {"mean": round(float(np.mean([r["dice"] for r in v])), 4),
                      "median": round(float(np.median([r["dice"] for r in v])), 4), "n": len(v)}
                  for k, v in by_kind.items() if k != "segment_normal"}
    lesion_rows = [r for r in rows if r["kind"] != "segment_normal"]
    nonempty = np.array([f[0] for f in normal_found])
    found = np.array([f[1] for f in normal_found])
    return {
        "dice": dice_table,
        "confidence": {
            "segment": _confidence(by_kind.get("segment", [])),
            "all_lesion_answers": _confidence(lesion_rows),
            "all_answers": _confidence(rows),
        },
        "no_finding": {
            "normal_images": len(normal_found),
            "normal_nonempty_mask_rate": round(float(nonempty.mean()), 4) if len(nonempty) else None,
            "normal_lesion_found_rate": round(float(found.mean()), 4) if len(found) else None,
            "normal_needs_review_rate": round(float(np.mean(normal_review)), 4) if normal_review else None,
            "blank_image": blank,
        },
        "embedding_cache": {
            "first_prompt_hits": cache["first_prompt_hits"],
            "later_prompts": cache["later_prompts"], "later_prompt_hits": cache["later_prompt_hits"],
            "median_ms_with_encoder": round(float(np.median(cache["encoder_ms"])), 1) if cache["encoder_ms"] else None,
            "median_ms_cache_hit": round(float(np.median(cache["decoder_ms"])), 1) if cache["decoder_ms"] else None,
        },
        "gate": {
            "mean_within_image_std": round(float(np.mean(gate_std)), 5) if gate_std else None,
            "max_within_image_range": round(float(np.max(gate_range)), 5) if gate_range else None,
        },
        "cases": rows,
    }


def table(report: dict[str, Any]) -> str:
    """The README's Quality table (markdown)."""
    d, c, nf = report["dice"], report["confidence"], report["no_finding"]
    names = {"segment": "`/segment` (automatic)", "refine_box": "`/refine` box (±10 % jitter)",
             "refine_point": "`/refine` one positive click", "refine_box_prior": "`/refine` box + prior mask"}
    lines = ["| answer | mean Dice | median Dice | n |", "|---|---|---|---|"]
    for key, label in names.items():
        if key in d:
            lines.append(f"| {label} | {d[key]['mean']:.3f} | {d[key]['median']:.3f} | {d[key]['n']} |")
    seg, pooled = c["segment"], c["all_lesion_answers"]
    lines += ["", "| confidence and review | `/segment` | all lesion answers |", "|---|---|---|"]
    for key, label in (("spearman_iou_dice", "Spearman(predicted IoU, Dice)"),
                       ("review_auroc", "AUROC of 1 − IoU for Dice < 0.7"),
                       ("sensitivity", "`needs_review` sensitivity"), ("specificity", "`needs_review` specificity"),
                       ("n_dice_below_0.7", "answers with Dice < 0.7")):
        lines.append(f"| {label} | {seg[key]} | {pooled[key]} |")
    lines += ["", f"Normal (lesion-free) images with a non-empty mask: {nf['normal_nonempty_mask_rate']} of "
              f"{nf['normal_images']}; blank image: lesion_found={nf['blank_image']['lesion_found']}, "
              f"{nf['blank_image']['mask_pixels']} mask pixels."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        service = Service(args.artifacts, args.url, args.api_key, Path(tmp))
        try:
            started = time.time()
            report = measure(service, args.n_lesion, args.n_normal, args.size)
        finally:
            service.close()
    manifest_path = Path(args.artifacts) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    report = {
        "command": "python -m training quality-report " + " ".join(sys.argv[2:]),
        "cpu": cpu_model(), "seconds": round(time.time() - started, 1),
        "model_version": manifest.get("version"),
        "held_out": {"lesion": f"ultrasound seed {LESION_SEED}, {args.n_lesion} cases, {args.size} px",
                     "normal": f"ultrasound_normal seed {NORMAL_SEED}, {args.n_normal} cases",
                     "prompts": f"seed {PROMPT_SEED}"},
        "served_thresholds": {k: manifest.get("pipeline", {}).get(k)
                              for k in ("threshold", "review", "no_finding", "segment")},
        **report,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    log.info("wrote %s", out)
    return 0
