"""What a clinician sees in an answer, checked over HTTP against the phantom's truth (committed default model).

Held-out phantoms (seeds no model trained on) go through the live server's ``/segment`` and ``/refine``:
masks are scored by Dice against the truth, the predicted ``iou`` by its rank correlation with that Dice,
``needs_review`` on a clearly good and a clearly bad answer, and "no finding" on blank and lesion-free images.
The thresholds sit a little below the values ``python -m training quality-report`` measured (docs/quality.json).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from core.imageio import encode_png
from core.phantoms import breast_ultrasound, sample_seed
from training.quality import dice, jittered, one_click, spearman

SEED = 9100  # held out: default-models trains on data seeds 1000-1002, quality-report measures 7000-7002
N_CASES = 20
SIZE = 256

# Measured on these 20 cases with the committed default model (/refine with a box in the crop framing):
# /segment 0.889, box 0.916, one click 0.869, box + prior 0.918, box + click 0.918, Spearman over the 80 answers
# 0.719 (before the calibrated segment rules, which raised /segment here to 0.902). Each threshold sits a little below.
MIN_BOX_DICE = 0.90
MIN_POINT_DICE = 0.85
MIN_BOX_CLICK_DICE = 0.90
BOX_PRIOR_MARGIN = 0.01
MIN_SPEARMAN = 0.65


def _mask(answer: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(answer["mask_png_base64"]))) as picture:
        return np.asarray(picture) > 0


def _post(client, path: str, image: np.ndarray, data: dict, prior: np.ndarray | None = None) -> dict:
    files = [("file", ("case.png", encode_png(image), "image/png"))]
    if prior is not None:
        files.append(("prior_mask", ("prior.png", encode_png(prior.astype(np.uint8) * 255), "image/png")))
    response = client.post(path, files=files, data={**data, "outputs": "mask"})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def answers(live_server):
    """Per case: /segment, then /refine with a jittered box, one click, and the box over /segment's mask."""
    if not live_server_uses_default(live_server):
        pytest.fail("the quality tests need the committed default model (checkpoints/default)")
    rng = np.random.default_rng(SEED)
    rows = []
    with live_server.client(timeout=120.0) as client:
        for i in range(N_CASES):
            image, truth = breast_ultrasound(sample_seed(SEED, i), SIZE)
            seg = _post(client, "/segment", image, {})
            box = jittered(truth, rng)
            refine_box = _post(client, "/refine", image, {"box": json.dumps(box)})
            refine_point = _post(client, "/refine", image, {"points": json.dumps([one_click(truth, rng)]),
                                                            "point_labels": "[1]"})
            refine_prior = _post(client, "/refine", image, {"box": json.dumps(box)}, prior=_mask(seg))
            refine_click = _post(client, "/refine", image, {"box": json.dumps(box), "point_labels": "[1]",
                                                            "points": json.dumps([one_click(truth, rng)])})
            box_again = _post(client, "/refine", image, {"box": json.dumps(box)})
            rows.append({name: {"dice": dice(_mask(a), truth), "mask": _mask(a), **{k: a[k] for k in
                                ("iou", "needs_review", "lesion_found") if k in a},
                                "cache_hit": a.get("cache_hit")}
                         for name, a in (("segment", seg), ("box", refine_box), ("point", refine_point),
                                         ("box_prior", refine_prior), ("box_click", refine_click),
                                         ("box_again", box_again))})
    return rows


def live_server_uses_default(server) -> bool:
    manifest = json.loads((server.art_dir / "manifest.json").read_text())
    return "review" in manifest["pipeline"] and "no_finding" in manifest["pipeline"]


def _mean(rows, kind: str) -> float:
    return float(np.mean([r[kind]["dice"] for r in rows]))


def test_refine_with_a_jittered_box_matches_segment(answers):
    box, segment = _mean(answers, "box"), _mean(answers, "segment")
    assert box >= MIN_BOX_DICE, f"/refine box Dice {box:.3f} (segment {segment:.3f})"
    assert box >= segment, f"/refine box Dice {box:.3f} fell below /segment's {segment:.3f}"


def test_refine_with_one_click_finds_the_lesion(answers):
    point = _mean(answers, "point")
    assert point >= MIN_POINT_DICE, f"/refine one-click Dice {point:.3f}"


def test_box_plus_prior_mask_is_not_worse_than_the_box(answers):
    box, prior = _mean(answers, "box"), _mean(answers, "box_prior")
    assert prior >= box - BOX_PRIOR_MARGIN, f"box + prior {prior:.3f} < box {box:.3f}"


def test_later_prompts_with_the_box_hit_the_embedding_cache_and_answer_the_same_pixels(answers):
    # The box is the first prompt on its window (a miss); box + prior, box + click and the box again reuse the
    # embedding of the same snapped window. The click alone is in the whole-image framing, another entry.
    assert not any(r["box"]["cache_hit"] for r in answers)
    assert all(r[k]["cache_hit"] for r in answers for k in ("box_prior", "box_click", "box_again"))
    for r in answers:  # the cached embedding answers the mask the encoder pass answered
        np.testing.assert_array_equal(r["box_again"]["mask"], r["box"]["mask"])
    click = _mean(answers, "box_click")
    assert click >= MIN_BOX_CLICK_DICE, f"/refine box + click Dice {click:.3f} (from the cache)"


def test_predicted_iou_ranks_answers_by_their_dice(answers):
    pairs = [(r[k]["iou"], r[k]["dice"]) for r in answers for k in ("segment", "box", "point", "box_prior")]
    iou, d = np.array(pairs).T
    rho = spearman(iou, d)
    assert rho > MIN_SPEARMAN, f"Spearman(predicted IoU, Dice) = {rho:.3f} over {len(pairs)} answers"


def test_needs_review_separates_a_good_answer_from_a_bad_one(answers, live_server):
    good = [r["segment"] for r in answers if r["segment"]["dice"] >= 0.9]
    assert good and not all(g["needs_review"] for g in good)
    best = max((r["segment"] for r in answers), key=lambda a: a["dice"])
    assert best["needs_review"] is False and best["lesion_found"] is True
    # A clearly bad answer: a box drawn over lesion-free tissue of a normal scan.
    image, _ = breast_ultrasound(sample_seed(SEED + 1, 0), SIZE, lesion=False)
    with live_server.client(timeout=120.0) as client:
        bad = _post(client, "/refine", image, {"box": json.dumps([20.0, 150.0, 120.0, 230.0])})
    assert bad["needs_review"] is True, f"predicted IoU {bad['iou']:.3f} on a box over healthy tissue"


def test_blank_and_lesion_free_images_are_no_finding(live_server):
    with live_server.client(timeout=120.0) as client:
        blank = _post(client, "/segment", np.zeros((SIZE, SIZE), np.uint8), {})
        assert blank["lesion_found"] is False and not _mask(blank).any() and blank["area_px"] == 0
        found = []
        for i in range(8):
            image, truth = breast_ultrasound(sample_seed(SEED + 2, i), SIZE, lesion=False)
            assert not truth.any()
            answer = _post(client, "/segment", image, {})
            assert answer["lesion_found"] == bool(_mask(answer).any())
            found.append(answer["lesion_found"])
    assert sum(found) <= 1, f"{sum(found)} of 8 lesion-free images got a lesion"
