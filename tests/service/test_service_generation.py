"""Generation served: /generate and /synthesize over REST, models ``generate`` and ``synthesize`` over
OIP-HTTP and gRPC (stock tritonclient), the generation queue's batching, seeds and 4xx answers.

The committed default generators (checkpoints/generators) are exported once per session
(``generator_artifacts``) and served by the session's ``live_server``; the in-process tests run the
same artifacts through ``service.generation.GenerationRuntime`` directly.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from core.imageio import encode_png
from core.phantoms import breast_ultrasound
from inference.generation import load_pix2pix_pipeline, load_text2image_pipeline
from service.errors import BadRequest, NotFound
from service.generation import GenerationRuntime
from service.settings import ServiceSettings

PROMPT = {"prompt": "chest x-ray, left lower lobe nodule", "modality": "chest_xray"}


def png_array(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def generators(generator_artifacts):
    from inference.generator_artifacts import load_generators

    return load_generators(generator_artifacts, intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_text2image():
    return load_text2image_pipeline("default")


def run_async(coro):
    return asyncio.run(coro)


async def _with_runtime(generators, body, **settings):
    runtime = GenerationRuntime(generators, ServiceSettings(**settings))
    await runtime.start()
    try:
        return await body(runtime)
    finally:
        await runtime.drain(10)


# --------------------------------------------------------------------------- in process


def test_served_images_match_the_offline_torch_pipeline(generators, torch_text2image):
    async def body(runtime):
        return await runtime.generate(["brain mri, glioma"], ["brain_mri"], negative_prompts=["noise"],
                                      guidance_scale=2.0, steps=8, seed=11, num_images=2)

    served = run_async(_with_runtime(generators, body))
    offline = torch_text2image.generate(["brain mri, glioma"], ["brain_mri"], negative_prompts=["noise"],
                                        guidance_scale=2.0, steps=8, seed=11, num_images=2)
    assert served.images.shape == offline.shape == (2, 128, 128) and served.images.dtype == np.uint8
    assert served.seed == 11
    diff = np.abs(served.images.astype(int) - offline.astype(int))
    assert diff.max() <= 2, diff.max()  # ONNX Runtime vs torch over 8 DDIM steps


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(generators):
    requests = [(["chest ct, emphysema"], ["chest_ct"], 3), (["retinal oct, drusen"], ["oct"], 4),
                (["fundus photograph, normal fundus"], ["fundus"], 5), (["brain mri"], ["brain_mri"], 6)]

    async def body(runtime):
        before = runtime.batcher.batches_run
        together = await asyncio.gather(*(runtime.generate(p, m, steps=5, seed=s) for p, m, s in requests))
        batches = runtime.batcher.batches_run - before
        alone = [await runtime.generate(p, m, steps=5, seed=s) for p, m, s in requests]
        return together, alone, batches

    together, alone, batches = run_async(_with_runtime(generators, body, max_latency_ms=200))
    assert batches < len(requests)  # at least two requests shared a denoising loop
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
    assert not np.array_equal(together[0].images, together[1].images)


def test_seed_is_drawn_returned_and_reproduces(generators):
    async def body(runtime):
        first = await runtime.generate(["chest ct"], ["chest_ct"], steps=4)
        again = await runtime.generate(["chest ct"], ["chest_ct"], steps=4, seed=first.seed)
        other = await runtime.generate(["chest ct"], ["chest_ct"], steps=4, seed=first.seed + 1)
        return first, again, other

    first, again, other = run_async(_with_runtime(generators, body))
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)


def test_best_of_returns_the_selector_choice(generators, torch_text2image):
    async def body(runtime):
        return await runtime.generate(["retinal oct, drusen"], ["oct"], steps=6, seed=2, best_of=4)

    served = run_async(_with_runtime(generators, body))
    images, scores = torch_text2image.generate_best_of(["retinal oct, drusen"], ["oct"], candidates=4, steps=6, seed=2)
    assert served.images.shape == (1, 128, 128) and served.scores.shape == (1,)
    assert np.abs(served.images.astype(int) - images.astype(int)).max() <= 2
    assert abs(float(served.scores[0]) - float(scores[0])) < 1e-2


def test_best_of_ranked_by_the_reward_model_returns_its_choice(reward_generator_artifacts, torch_text2image):
    """Generator artifacts exported after RLHF carry the reward model: ``rank_by="reward"`` keeps the candidate
    it rates highest (the torch reward model on the torch pipeline's candidates), ``"selector"`` the selector's."""
    import torch

    from inference.generator_artifacts import load_generators
    from inference.manifest import load_manifest
    from weights.reward import load_reward

    generators = load_generators(reward_generator_artifacts, intra_op_threads=1)
    reward = load_reward(load_manifest(reward_generator_artifacts)["source"]["runs"]["reward"]["run_dir"])
    prompt, modality = ["retinal oct, drusen"], ["oct"]

    async def body(runtime):
        by_reward = await runtime.generate(prompt, modality, steps=6, seed=2, best_of=4, rank_by="reward")
        by_selector = await runtime.generate(prompt, modality, steps=6, seed=2, best_of=4, rank_by="selector")
        return by_reward, by_selector, runtime.info()

    by_reward, by_selector, info = run_async(_with_runtime(generators, body))
    assert info["rank_by"] == ["selector", "reward"]
    candidates = torch_text2image.sample(prompt, modality, steps=6, seed=2, num_images=4)
    with torch.no_grad():
        ratings = reward.score(candidates, reward.modality_ids(modality * 4))
    gray = np.round(candidates[:, 0].numpy() * 255.0).astype(int)
    assert by_reward.ranked_by == "reward" and by_selector.ranked_by == "selector"
    assert np.abs(by_reward.images[0].astype(int) - gray[int(ratings.argmax())]).max() <= 2
    assert abs(float(by_reward.scores[0]) - float(ratings.max())) < 1e-3 and 1.0 < by_reward.scores[0] < 5.0
    _, selector_scores = torch_text2image.generate_best_of(prompt, modality, candidates=4, steps=6, seed=2)
    assert abs(float(by_selector.scores[0]) - float(selector_scores[0])) < 1e-2


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        ({"modalities": ["pet"]}, "modalities", "unknown modality 'pet'"),
        ({"steps": 0}, "steps", "steps"),
        ({"steps": 101}, "steps", "[1, 100]"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "guidance_scale"),
        ({"guidance_scale": 31.0}, "guidance_scale", "guidance_scale"),
        ({"num_images": 17}, "num_images", "num_images"),
        ({"prompts": ["word " * 40]}, "prompts", "tokens"),
        ({"prompts": ["x" * 301]}, "prompts", "characters"),
        ({"prompts": ["  "]}, "prompts", "empty"),
        ({"seed": -1}, "seed", "seed"),
        ({"best_of": 2, "num_images": 2}, "best_of", "best_of"),
        ({"best_of": 0}, "candidates", "candidates"),
        ({"best_of": 2, "rank_by": "reward"}, "rank_by", "needs a reward model"),
        ({"best_of": 2, "rank_by": "Reward"}, "rank_by", "expected one of ['selector', 'reward']"),
        ({"rank_by": "selector"}, "rank_by", "without best_of"),
    ],
)
def test_bad_arguments_are_400_naming_the_field(generators, kwargs, field, needle):
    args = {"prompts": ["chest ct"], "modalities": ["chest_ct"], "steps": 3} | kwargs
    prompts, modalities = args.pop("prompts"), args.pop("modalities")

    async def body(runtime):
        with pytest.raises(BadRequest) as info:
            await runtime.generate(prompts, modalities, **args)
        return info.value

    error = run_async(_with_runtime(generators, body))
    assert error.code == 400 and error.field == field and needle in error.message


def test_synthesize_keeps_the_mask_size_and_matches_offline(generators):
    _, mask = breast_ultrasound(3, size=96)
    offline = load_pix2pix_pipeline("default").generate(mask[None, :90, :70])[0]

    async def body(runtime):
        return await asyncio.gather(runtime.synthesize(mask[:90, :70] * 255), runtime.synthesize(mask))

    cropped, full = run_async(_with_runtime(generators, body))
    assert cropped.image.shape == (90, 70) and full.image.shape == (96, 96)
    assert np.abs(cropped.image.astype(int) - offline.astype(int)).max() <= 2


def test_missing_generators_are_404(generators):
    from dataclasses import replace

    async def body(runtime):
        with pytest.raises(NotFound, match="mask-to-image"):
            await runtime.synthesize(np.ones((8, 8), np.uint8))
        return True

    assert run_async(_with_runtime(replace(generators, pix2pix=None), body))


# --------------------------------------------------------------------------- over the wire


def test_rest_generate_and_synthesize(live_server):
    with live_server.client() as client:
        response = client.post("/generate", json=PROMPT | {"num_images": 2, "steps": 6, "seed": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["seed"] == 5 and (body["width"], body["height"]) == (128, 128)
        images = [png_array(b) for b in body["images_png_base64"]]
        assert len(images) == 2 and images[0].shape == (128, 128) and not np.array_equal(images[0], images[1])
        again = client.post("/generate", json=PROMPT | {"num_images": 2, "steps": 6, "seed": 5}).json()
        assert again["images_png_base64"] == body["images_png_base64"]  # same seed, same images

        _, mask = breast_ultrasound(1, size=80)
        files = {"file": ("mask.png", encode_png(mask * 255), "image/png")}
        response = client.post("/synthesize", files=files)
        assert response.status_code == 200, response.text
        assert png_array(response.json()["image_png_base64"]).shape == (80, 80)


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": PROMPT | {"modality": "pet"}}, 400, "modality"),
        ({"json": PROMPT | {"steps": 0}}, 400, "steps"),
        ({"json": PROMPT | {"guidance_scale": 1000}}, 400, "guidance_scale"),
        ({"json": PROMPT | {"prompt": "word " * 80}}, 400, "prompt"),
        ({"json": PROMPT | {"steps": "many"}}, 400, "steps"),
        ({"json": {"modality": "chest_xray"}}, 400, "prompt"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
        ({"data": {"prompt": "chest x-ray"}}, 415, None),
    ],
)
def test_rest_generate_bad_input_is_4xx_json(live_server, kwargs, status, field):
    with live_server.client() as client:
        response = client.post("/generate", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field"} and body["error"]
    if field is not None:
        assert body["field"] == field


def test_rest_generation_needs_the_api_key(live_server):
    response = httpx.post(live_server.url + "/generate", json=PROMPT, timeout=30)
    assert response.status_code == 401
    response = httpx.post(live_server.url + "/synthesize", files={"file": ("m.png", b"x", "image/png")}, timeout=30)
    assert response.status_code == 401


def test_rest_synthesize_rejects_a_non_image(live_server):
    with live_server.client() as client:
        response = client.post("/synthesize", files={"file": ("mask.png", b"not an image", "image/png")})
    assert response.status_code in (400, 415) and response.json()["field"] == "file"


def _generate_inputs(client_module) -> list:
    """PROMPT, MODALITY (two prompts), STEPS 5, SEED 9 as ``client_module.InferInput`` (http or grpc)."""
    arrays = {"PROMPT": np.array([b"chest x-ray, nodule", b"brain mri, glioma"], dtype=object),
              "MODALITY": np.array([b"chest_xray", b"brain_mri"], dtype=object),
              "STEPS": np.array([5], np.int32), "SEED": np.array([9], np.int64)}
    types = {"PROMPT": "BYTES", "MODALITY": "BYTES", "STEPS": "INT32", "SEED": "INT64"}
    inputs = []
    for name, array in arrays.items():
        tensor = client_module.InferInput(name, list(array.shape), types[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_oip_generate_and_synthesize_with_stock_clients(live_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    headers = live_server.headers()
    http = httpclient.InferenceServerClient(live_server.url.removeprefix("http://"))
    assert http.is_model_ready("generate", headers=headers) and http.is_model_ready("synthesize", headers=headers)
    meta = http.get_model_metadata("generate", headers=headers)
    assert [i["name"] for i in meta["inputs"]][:2] == ["PROMPT", "MODALITY"]
    result = http.infer("generate", _generate_inputs(httpclient), headers=headers)
    images = result.as_numpy("IMAGE")
    assert images.shape == (2, 128, 128) and images.dtype == np.uint8 and result.as_numpy("SEED").tolist() == [9]

    grpc = grpcclient.InferenceServerClient(live_server.grpc_address)
    headers = {"authorization": f"Bearer {live_server.api_key}"}  # the http client added its own keys to the other
    grpc_images = grpc.infer("generate", _generate_inputs(grpcclient), headers=headers).as_numpy("IMAGE")
    np.testing.assert_array_equal(grpc_images, images)  # same seed, same images on both transports

    _, mask = breast_ultrasound(2, size=64)
    mask_input = grpcclient.InferInput("MASK", [64, 64], "UINT8")
    mask_input.set_data_from_numpy(mask.astype(np.uint8))
    synthesized = grpc.infer("synthesize", [mask_input], headers=headers).as_numpy("IMAGE")
    assert synthesized.shape == (64, 64) and synthesized.dtype == np.uint8


def test_oip_generate_bad_input_names_the_tensor(live_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    grpc = grpcclient.InferenceServerClient(live_server.grpc_address)
    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"chest x-ray"], dtype=object))
    modality = grpcclient.InferInput("MODALITY", [1], "BYTES")
    modality.set_data_from_numpy(np.array([b"ultrasound"], dtype=object))
    with pytest.raises(InferenceServerException, match="MODALITY.*unknown modality 'ultrasound'|unknown modality"):
        grpc.infer("generate", [prompt, modality], headers={"authorization": f"Bearer {live_server.api_key}"})
    steps = grpcclient.InferInput("STEPS", [1], "INT32")
    steps.set_data_from_numpy(np.array([0], np.int32))
    modality.set_data_from_numpy(np.array([b"chest_xray"], dtype=object))
    with pytest.raises(InferenceServerException, match="STEPS: 0; expected"):
        grpc.infer("generate", [prompt, modality, steps], headers={"authorization": f"Bearer {live_server.api_key}"})


def test_oip_best_of_is_rest_best_of(live_server):
    """``BEST_OF`` over OIP keeps the same candidate, with the same score, as REST's ``best_of``; ``RANK_BY``
    ``reward`` on generators without a reward model is refused naming ``RANK_BY``."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    request = {"steps": 5, "seed": 21, "best_of": 3, "rank_by": "selector"}
    with live_server.client() as client:
        rest = client.post("/generate", json=PROMPT | request).json()
    arrays = {"PROMPT": (np.array([PROMPT["prompt"].encode()], dtype=object), "BYTES"),
              "MODALITY": (np.array([PROMPT["modality"].encode()], dtype=object), "BYTES"),
              "STEPS": (np.array([5], np.int32), "INT32"), "SEED": (np.array([21], np.int64), "INT64"),
              "BEST_OF": (np.array([3], np.int32), "INT32"),
              "RANK_BY": (np.array([b"selector"], dtype=object), "BYTES")}

    def inputs(**override):
        tensors = []
        for name, value in (arrays | override).items():
            if value is None:  # left out
                continue
            array, datatype = value
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    http = httpclient.InferenceServerClient(live_server.url.removeprefix("http://"))
    result = http.infer("generate", inputs(), headers=live_server.headers())
    assert result.as_numpy("IMAGE").shape == (1, 128, 128)
    np.testing.assert_array_equal(result.as_numpy("IMAGE")[0], png_array(rest["images_png_base64"][0]))
    assert result.as_numpy("SCORE").tolist() == pytest.approx(rest["scores"], abs=1e-6)
    plain = http.infer("generate", inputs(BEST_OF=None, RANK_BY=None), headers=live_server.headers())
    assert plain.as_numpy("IMAGE").shape == (1, 128, 128) and plain.as_numpy("SCORE").shape == (0,)
    with pytest.raises(InferenceServerException, match="RANK_BY: 'reward' needs a reward model"):
        http.infer("generate", inputs(RANK_BY=(np.array([b"reward"], dtype=object), "BYTES")),
                   headers=live_server.headers())
    with pytest.raises(InferenceServerException, match="BEST_OF: 0; expected an integer"):
        http.infer("generate", inputs(BEST_OF=(np.array([0], np.int32), "INT32")), headers=live_server.headers())


def test_generation_metrics_are_exported(live_server):
    with live_server.client() as client:
        client.post("/generate", json=PROMPT | {"steps": 3, "seed": 1})
        text = client.get("/metrics").text
    assert "medrefine_generation_batch_size_count" in text
    assert 'endpoint="generate"' in text


def test_generation_bench_offline_step(generator_artifacts):
    from loadtest.generation_bench import offline_throughput

    result = offline_throughput(generator_artifacts, concurrency=[1, 3], steps=2, threads=1, duration_s=0.05)
    assert set(result) == {"1", "3"}
    assert all(r["images_per_s"] > 0 and r["calls"] >= 1 for r in result.values())
