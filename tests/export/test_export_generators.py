"""`python -m export generators`: the generator graphs, their manifest, verification, and the ONNX-backed
pipelines (inference/generator_artifacts.py) against the torch ones on the committed default generators."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.phantoms import breast_ultrasound, chest_xray
from core.text_encoders import TextEncoderError, resolve_text_encoder
from export import generators as generators_mod
from export.__main__ import main
from export.generators import VAE_DECODER_BOUNDS, export_generator_artifacts
from export.parity import BOUNDS, ParityError
from inference.generation import load_pix2pix_pipeline, load_text2image_pipeline
from inference.generator_artifacts import OnnxDenoiser, OnnxTextEncoder, load_generators
from inference.manifest import (
    FORMAT,
    ArtifactError,
    compute_version,
    load_manifest,
    sha256_file,
    write_manifest,
)
from weights.generators import GENERATORS_DIR

GRAPHS = {"pix2pix", "text_encoder", "denoiser", "vae_decoder", "selector"}
GRAPH_BOUNDS = {**BOUNDS, "vae_decoder": VAE_DECODER_BOUNDS}
PROMPTS = ["chest x-ray, left lower lobe nodule", "Brain MRI (T2): GLIOMA, right frontal!", "fundus photograph",
           "oct retina; drusen?"]
MODALITIES = ["chest_xray", "brain_mri", "fundus", "oct"]
NEGATIVES = ["blurry, low quality", "", "noise; artifacts", "MOTION artifact"]
# Pipeline-level bounds. Measured on CPU (ONNX Runtime 1.32, torch 2.13): text2image float images 2.7e-7
# apart after 10 DDIM steps with guidance, identical uint8; pix2pix float 4e-6, uint8 at most 1 gray level
# (a value on a rounding edge). A bug moves images by tens of gray levels.
MAX_FLOAT_DIFF = 1e-4
MAX_GRAY_DIFF = 1



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def art(generator_artifacts) -> Path:
    """The committed default generators, exported once per session (``export_generator_artifacts``)."""
    return generator_artifacts


@pytest.fixture(scope="module")
def onnx_gen(art):
    return load_generators(art, intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_t2i():
    return load_text2image_pipeline("default")


@pytest.fixture
def art_copy(art, tmp_path) -> Path:
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    return copy


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _gray_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --------------------------------------------------------------------------- the artifact directory
def test_manifest_fields(art):
    manifest = load_manifest(art)
    assert manifest["format"] == FORMAT and manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert set(manifest["graphs"]) == GRAPHS
    source = manifest["source"]
    assert source["kind"] == "generators" and source["generators_dir"] == str(GENERATORS_DIR.resolve())
    assert set(source["runs"]) == {"text2image", "pix2pix", "selector"}
    for name, run in source["runs"].items():
        record = json.loads((GENERATORS_DIR / name / "run.json").read_text())
        assert run["run_dir"] == str((GENERATORS_DIR / name).resolve())
        assert run["weights_sha256"] == record["weights_sha256"]
    pipeline = manifest["pipeline"]
    t2i_record = json.loads((GENERATORS_DIR / "text2image" / "run.json").read_text())
    assert pipeline["kind"] == "generators"
    assert pipeline["text2image"]["config"] == t2i_record["config"]["text2image"]
    assert pipeline["text2image"]["text_encoder"] == {"name": "minilm", "dim": 384, "max_tokens": 24}
    assert pipeline["pix2pix"]["config"]["image_size"] == 128 and pipeline["selector"]["config"]["image_size"] == 32
    tokenizer = manifest["assets"]["tokenizer"]
    assert tokenizer["file"] == "tokenizer/tokenizer.json"
    assert tokenizer["sha256"] == sha256_file(art / tokenizer["file"])
    assert (art / tokenizer["file"]).read_bytes() == (resolve_text_encoder("minilm") / "tokenizer.json").read_bytes()
    hashes = {n: g["sha256"] for n, g in manifest["graphs"].items()}
    assert all(sha256_file(art / f"{n}.onnx") == h for n, h in hashes.items())
    assert manifest["version"] == compute_version(hashes, pipeline, {"tokenizer": tokenizer["sha256"]})
    assert manifest["version"] != compute_version(hashes, pipeline)  # the tokenizer is part of the version
    io = {n: ([(t["name"], t["shape"], t["dtype"]) for t in g["inputs"]],
              [(t["name"], t["shape"], t["dtype"]) for t in g["outputs"]]) for n, g in manifest["graphs"].items()}
    assert io["pix2pix"] == ([("mask", ["batch", 1, 128, 128], "float32")],
                             [("image", ["batch", 1, 128, 128], "float32")])
    assert io["text_encoder"] == ([("input_ids", ["batch", 24], "int64"), ("attention_mask", ["batch", 24], "int64")],
                                  [("text_hidden", ["batch", 24, 384], "float32")])
    assert io["denoiser"] == ([("noisy", ["batch", 4, 16, 16], "float32"), ("timestep", ["batch"], "int64"),
                               ("text_hidden", ["batch", 24, 384], "float32"), ("text_mask", ["batch", 24], "float32"),
                               ("modality_ids", ["batch"], "int64")],
                              [("prediction", ["batch", 4, 16, 16], "float32")])
    assert io["vae_decoder"] == ([("latents", ["batch", 4, 16, 16], "float32")],
                                 [("image", ["batch", 1, 128, 128], "float32")])
    assert io["selector"] == ([("image", ["batch", 1, 32, 32], "float32"), ("modality_ids", ["batch"], "int64")],
                              [("score", ["batch"], "float32")])


def test_parity_is_recorded_within_the_bounds(art):
    manifest = load_manifest(art)
    for name, graph in manifest["graphs"].items():
        parity = graph["parity"]
        assert parity["passed"] is True and parity["bound"] == GRAPH_BOUNDS[name]["fp32"]
        assert 0.0 <= parity["max_abs_err"] <= parity["bound"], name
        assert parity["cases"] == 2 and "random" in parity["inputs"]
    assert manifest["graphs"]["selector"]["parity"]["mask_dice"] == 1.0  # same best-of-N pick
    assert manifest["graphs"]["text_encoder"]["parity"]["inputs"] == "prompts+random"


def test_verify_reruns_parity_from_the_source_runs(art, capsys):
    assert main(["verify", str(art)]) == 0
    out = capsys.readouterr().out
    assert "(parity check)" in out
    for name in GRAPHS:
        assert f"{name}: ok max abs err" in out


def test_verify_falls_back_to_a_structural_check_without_the_source_runs(art_copy, capsys):
    manifest = load_manifest(art_copy)
    manifest["source"]["runs"]["selector"]["run_dir"] = str(art_copy / "gone")
    write_manifest(art_copy, manifest)
    assert main(["verify", str(art_copy)]) == 0
    out = capsys.readouterr().out
    assert f"structural check only: source run 'selector' ({art_copy / 'gone'}) is not available" in out
    assert "(structural check)" in out and all(f"{n}: ok" in out for n in GRAPHS)


@pytest.mark.parametrize("file", ["denoiser.onnx", "tokenizer/tokenizer.json"])
def test_a_flipped_byte_fails_verify_and_load_naming_the_file(art_copy, file, capsys):
    path = art_copy / file
    _flip_byte(path)
    assert main(["verify", str(art_copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: sha256 mismatch")
    with pytest.raises(ArtifactError, match=f"^{path}: sha256 mismatch"):
        load_generators(art_copy)


def test_load_errors_name_the_file(art_copy, tmp_path):
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'none'}: artifact directory does not exist"):
        load_generators(tmp_path / "none")
    (art_copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: missing \(asset 'tokenizer'"):
        load_generators(art_copy)
    manifest = load_manifest(art_copy)
    manifest["pipeline"] = {"threshold": 0.5}  # a segmentation manifest's pipeline
    write_manifest(art_copy, manifest)
    with pytest.raises(ArtifactError, match=r"manifest\.json: pipeline\.kind is None, expected 'generators'"):
        load_generators(art_copy, verify=False)


def test_cli_bad_model_path_is_one_line_exit_1(tmp_path, capsys):
    missing = tmp_path / "no-such-generators"
    assert main(["generators", "--model", str(missing), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {missing}: generators directory does not exist")
    assert not (tmp_path / "out").exists()


def _generators_dir(tmp_path: Path, *runs: str) -> Path:
    root = tmp_path / "generators"
    for name in runs:
        shutil.copytree(GENERATORS_DIR / name, root / name)
    return root


def test_absent_runs_are_skipped_and_a_wrapper_bug_writes_nothing(tmp_path, monkeypatch, capsys):
    root = _generators_dir(tmp_path, "pix2pix", "selector")
    out = tmp_path / "art"
    assert main(["generators", "--model", str(root), "--out", str(out)]) == 0
    assert "2 graphs (pix2pix, selector)" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert set(manifest["graphs"]) == {"pix2pix", "selector"} and "assets" not in manifest
    assert set(manifest["pipeline"]) == {"kind", "pix2pix", "selector"}
    loaded = load_generators(out, intra_op_threads=1)
    assert loaded.text2image is None and loaded.pix2pix is not None
    assert loaded.info["image_sizes"] == {"pix2pix": 128} and loaded.version == manifest["version"]
    # a selector wrapper that forgets the realness term fails parity; the previous export stays
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(generators_mod.ScorerGraph, "forward",
                        lambda self, image, ids: torch.log_softmax(self.scorer(image).modality_logits, 1)
                        .gather(1, ids[:, None])[:, 0])
    with pytest.raises(ParityError, match="graph 'selector' .* exceeds the bound"):
        export_generator_artifacts(root, out)
    assert (out / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".art.staging-*"))


# --------------------------------------------------------------------------- the ONNX-backed pipelines
def test_tokenizer_ids_equal_the_hugging_face_tokenizer(onnx_gen, torch_t2i):
    hf = torch_t2i.text_encoder.encoder  # CachedTextEncoder -> HFTextEncoder
    onnx_te = onnx_gen.text2image.text_encoder
    assert isinstance(onnx_te, OnnxTextEncoder) and (onnx_te.dim, onnx_te.max_tokens) == (hf.dim, hf.max_tokens)
    long = "chest x-ray, " + "bilateral diffuse reticular opacities " * 6
    prompts = [*PROMPTS, "", "   ", "CT ABDOMEN, Contrast-Enhanced!!!", "café naïve résumé, 12.5mm", "x" * 80, long]
    ids, mask = onnx_te.tokenize(prompts)
    want = hf.tokenizer(prompts, padding="max_length", max_length=hf.max_tokens, truncation=True)
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["attention_mask"]
    assert [onnx_te.count_tokens(p) for p in prompts] == [hf.count_tokens(p) for p in prompts]
    assert onnx_te.count_tokens(long) > hf.max_tokens
    with pytest.raises(TextEncoderError, match="needs .* tokens; the text encoder takes at most 24"):
        onnx_te.encode([long])
    hidden, mask = onnx_te.encode(PROMPTS)
    want_hidden, want_mask = hf.encode(PROMPTS)
    assert torch.equal(mask, want_mask)
    assert (hidden - want_hidden)[mask].abs().max().item() < 1e-4


def test_onnx_denoiser_follows_the_model(onnx_gen, torch_t2i):
    denoiser = onnx_gen.text2image.model
    assert denoiser.null_modality == torch_t2i.model.null_modality == 5
    assert torch.equal(denoiser.modality_ids(MODALITIES), torch_t2i.model.modality_ids(MODALITIES))
    with pytest.raises(ValueError, match="unknown modality 'xray'"):
        denoiser.modality_ids(["xray"])
    assert onnx_gen.info["modalities"] == list(torch_t2i.modalities)
    assert onnx_gen.info["image_sizes"] == {"text2image": 128, "pix2pix": 128} and onnx_gen.info["selector"] is True
    assert onnx_gen.info["text2image_space"] == "latent"


def test_a_latent_manifest_without_its_decoder_graph_is_refused(art_copy):
    manifest = load_manifest(art_copy)
    del manifest["graphs"]["vae_decoder"]
    write_manifest(art_copy, manifest)
    with pytest.raises(ArtifactError, match="latent diffusion and needs graph 'vae_decoder'"):
        load_generators(art_copy, verify=False)


def test_a_pixel_space_denoiser_decodes_without_a_decoder_graph(torch_t2i):
    from models.text2image import TEXT2IMAGE_PRESETS

    pixel, latent = TEXT2IMAGE_PRESETS["pixel32"], torch_t2i.model.config  # old artifacts hold pixel configs
    samples = torch.tensor([[[[-1.5, -1.0], [0.0, 0.5]]]])
    assert torch.equal(OnnxDenoiser(None, pixel).decode(samples), torch.tensor([[[[0.0, 0.0], [0.5, 0.75]]]]))
    with pytest.raises(ArtifactError, match="latent-space denoiser needs vae_decoder"):
        OnnxDenoiser(None, latent)
    with pytest.raises(ArtifactError, match="pixel-space denoiser takes no vae_decoder"):
        OnnxDenoiser(None, pixel, decoder=object())


def test_text2image_on_onnx_matches_torch(onnx_gen, torch_t2i):
    """The key test: the same prompts, modalities, negative prompts, seed, 10 steps, guidance 1.5."""
    kwargs = {"negative_prompts": NEGATIVES, "guidance_scale": 1.5, "steps": 10, "seed": 11, "num_images": 2}
    ours = onnx_gen.text2image.sample(PROMPTS, MODALITIES, **kwargs)
    theirs = torch_t2i.sample(PROMPTS, MODALITIES, **kwargs)
    assert ours.shape == theirs.shape == (8, 1, 128, 128)
    assert (ours - theirs).abs().max().item() <= MAX_FLOAT_DIFF
    gray = onnx_gen.text2image.generate(PROMPTS, MODALITIES, **kwargs)
    assert _gray_diff(gray, torch_t2i.generate(PROMPTS, MODALITIES, **kwargs)) <= MAX_GRAY_DIFF
    assert gray.std() > 10  # real images, not a constant


def test_best_of_n_picks_the_same_candidate(onnx_gen, torch_t2i):
    kwargs = {"negative_prompts": NEGATIVES, "guidance_scale": 1.5, "steps": 10, "seed": 3}
    candidates = torch_t2i.sample(PROMPTS, MODALITIES, num_images=4, **kwargs)
    ids = torch_t2i.model.modality_ids(MODALITIES).repeat_interleave(4)
    ours = onnx_gen.text2image.selector.score(candidates, ids).view(4, 4)
    theirs = torch_t2i.selector.score(candidates, ids).view(4, 4)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert (ours - theirs).abs().max().item() < 1e-4
    images, scores = onnx_gen.text2image.generate_best_of(PROMPTS, MODALITIES, candidates=4, **kwargs)
    want_images, want_scores = torch_t2i.generate_best_of(PROMPTS, MODALITIES, candidates=4, **kwargs)
    assert _gray_diff(images, want_images) <= MAX_GRAY_DIFF
    assert np.abs(scores - want_scores).max() < 1e-4
    # the selector graph is at 32 px: other sizes are resized as Selector.forward does
    big = torch.nn.functional.interpolate(candidates[:4], size=(48, 48), mode="bilinear", align_corners=False)
    assert (
        onnx_gen.text2image.selector.score(big, ids[:4]) - torch_t2i.selector.score(big, ids[:4])
    ).abs().max() < 1e-4


def test_a_reward_run_is_exported_and_scores_like_torch(reward_generator_artifacts, torch_t2i):
    from weights.reward import load_reward

    manifest = load_manifest(reward_generator_artifacts)
    assert {"reward", "selector", "denoiser"} <= set(manifest["graphs"]) and "reward" in manifest["pipeline"]
    assert manifest["graphs"]["reward"]["parity"]["max_abs_err"] <= BOUNDS["reward"]["fp32"]
    loaded = load_generators(reward_generator_artifacts, intra_op_threads=1)
    assert loaded.info["reward"] is True and loaded.reward is not None
    torch_reward = load_reward(manifest["source"]["runs"]["reward"]["run_dir"])
    candidates = torch_t2i.sample(PROMPTS, MODALITIES, steps=4, seed=5, num_images=3)
    ids = torch_t2i.model.modality_ids(MODALITIES).repeat_interleave(3)
    big = torch.nn.functional.interpolate(candidates, size=(48, 48), mode="bilinear", align_corners=False)
    for images in (candidates, big):  # 128 px generated, 48 px: both resized to the selector's 32 px
        ours, theirs = loaded.reward.score(images, ids), torch_reward.score(images, ids)
        assert (ours - theirs).abs().max().item() < 1e-4
        assert torch.equal(ours.view(4, 3).argmax(1), theirs.view(4, 3).argmax(1))
    assert ((theirs > 1.0) & (theirs < 5.0)).all()


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_pix2pix_on_onnx_matches_torch(onnx_gen, size):
    h, w = size
    masks = np.stack([breast_ultrasound(5, 160)[1], chest_xray(6, 160)[1], np.zeros((160, 160), np.uint8)])
    masks = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=(h, w))[:, 0].numpy()
    masks = (masks > 0).astype(np.uint8) * 255
    reference = load_pix2pix_pipeline("default")
    ours, theirs = onnx_gen.pix2pix.sample(masks), reference.sample(masks)
    assert ours.shape == theirs.shape == (3, 1, h, w)
    assert (ours - theirs).abs().max().item() <= MAX_FLOAT_DIFF
    assert _gray_diff(onnx_gen.pix2pix.generate(masks), reference.generate(masks)) <= MAX_GRAY_DIFF
