"""/synthesize serves the GenSeg-trained generator when one is registered (``synthesizer@production``) or named
(MEDREFINE_SYNTHESIZER), over REST, OIP-HTTP and gRPC; without one, the stage-one pix2pix; bad references
stop the server at start naming the setting.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from core.imageio import encode_mask_png
from core.phantoms import breast_ultrasound
from inference.generation import Pix2PixPipeline, load_pix2pix_pipeline
from inference.manifest import ArtifactError, load_manifest

TOLERANCE = 2  # uint8 levels: ONNX Runtime vs torch, as tests/service/test_service_generation.py


def png_array(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def genseg(tmp_path_factory):
    """A tiny GenSeg run (real training code, 2 steps, generator updated every step) and its export."""
    import dataclasses

    from export.genseg_export import export_genseg_generator
    from models.pix2pix import build_pix2pix
    from tests.training.test_genseg import TINY_PIX2PIX, TINY_TRANSUNET
    from training.generators import phantom_pairs
    from training.genseg import GenSegConfig, train_genseg

    root = tmp_path_factory.mktemp("genseg")
    torch.manual_seed(0)
    generator = build_pix2pix(dataclasses.replace(TINY_PIX2PIX, use_dropout=True))
    config = GenSegConfig(hyper_every=1, gen_lr=1e-2, n_real_masks=1, n_perturbed=1)
    _, metrics = train_genseg(phantom_pairs(4, 3, 32), generator, root / "run", config=config, steps=2,
                              batch_size=2, transunet=TINY_TRANSUNET)
    assert metrics["generator_updates"] == 2
    export_genseg_generator(root / "run", root / "art")
    return root / "run", root / "art"


@pytest.fixture(scope="module")
def offline(genseg):
    """The GenSeg generator's own output in torch (the run's weights, not the export)."""
    from export.genseg_export import load_genseg_parts

    generator, _, _ = load_genseg_parts(genseg[0])
    return Pix2PixPipeline(generator)


def _mask(size: int = 80) -> np.ndarray:
    _, mask = breast_ultrasound(1, size=size)
    return mask


def _register(genseg, work_dir, *, alias: str | None = "production"):
    from medplatform.context import open_platform

    env = {"MEDREFINE_DATA_DIR": str(work_dir / "var"), "BENTOML_HOME": str(work_dir / "bentoml")}
    registry = open_platform(env).registry
    info = registry.register(*genseg, name="synthesizer")
    if alias:
        registry.set_alias("synthesizer", alias, info.version)
    return env, info


# --------------------------------------------------------------------------- over the wire


def test_registered_genseg_generator_is_served_on_every_transport(genseg, offline, generator_artifacts,
                                                                  service_artifacts, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from tests.support.service_fixtures import start_server

    env, info = _register(genseg, tmp_path)
    manifest = load_manifest(genseg[1])
    server = start_server(service_artifacts.art_dir, tmp_path, env=env | {
        "MEDREFINE_GENERATORS": str(generator_artifacts)})  # stage one loaded too: the GenSeg one replaces it
    try:
        mask = _mask()
        with server.client(timeout=120) as client:
            response = client.post("/synthesize", files={"file": ("m.png", encode_mask_png(mask), "image/png")})
            assert response.status_code == 200, response.text
            body = response.json()
            ready = client.get("/readyz").json()
            generate = client.post("/generate", json={"prompt": "brain mri", "modality": "brain_mri", "steps": 2,
                                                      "seed": 1})
            segment_as_generator = client.post("/segment", data={"model": "synthesizer"}, files={
                "file": ("p.png", encode_mask_png(mask), "image/png")})
        served = png_array(body["image_png_base64"])
        assert body["model"]["registry"] == f"synthesizer:{info.version}" == "synthesizer:1"
        assert body["model"]["trained_by"] == "genseg" and body["model"]["version"] == manifest["version"]
        assert body["model"]["consistency_dice"] == manifest["source"]["consistency"]["dice"]
        own = offline.generate(mask[None])[0]
        stage_one = load_pix2pix_pipeline("default").generate(mask[None])[0]
        assert served.shape == own.shape == (80, 80)
        assert np.abs(served.astype(int) - own.astype(int)).max() <= TOLERANCE
        assert np.abs(served.astype(float) - stage_one).mean() > 20  # not the stage-one generator's image
        assert ready["generation"]["synthesizer"]["registry"] == "synthesizer:1"
        assert generate.status_code == 200, generate.text  # text-to-image still from the generator artifacts
        assert segment_as_generator.status_code == 400, segment_as_generator.text  # a generator is no segmenter
        assert segment_as_generator.json()["field"] == "model"
        assert "synthesizer:1" in segment_as_generator.json()["error"]

        headers = server.headers()
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        tensor = httpclient.InferInput("MASK", list(mask.shape), "UINT8")
        tensor.set_data_from_numpy(mask.astype(np.uint8))
        result = http.infer("synthesize", [tensor], headers=headers)
        assert result.get_response()["model_version"] == "1"
        np.testing.assert_array_equal(result.as_numpy("IMAGE"), served)

        grpc = grpcclient.InferenceServerClient(server.grpc_address)
        tensor = grpcclient.InferInput("MASK", list(mask.shape), "UINT8")
        tensor.set_data_from_numpy(mask.astype(np.uint8))
        answer = grpc.infer("synthesize", [tensor], headers={"authorization": f"Bearer {server.api_key}"})
        assert answer.get_response().model_version == "1"
        np.testing.assert_array_equal(answer.as_numpy("IMAGE"), served)
    finally:
        server.stop()


def test_without_a_registered_generator_stage_one_is_served(live_server, generator_artifacts):
    mask = _mask(64)
    with live_server.client(timeout=120) as client:
        response = client.post("/synthesize", files={"file": ("m.png", encode_mask_png(mask), "image/png")})
    assert response.status_code == 200, response.text
    model = response.json()["model"]
    assert model["trained_by"] == "pix2pix" and model["registry"] is None
    assert model["version"] == load_manifest(generator_artifacts)["version"]
    stage_one = load_pix2pix_pipeline("default").generate(mask[None])[0]
    served = png_array(response.json()["image_png_base64"])
    assert np.abs(served.astype(int) - stage_one.astype(int)).max() <= TOLERANCE


@pytest.mark.parametrize("reference", ["synthesizer@staging", "synthesizer:7", "painter", "./no/such/dir"])
def test_a_bad_reference_stops_the_server_at_start_naming_the_setting(genseg, service_artifacts, tmp_path,
                                                                       reference):
    from tests.support.service_fixtures import start_server

    env, _ = _register(genseg, tmp_path)
    server = start_server(service_artifacts.art_dir, tmp_path, env=env | {"MEDREFINE_SYNTHESIZER": reference,
                                                                          "MEDREFINE_GENERATORS": "off"},
                          wait=False)
    try:
        code = server.process.wait(120)
    except subprocess.TimeoutExpired:
        server.stop(10)
        raise
    log = server.log()
    assert code == 2, log
    assert "cannot serve: MEDREFINE_SYNTHESIZER (--synthesizer)" in log and repr(reference) in log, log


# --------------------------------------------------------------------------- in process


def test_an_artifact_directory_setting_serves_it_without_a_registry(genseg, offline, tmp_path):
    from inference.synthesizer import load_served_generators
    from medplatform.synthesizer import choose_synthesizer
    from service.generation import GenerationRuntime
    from service.settings import ServiceSettings

    choice = choose_synthesizer(str(genseg[1]), env={"MEDREFINE_DATA_DIR": str(tmp_path / "var")})
    assert choice is not None and choice.name is None
    generators = load_served_generators(None, choice, intra_op_threads=1)
    assert generators is not None and generators.text2image is None  # /generate is off, /synthesize on
    mask = _mask(48)

    async def body():
        runtime = GenerationRuntime(generators, ServiceSettings())
        await runtime.start()
        try:
            return await runtime.synthesize(mask)
        finally:
            await runtime.drain(10)

    served = asyncio.run(body()).image
    assert np.abs(served.astype(int) - offline.generate(mask[None])[0].astype(int)).max() <= TOLERANCE
    assert generators.info["synthesizer"] | {"version": None} == {
        "version": None, "trained_by": "genseg", "registry": None,
        "consistency_dice": load_manifest(genseg[1])["source"]["consistency"]["dice"]}


def test_auto_serves_stage_one_until_a_production_alias_exists(genseg, tmp_path):
    from medplatform.synthesizer import choose_synthesizer

    env = {"MEDREFINE_DATA_DIR": str(tmp_path / "var"), "BENTOML_HOME": str(tmp_path / "bentoml")}
    assert choose_synthesizer("auto", env) is None  # no database: nothing looked up, nothing created
    assert not (tmp_path / "var").exists()
    env, info = _register(genseg, tmp_path, alias=None)
    assert choose_synthesizer("auto", env) is None  # registered, but not promoted
    assert choose_synthesizer("off", env) is None
    chosen = choose_synthesizer("synthesizer:1", env)
    assert (chosen.name, chosen.version, chosen.reference) == ("synthesizer", 1, "synthesizer:1")
    from medplatform.context import open_platform

    open_platform(env).registry.set_alias("synthesizer", "production", info.version)
    assert choose_synthesizer("auto", env).reference == "synthesizer:1"


def test_a_segmentation_model_is_not_a_synthesizer(service_artifacts, tmp_path):
    from medplatform.context import open_platform
    from medplatform.synthesizer import choose_synthesizer

    env = {"MEDREFINE_DATA_DIR": str(tmp_path / "var"), "BENTOML_HOME": str(tmp_path / "bentoml")}
    with pytest.raises(ArtifactError, match=r"MEDREFINE_SYNTHESIZER .*pix2pix block"):
        choose_synthesizer(str(service_artifacts.art_dir), env=env)
    registry = open_platform(env).registry
    registry.register(service_artifacts.run_dir, service_artifacts.art_dir, name="tiny")
    assert registry.resolve("tiny", 1).family == "segmentation"
    with pytest.raises(ArtifactError, match=r"MEDREFINE_SYNTHESIZER .*tiny:1 is a segmentation model"):
        choose_synthesizer("tiny:1", env=env)
