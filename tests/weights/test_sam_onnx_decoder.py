"""weights.sam_onnx.SamOnnxDecoder: official ONNX-signature outputs in torch and through onnxruntime, with
dynamic batch (one prompt set per image) and number of points."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from weights.sam_checkpoint import load_sam_checkpoint
from weights.sam_onnx import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAMES, SamOnnxDecoder

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sam" / "tiny_reference.safetensors"
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def decoder() -> SamOnnxDecoder:
    return SamOnnxDecoder(load_sam_checkpoint(FIXTURE, "tiny", prefix="model.")).eval()


def _official_inputs(ref):
    return (
        ref["out.image_embeddings"],
        ref["in.onnx.point_coords"],
        ref["in.onnx.point_labels"],
        ref["in.mask_input"],
        ref["in.onnx.has_mask_input"],
        ref["in.onnx.orig_im_size"],
    )


@pytest.fixture(scope="module")
def session(decoder, ref, tmp_path_factory) -> ort.InferenceSession:
    path = tmp_path_factory.mktemp("onnx") / "sam_decoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
        torch.onnx.export(
            decoder,
            _official_inputs(ref),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
            opset_version=17,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"If", "Loop", "NonZero"}, ops  # control flow and boolean indexing were rewritten
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, *inputs):
    feeds = {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)}
    return [torch.from_numpy(o) for o in session.run(list(OUTPUT_NAMES), feeds)]


def _check_official(outputs, ref):
    masks, scores, low = outputs
    assert masks.shape == (1, 1, 300, 400) and scores.shape == (1, 1) and low.shape == (1, 1, 64, 64)
    torch.testing.assert_close(masks, ref["out.onnx.masks"], atol=ATOL, rtol=0)
    torch.testing.assert_close(scores, ref["out.onnx.scores"], atol=ATOL, rtol=0)
    torch.testing.assert_close(low, ref["out.onnx.low_res_masks"], atol=ATOL, rtol=0)


def test_torch_wrapper_matches_official(decoder, ref):
    with torch.no_grad():
        _check_official(decoder(*_official_inputs(ref)), ref)


def test_onnxruntime_matches_official(session, ref):
    _check_official(_run(session, *_official_inputs(ref)), ref)


def test_box_as_corner_points_equals_sam_decode(decoder, ref):
    # points + box corners (labels 2, 3) + mask, all tokens returned: token 0 is SAM's single-mask output
    coords = torch.cat([ref["in.point_coords"], ref["in.box_xyxy"].reshape(1, 2, 2)], dim=1)
    labels = torch.tensor([[1.0, 0.0, 2.0, 3.0]])
    full = SamOnnxDecoder(decoder.model, return_single_mask=False).eval()
    with torch.no_grad():
        _, scores, low = full(ref["out.image_embeddings"], coords, labels, ref["in.mask_input"],
                              torch.ones(1), torch.tensor([256.0, 256.0]))
    torch.testing.assert_close(low[:, :1], ref["out.all.multimask0.low_res_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(low[:, 1:], ref["out.all.multimask1.low_res_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(scores[:, 1:], ref["out.all.multimask1.iou"], atol=ATOL, rtol=0)


def _batch(b: int, n: int, seed: int, emb_batch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(emb_batch or b, 64, 16, 16, generator=g)
    coords = torch.rand(b, n, 2, generator=g) * 256
    labels = torch.randint(-1, 2, (b, n), generator=g).float()
    labels[:, 0] = 1.0
    masks = torch.randn(b, 1, 64, 64, generator=g) * 5
    has_mask = (torch.arange(b) % 2 == 0).float()
    return emb, coords, labels, masks, has_mask, torch.tensor([200.0, 150.0])


@pytest.mark.parametrize(("b", "n"), [(3, 2), (2, 1), (4, 6)])
def test_batched_prompts_match_per_image_and_onnxruntime(decoder, session, b, n):
    inputs = _batch(b, n, seed=10 * b + n)
    with torch.no_grad():
        batched = decoder(*inputs)
        assert batched[0].shape == (b, 1, 200, 150) and batched[1].shape == (b, 1)
        for i in range(b):
            single = decoder(*[t[i : i + 1] if t.ndim and t.shape[0] == b else t for t in inputs[:5]], inputs[5])
            for got, want in zip(batched, single, strict=True):
                torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=0)
    for got, want in zip(_run(session, *inputs), batched, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_one_image_broadcast_over_prompt_sets(decoder, session):
    inputs = _batch(3, 3, seed=5, emb_batch=1)
    with torch.no_grad():
        broadcast = decoder(*inputs)
        repeated = decoder(inputs[0].expand(3, -1, -1, -1), *inputs[1:])
    for got, want in zip(broadcast, repeated, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for got, want in zip(_run(session, *inputs), broadcast, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_mask_selection_follows_number_of_points(decoder, session, n):
    inputs = list(_batch(1, n, seed=7))
    inputs[3] = torch.zeros(1, 1, 64, 64)
    inputs[4] = torch.zeros(1)
    full = SamOnnxDecoder(decoder.model, return_single_mask=False).eval()
    with torch.no_grad():
        _, all_scores, all_low = full(*inputs)
        _, score, low = decoder(*inputs)
    # official rule: up to 2 points -> best multimask output (never token 0); more -> the single-mask token 0
    best = int(all_scores[0, 1:].argmax()) + 1 if n <= 2 else 0
    torch.testing.assert_close(score[0, 0], all_scores[0, best])
    torch.testing.assert_close(low[0, 0], all_low[0, best])
    _, ort_score, ort_low = _run(session, *inputs)
    torch.testing.assert_close(ort_score[0, 0], all_scores[0, best], atol=ATOL, rtol=0)
    torch.testing.assert_close(ort_low[0, 0], all_low[0, best], atol=ATOL, rtol=0)
