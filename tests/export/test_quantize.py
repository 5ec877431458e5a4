"""`python -m export onnx --int8 --fuse-rel-pos`: int8 TransUNet and the fused encoder, against fp32 and torch."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from core.imageio import encode_png
from core.phantoms import breast_ultrasound, sample_seed
from export.__main__ import main
from export.fused_encoder import FusedRelPosAttention, fused_sam
from export.parity import dice
from export.quantize import INT8_MIN_DICE, INT8_OPS, phantom_images
from inference.artifacts import load_artifacts
from inference.engines import OnnxRuntimeEngine, TorchEngine
from inference.pipeline import SegmentationPipeline, SegmentOptions
from models.sam.image_encoder import Attention
from tests.support.artifact_factory import make_tiny_run
from tests.support.service_fixtures import start_server
from weights.checkpoints import build_model_from_run, load_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``--int8 --fuse-rel-pos`` artifacts of the committed default models (a trained TransUNet: int8 is for it)."""
    out = tmp_path_factory.mktemp("quantize") / "int8"
    assert main(["onnx", "--model", "default", "--out", str(out), "--int8", "--fuse-rel-pos"]) == 0
    return out


def test_int8_of_a_random_tiny_model_is_refused(tmp_path, capsys, monkeypatch):
    # A random network's probabilities hover near the threshold over much of the image; int8 convolutions
    # flip those pixels (mask Dice 0.94-0.97 against torch), so the export must fail and write nothing. (The
    # tiny TransUNet has too few MatMuls for the default MatMul-only set to show it.)
    monkeypatch.setitem(INT8_OPS, "transunet", ("Conv", "MatMul"))
    run = make_tiny_run(tmp_path / "run")
    out = tmp_path / "int8"
    assert main(["onnx", "--model", str(run), "--out", str(out), "--int8"]) == 1
    err = capsys.readouterr().err
    assert "graph 'transunet' (int8)" in err and "binary-mask Dice" in err
    assert not out.exists() and not list(tmp_path.glob(".int8.staging-*"))


def test_manifest_records_each_graphs_precision(exported):
    optimized = exported
    manifest = json.loads((optimized / "manifest.json").read_text())
    precisions = {name: graph["precision"] for name, graph in manifest["graphs"].items()}
    assert precisions == {"transunet": "int8", "image_encoder": "fp32", "mask_decoder": "fp32"}
    assert manifest["precision"] == "fp32+int8"
    tu = manifest["graphs"]["transunet"]
    assert tu["parity"]["passed"] and tu["parity"]["mask_dice"] >= INT8_MIN_DICE
    assert tu["parity_fp32"]["max_abs_err"] <= tu["parity_fp32"]["bound"]
    assert tu["quantization"]["pipeline_mask_dice_vs_fp32"]["min"] >= INT8_MIN_DICE
    encoder = manifest["graphs"]["image_encoder"]  # the fused graph passed the fp32 bound against the model
    assert encoder["parity"]["passed"] and encoder["parity"]["max_abs_err"] <= encoder["parity"]["bound"] == 2e-4


def test_int8_graph_holds_int8_weights(exported):
    optimized = exported
    model = onnx.load(str(optimized / "transunet.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert int8_weights, "no int8 MatMul weights in the quantized TransUNet"


def test_int8_masks_match_fp32_on_unseen_phantoms(exported):
    # fp32 reference: the same artifact set on the torch engine (the source checkpoint through the export
    # wrappers, unfused, in fp32), so no second export is needed
    artifacts = load_artifacts(exported)
    images = phantom_images(seed=4242, count=8)  # neither calibration nor export-check phantoms
    options = SegmentOptions(outputs=("mask",))
    fast = SegmentationPipeline(OnnxRuntimeEngine(artifacts, intra_op_threads=1), artifacts).segment(images, options)
    reference = SegmentationPipeline(TorchEngine(artifacts, device="cpu"), artifacts).segment(images, options)
    scores = [dice(a.mask > 0, b.mask > 0) for a, b in zip(fast, reference, strict=True)]
    assert all(r.mask.any() for r in reference)  # lesion phantoms: no comparison between empty masks
    assert min(scores) >= INT8_MIN_DICE, scores


def test_engine_and_pipeline_report_precision(exported):
    pipeline = SegmentationPipeline.from_artifacts(exported, intra_op_threads=1)
    described = pipeline.engine.describe()
    assert described["precision"] == {"transunet": "int8", "image_encoder": "fp32", "mask_decoder": "fp32"}
    assert pipeline.model_info()["precision"] == "fp32+int8"


def test_verify_reruns_int8_parity(exported, capsys):
    assert main(["verify", str(exported)]) == 0
    assert "parity check" in capsys.readouterr().out


def test_fused_encoder_equals_the_model_and_leaves_it_untouched(tmp_path):
    sam = build_model_from_run(load_run(make_tiny_run(tmp_path / "run"))).refiner.eval()
    torch.nn.init.normal_(sam.image_encoder.blocks[0].attn.rel_pos_h, std=0.5)  # the tables matter here
    torch.nn.init.normal_(sam.image_encoder.blocks[1].attn.rel_pos_w, std=0.5)
    fused = fused_sam(sam)
    assert all(isinstance(b.attn, FusedRelPosAttention) for b in fused.image_encoder.blocks)
    assert all(type(b.attn) is Attention for b in sam.image_encoder.blocks)
    x = torch.from_numpy(np.stack(phantom_images(seed=5, count=2, size=sam.img_size)))[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        want = sam.encode(sam.preprocess(x * 255.0))
        got = fused.encode(fused.preprocess(x * 255.0))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_service_reports_precision_in_readyz_and_every_answer(exported, tmp_path):
    image, truth = breast_ultrasound(sample_seed(4243, 0), 128)
    server = start_server(exported, tmp_path / "server")
    try:
        ready = httpx.get(server.url + "/readyz", timeout=30).json()
        with server.client(timeout=60) as client:
            rest = client.post("/segment", files={"file": ("p.png", encode_png(image), "image/png")})
            document = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(image.shape),
                                    "data": image.ravel().tolist()}]}
            oip = client.post("/v2/models/segment/infer", json=document)
    finally:
        server.stop()
    graphs = {"transunet": "int8", "image_encoder": "fp32", "mask_decoder": "fp32"}
    assert ready["precision"] == {"artifacts": "fp32+int8", "graphs": graphs}
    assert rest.status_code == 200, rest.text
    assert rest.json()["model"]["precision"] == {"artifacts": "fp32+int8", "graphs": graphs}
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(rest.json()["mask_png_base64"])))) > 127
    assert dice(mask, truth > 0) > 0.8  # the int8 model still finds the lesion, as served
    assert oip.status_code == 200, oip.text
    assert oip.json()["parameters"] == {"precision": "fp32+int8"}
