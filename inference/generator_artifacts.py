"""Load a generator artifact directory (``python -m export generators``) for serving on ONNX Runtime: the
``inference.generation`` pipelines fed ONNX-backed stand-ins for their torch modules (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from inference.artifacts import GraphFile, _graph_file
from inference.generation import Pix2PixPipeline, Text2ImagePipeline
from inference.manifest import MANIFEST_NAME, ArtifactError, check_hashes, load_manifest

if TYPE_CHECKING:
    from inference.protocols import ImageScorer
    from models.pix2pix import Pix2PixConfig
    from models.reward import RewardConfig
    from models.selector import SelectorConfig
    from models.text2image import Text2ImageConfig

_Config = TypeVar("_Config")

__all__ = [
    "Generators",
    "OnnxDenoiser",
    "OnnxPix2Pix",
    "OnnxScorer",
    "OnnxTextEncoder",
    "load_generators",
]

# graphs each pipeline block needs (a latent text2image block also needs LATENT_GRAPH)
BLOCK_GRAPHS = {"text2image": ("text_encoder", "denoiser"), "pix2pix": ("pix2pix",), "selector": ("selector",),
                "reward": ("reward",)}
LATENT_GRAPH = "vae_decoder"


class _OnnxGraph:
    """One ONNX Runtime session over a verified graph: numpy in (cast to the graph's dtypes), torch out."""

    def __init__(self, spec: GraphFile, providers: list[str], options: Any) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(spec.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{spec.path}: ONNX Runtime cannot load graph {spec.name!r} ({exc})") from exc
        dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
        self.inputs = {i.name: dtypes.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.spec = spec

    def __call__(self, **inputs: Any) -> torch.Tensor:
        feed = {name: np.ascontiguousarray(torch.as_tensor(inputs[name]).detach().cpu().numpy(), dtype=dtype)
                for name, dtype in self.inputs.items()}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OnnxDenoiser:
    """Stands in for ``models.text2image.Text2ImageModel`` in :class:`~inference.generation.Text2ImagePipeline`.

    ``__call__(noisy (B, *sample_shape) float32, timesteps (B,) int64, text_hidden (B, T, D) float32, text_mask
    (B, T) bool/{0, 1}, modality_ids (B,) int64) -> prediction (B, *sample_shape) float32``; ``decode(samples)
    -> images (B, 1, S, S)`` in [0, 1] through the ``vae_decoder`` graph (latent models) or a rescale (pixels).
    """

    def __init__(self, graph: _OnnxGraph, config: Text2ImageConfig, decoder: _OnnxGraph | None = None) -> None:
        if (config.latent is None) != (decoder is None):
            raise ArtifactError(f"a {'latent' if config.latent else 'pixel'}-space denoiser "
                                f"{'needs' if config.latent else 'takes no'} vae_decoder graph")
        self.graph, self.config, self.decoder = graph, config, decoder

    @property
    def null_modality(self) -> int:
        return int(self.config.null_modality)

    def modality_ids(self, modalities: list[str]) -> torch.Tensor:
        """Names -> ``(B,) int64`` (``models.text2image.modality_ids``; ValueError naming an unknown one)."""
        from models.text2image import modality_ids

        return modality_ids(self.config, modalities)

    def eval(self) -> OnnxDenoiser:
        return self

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return ((samples + 1.0) * 0.5).clamp(0.0, 1.0)
        return self.decoder(latents=samples)

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
                 text_mask: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        return self.graph(noisy=noisy, timestep=timesteps, text_hidden=text_hidden, text_mask=text_mask.float(),
                          modality_ids=modality_ids)


class OnnxTextEncoder:
    """Stands in for ``core.text_encoders.HFTextEncoder``: ``encode(prompts) -> (hidden (B, T, D) float32,
    mask (B, T) bool)`` with ``T = max_tokens``; ``count_tokens(prompt)`` with special tokens.

    Tokenisation uses the ``tokenizers`` library on the exported ``tokenizer.json``: prompts padded to
    ``max_tokens`` with the file's pad token, exactly as the Hugging Face tokenizer pads them.
    """

    def __init__(self, graph: _OnnxGraph, tokenizer_path: Path, *, name: str, dim: int, max_tokens: int) -> None:
        from tokenizers import Tokenizer

        try:
            counter, tokenizer = Tokenizer.from_file(str(tokenizer_path)), Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises its own exception types
            raise ArtifactError(f"{tokenizer_path}: not a tokenizers tokenizer.json ({exc})") from exc
        padding = tokenizer.padding or {}
        pad_token = str(padding.get("pad_token", "[PAD]"))
        pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token))
        if pad_id is None:
            raise ArtifactError(f"{tokenizer_path}: defines no padding and no {pad_token!r} token")
        counter.no_padding()
        counter.no_truncation()
        tokenizer.enable_padding(length=int(max_tokens), pad_id=int(pad_id), pad_token=pad_token)
        tokenizer.enable_truncation(int(max_tokens))
        self._counter, self._tokenizer = counter, tokenizer
        self.graph, self.name, self.dim, self.max_tokens = graph, name, int(dim), int(max_tokens)

    def count_tokens(self, prompt: str) -> int:
        return len(self._counter.encode(prompt).ids)

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids (B, T) int64, attention_mask (B, T) int64)``, padded (and truncated) to ``max_tokens``."""
        encodings = self._tokenizer.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self.max_tokens)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        return ids, mask

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from core.text_encoders import TextEncoderError

        too_long = [p for p in prompts if self.count_tokens(p) > self.max_tokens]
        if too_long:
            raise TextEncoderError(f"prompt {too_long[0]!r} needs {self.count_tokens(too_long[0])} tokens; the "
                                   f"text encoder takes at most {self.max_tokens}")
        ids, mask = self.tokenize(prompts)
        hidden = self.graph(input_ids=ids, attention_mask=mask)
        return hidden.float(), torch.from_numpy(mask).bool()


class OnnxPix2Pix:
    """Stands in for ``models.pix2pix.Pix2PixGenerator``: ``mask (B, 1, S, S) {0, 1} -> image (B, 1, S, S)``
    in [0, 1] at ``config.image_size`` (Pix2PixPipeline resizes to and from it)."""

    def __init__(self, graph: _OnnxGraph, config: Pix2PixConfig) -> None:
        self.graph, self.config = graph, config

    def eval(self) -> OnnxPix2Pix:
        return self

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        return self.graph(mask=mask)


class OnnxScorer:
    """Stands in for a best-of-N scorer, ``models.selector.Selector`` (graph ``selector``: ``log p(modality) +
    log p(real)``) or ``models.reward.RewardModel`` (graph ``reward``: the predicted 1-5 rating):
    ``score(images (B, 1, H, W) in [0, 1], modality_ids (B,)) -> (B,)``; images are resized to the scorer's
    size first (``models.selector.fit_size``, as ``Selector.forward`` does)."""

    def __init__(self, graph: _OnnxGraph, config: SelectorConfig | RewardConfig) -> None:
        self.graph, self.config = graph, config

    def eval(self) -> OnnxScorer:
        return self

    def score(self, images: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        from models.selector import fit_size

        return self.graph(image=fit_size(images, self.config.image_size), modality_ids=modality_ids)


@dataclass(frozen=True)
class Generators:
    """Loaded generator artifacts: the pipelines (None when the artifacts lack that generator), ``info`` for
    model_info (version, precision, graphs, modalities, image sizes, text encoder, providers), and ``reward``,
    the reward model that can rank best-of-N instead of the selector (None unless exported from an RLHF
    generators directory)."""

    root: Path
    version: str
    text2image: Text2ImagePipeline | None
    pix2pix: Pix2PixPipeline | None
    info: dict[str, Any]
    reward: ImageScorer | None = None


def _config(cls: type[_Config], block: dict[str, Any], key: str, where: Path) -> _Config:
    try:
        return cls.from_dict(dict(block["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: pipeline.{key}.config is not a valid {cls.__name__} ({exc})") from exc


def load_generators(art_dir: str | Path, *, device: str = "cpu", intra_op_threads: int = 0,
                    verify: bool = True) -> Generators:
    """Load a generator artifact directory into ONNX-backed generation pipelines.

    Args:
        art_dir: the directory ``python -m export generators`` wrote.
        device: ``"cpu"`` or ``"cuda"`` (``"tensorrt"`` too): inference.engines' provider presets.
        intra_op_threads: threads inside one operator; 0 = the physical cores.
        verify: re-hash every graph and asset and re-compute the version (leave True outside of tests).

    Raises:
        ArtifactError: missing directory or manifest, not a generator manifest, a missing graph or
            tokenizer, a bad hash or version, a graph that failed export parity, an invalid config.
        ValueError: an unknown device or a provider this onnxruntime build lacks.
    """
    from inference.engines import ort_providers, ort_session_options, physical_cores
    from models.pix2pix import Pix2PixConfig
    from models.reward import RewardConfig
    from models.selector import SelectorConfig
    from models.text2image import Text2ImageConfig

    # 1. Manifest, kind, hashes
    root = Path(art_dir)
    manifest = load_manifest(root)
    where = root / MANIFEST_NAME
    pipeline = manifest["pipeline"]
    if not isinstance(pipeline, dict) or pipeline.get("kind") != "generators":
        kind = pipeline.get("kind") if isinstance(pipeline, dict) else None
        raise ArtifactError(f"{where}: pipeline.kind is {kind!r}, expected 'generators' (this is not a "
                            "directory written by `python -m export generators`)")
    for block, names in BLOCK_GRAPHS.items():
        missing = [n for n in names if block in pipeline and n not in manifest["graphs"]]
        if missing:
            raise ArtifactError(f"{where}: pipeline.{block} needs graph(s) {missing}; the manifest has "
                                f"{sorted(manifest['graphs'])}")
    if "text2image" in pipeline and "tokenizer" not in (manifest.get("assets") or {}):
        raise ArtifactError(f"{where}: pipeline.text2image needs the asset 'tokenizer' (tokenizer/tokenizer.json)")
    if verify:
        check_hashes(root, manifest)
    specs = {name: _graph_file(root, name, entry, str(where)) for name, entry in manifest["graphs"].items()}
    # 2. Sessions
    providers = ort_providers(device)
    threads = int(intra_op_threads) if intra_op_threads else physical_cores()
    options = ort_session_options(threads)
    graphs = {name: _OnnxGraph(spec, providers, options) for name, spec in specs.items()}
    # 3. Pipelines
    text2image = pix2pix = reward = None
    info: dict[str, Any] = {"version": manifest["version"], "precision": manifest.get("precision", "fp32"),
                            "opset": manifest.get("opset"), "providers": providers, "intra_op_threads": threads,
                            "graphs": {n: {"file": s.path.name, "sha256": s.sha256,
                                           "parity_max_abs_err": s.parity.get("max_abs_err")}
                                       for n, s in specs.items()},
                            "modalities": [], "image_sizes": {}, "text_encoder": None, "selector": False,
                            "reward": False}
    if "text2image" in pipeline:
        block = pipeline["text2image"]
        config = _config(Text2ImageConfig, block, "text2image", where)
        if config.latent is not None and LATENT_GRAPH not in graphs:
            raise ArtifactError(f"{where}: pipeline.text2image is latent diffusion and needs graph "
                                f"{LATENT_GRAPH!r}; the manifest has {sorted(manifest['graphs'])}")
        decoder = graphs[LATENT_GRAPH] if config.latent is not None else None
        te = dict(block.get("text_encoder") or {})
        tokenizer = root / manifest["assets"]["tokenizer"]["file"]
        if not tokenizer.is_file():
            raise ArtifactError(f"{tokenizer}: missing (asset 'tokenizer' of {where})")
        encoder = OnnxTextEncoder(graphs["text_encoder"], tokenizer, name=str(te.get("name", "minilm")),
                                  dim=int(te.get("dim", config.text_dim)),
                                  max_tokens=int(te.get("max_tokens", config.max_text_tokens)))
        selector = None
        if "selector" in pipeline:
            selector = OnnxScorer(graphs["selector"], _config(SelectorConfig, pipeline["selector"], "selector",
                                                              where))
        if "reward" in pipeline:
            reward = OnnxScorer(graphs["reward"], _config(RewardConfig, pipeline["reward"], "reward", where))
            if tuple(reward.config.modalities) != tuple(config.modalities):
                raise ArtifactError(f"{where}: pipeline.reward modalities {list(reward.config.modalities)} != "
                                    f"pipeline.text2image's {list(config.modalities)}")
        try:
            text2image = Text2ImagePipeline(OnnxDenoiser(graphs["denoiser"], config, decoder), encoder,
                                            selector=selector)
        except ValueError as exc:  # text encoder width / length != the denoiser's
            raise ArtifactError(f"{where}: pipeline.text2image: {exc}") from exc
        info.update(modalities=list(config.modalities), text_encoder=te, selector=selector is not None,
                    reward=reward is not None)
        info["image_sizes"]["text2image"] = config.image_size
        info["text2image_space"] = "latent" if config.latent is not None else "pixel"
    if "pix2pix" in pipeline:
        config = _config(Pix2PixConfig, pipeline["pix2pix"], "pix2pix", where)
        pix2pix = Pix2PixPipeline(OnnxPix2Pix(graphs["pix2pix"], config))
        info["image_sizes"]["pix2pix"] = config.image_size
    if text2image is None and pix2pix is None:
        raise ArtifactError(f"{where}: neither pipeline.text2image nor pipeline.pix2pix: nothing to serve")
    return Generators(root=root, version=str(manifest["version"]), text2image=text2image, pix2pix=pix2pix, info=info,
                      reward=reward)
