"""The service on ``--backend openvino``: MEDREFINE_PRECISION's checks, the engine options it becomes, and the
precision /readyz and an answer report over a real server."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openvino as ov
import pytest
from PIL import Image

from core.imageio import decode_image, encode_png
from core.metrics import dice
from core.phantoms import breast_ultrasound, sample_seed
from inference.artifacts import load_artifacts
from inference.pipeline import SegmentationPipeline
from loadtest.optimize import HELDOUT_SEED
from service.runtime import ServiceRuntime, engine_options
from service.settings import ServiceSettings, SettingsError
from tests.support.service_fixtures import start_server


def test_precision_setting_is_checked_and_reaches_the_engine():
    with pytest.raises(SettingsError, match="MEDREFINE_PRECISION.*'int4'"):
        ServiceSettings.from_env({"MEDREFINE_BACKEND": "openvino", "MEDREFINE_PRECISION": "int4"})
    with pytest.raises(SettingsError, match="MEDREFINE_PRECISION.*onnxruntime"):
        ServiceSettings.from_env({"MEDREFINE_PRECISION": "bf16"})  # the default backend runs the artifacts' own
    with pytest.raises(SettingsError, match="MEDREFINE_DEVICE"):
        ServiceSettings.from_env({"MEDREFINE_BACKEND": "openvino", "MEDREFINE_DEVICE": "cuda"})
    settings = ServiceSettings.from_env({"MEDREFINE_BACKEND": "openvino", "MEDREFINE_PRECISION": "fp32",
                                         "MEDREFINE_INTRA_OP_THREADS": "1"})
    assert engine_options(settings) == {"intra_op_threads": 1, "precision": "fp32"}
    assert engine_options(ServiceSettings(backend="openvino")) == {}  # the engine's default: bf16 where it runs


def _bf16_here(path) -> str:
    """What OpenVINO runs a graph compiled with a bf16 hint at on this CPU: "bf16", or "fp32" without support."""
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    return {"bf16": "bf16", "f32": "fp32"}[compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()]


def test_service_reports_openvino_precision_in_readyz_and_answers(service_artifacts, tmp_path):
    artifacts = load_artifacts(service_artifacts.art_dir)
    graphs = {name: "fp32" if name == "mask_decoder" else _bf16_here(artifacts.graph(name).path)
              for name in artifacts.graphs}  # the decoder runs on ONNX Runtime (OPENVINO_ORT_GRAPHS)
    image, truth = breast_ultrasound(sample_seed(HELDOUT_SEED, 0), 128)
    server = start_server(service_artifacts.art_dir, tmp_path / "server", backend="openvino",
                          env={"MEDREFINE_PRECISION": "bf16", "MEDREFINE_GENERATORS": "off"})
    try:
        ready = httpx.get(server.url + "/readyz", timeout=30).json()
        with server.client(timeout=60) as client:
            rest = client.post("/segment", files={"file": ("p.png", encode_png(image), "image/png")})
    finally:
        server.stop()
    assert ready["backend"] == "openvino"
    assert ready["precision"] == {"artifacts": "fp32", "graphs": graphs}
    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert body["model"]["backend"] == "openvino"
    assert body["model"]["precision"] == {"artifacts": "fp32", "graphs": graphs}
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"])))) > 127
    pipeline = SegmentationPipeline.from_artifacts(service_artifacts.art_dir, "openvino", intra_op_threads=1,
                                                   precision="bf16")
    offline = pipeline.segment([decode_image(encode_png(image)).pixels])[0].mask > 0
    assert dice(served, offline) >= 0.98  # the server answers what the offline openvino pipeline computes
    assert served.shape == truth.shape


def test_the_queue_forms_batches_at_the_engines_static_shapes(service_artifacts):
    """The runtime hands the batcher the OpenVINO engine's shapes up to its batch limit; ONNX Runtime has none."""
    for backend, want in (("openvino", (1, 2, 4, 8)), ("onnxruntime", ())):
        pipeline = SegmentationPipeline.from_artifacts(service_artifacts.art_dir, backend, intra_op_threads=1)
        runtime = ServiceRuntime(ServiceSettings(artifacts=service_artifacts.art_dir, max_batch_size=12), pipeline)
        assert runtime.batcher.config.preferred_sizes == want, backend
