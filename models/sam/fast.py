"""SAM's fast inference path beside the reference (segment-anything-fast style): ``FastSam`` wraps a reference
``Sam`` with the same weights (options and what they change: docs/architecture.md, "models").
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .build import build_sam
from .config import SamConfig, get_sam_config
from .image_encoder import ATTN_IMPLS
from .sam import Sam

DEFAULT_BUCKETS = (1, 8, 16, 32)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_RECOMPILE_LIMIT = 64  # one static graph per (bucket, prompt combination): more than dynamo's default 8


# ---- batch buckets ----------------------------------------------------------------------------------------
def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Validate bucket sizes: non-empty, positive ints, strictly increasing. Returns them as a tuple."""
    out = tuple(buckets)
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in out):
        raise ValueError(f"cuda_graph_buckets must be a non-empty sequence of positive ints, got {buckets!r}")
    if any(a >= b for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"cuda_graph_buckets must be strictly increasing, got {buckets!r}")
    return out


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (n >= 1); the largest bucket when n exceeds it (the caller chunks)."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


def batch_chunks(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split a batch of n into chunks that each run at one bucket size.

    Returns:
        [(start, stop, padded_size)]: rows start:stop of the batch, padded up to padded_size; full chunks of
        the largest bucket first, then the remainder in the smallest bucket that holds it.
    """
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    largest = buckets[-1]
    chunks = []
    start = 0
    while start < n:
        stop = min(start + largest, n)
        chunks.append((start, stop, bucket_for(stop - start, buckets)))
        start = stop
    return chunks


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, ...) -> (size, ...) by repeating row 0 (real values: no NaN-prone zero boxes or empty masks)."""
    n = x.shape[0]
    if n > size:
        raise ValueError(f"cannot pad a batch of {n} down to {size}")
    if n == size:
        return x
    return torch.cat([x, x[:1].expand(size - n, *x.shape[1:])], dim=0)


# ---- options ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastSamOptions:
    """How :class:`FastSam` runs.

    Attributes:
        dtype: image encoder / mask decoder precision (float32, bfloat16 or float16).
        attn_impl: image-encoder attention, "flex" or "sdpa" ("reference" allowed for comparisons).
        compile: wrap the encoder and the decoder in ``torch.compile``.
        compile_mode: torch.compile mode; "reduce-overhead" records CUDA graphs per bucket.
        cuda_graph_buckets: encoder batch buckets (inputs padded up to the next one).
        decoder_buckets: prompt-batch buckets of the decoder (None: the same as cuda_graph_buckets).
        channels_last: convolution weights and input in channels-last layout.
        device: where the model runs; None means "cuda" when available, else "cpu".
    """

    dtype: torch.dtype = torch.bfloat16
    attn_impl: str = "flex"
    compile: bool = True
    compile_mode: str = "reduce-overhead"
    cuda_graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    decoder_buckets: tuple[int, ...] | None = None
    channels_last: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"FastSamOptions.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"FastSamOptions.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"FastSamOptions.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        object.__setattr__(self, "cuda_graph_buckets", check_buckets(self.cuda_graph_buckets))
        if self.decoder_buckets is not None:
            object.__setattr__(self, "decoder_buckets", check_buckets(self.decoder_buckets))

    def resolved_device(self) -> torch.device:
        """The device the model runs on."""
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (dtype as its name, tuples as lists)."""
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        out["cuda_graph_buckets"] = list(self.cuda_graph_buckets)
        out["decoder_buckets"] = list(self.decoder_buckets or self.cuda_graph_buckets)
        out["device"] = str(self.resolved_device())
        return out


# ---- the wrapper ------------------------------------------------------------------------------------------
class FastSam:
    """Inference-only SAM: low precision, fused attention, compiled, batch buckets. Not an nn.Module (the
    weights belong to ``self.sam``, a private copy of the reference model).

    Frames and tensors are those of :class:`~models.sam.sam.Sam`; every output is float32 on ``device``.
    With ``compile=True`` dynamo's process-wide ``recompile_limit`` is raised to at least 64 (one static graph
    per bucket and prompt combination).

    Args:
        sam: the model to run, already holding its weights; it is modified (cast, moved), so pass a copy.
        options: see :class:`FastSamOptions`.
    """

    def __init__(self, sam: Sam, options: FastSamOptions) -> None:
        self.options = options
        self.device = options.resolved_device()
        self.dtype = options.dtype
        self.encoder_buckets = options.cuda_graph_buckets
        self.decoder_buckets = options.decoder_buckets or options.cuda_graph_buckets
        sam = sam.eval().to(self.device)
        sam.image_encoder.set_attn_impl(options.attn_impl)
        sam.image_encoder.to(self.dtype)
        sam.mask_decoder.to(self.dtype)
        if options.channels_last:
            sam.image_encoder.to(memory_format=torch.channels_last)
        for p in sam.parameters():
            p.requires_grad_(False)
        self.sam = sam
        self.config: SamConfig = sam.config
        with torch.no_grad():
            self._image_pe = sam.prompt_encoder.get_dense_pe().to(self.dtype)  # (1, D, h, w)
        self._encoder: Callable[[torch.Tensor], torch.Tensor] = sam.image_encoder
        self._decoder: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._decode_padded
        if options.compile:
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, _MIN_RECOMPILE_LIMIT)
            self._encoder = torch.compile(sam.image_encoder, mode=options.compile_mode, dynamic=False)
            self._decoder = torch.compile(self._decode_padded, mode=options.compile_mode, dynamic=False)

    # ---- frames (float32, the reference's own methods) ----------------------------------------------------
    @property
    def img_size(self) -> int:
        """Side S of the square input frame."""
        return self.sam.img_size

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """See :meth:`Sam.input_size`."""
        return self.sam.input_size(original_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 255] -> (B, 3, S, S) float32 on ``device`` (reference preprocessing)."""
        with torch.inference_mode():
            return self.sam.preprocess(images.to(self.device))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, M, 4h, 4w) logits -> (B, M, H, W) float32 logits (see :meth:`Sam.postprocess_masks`)."""
        with torch.inference_mode():
            return self.sam.postprocess_masks(masks.to(self.device, torch.float32), input_size, original_size)

    # ---- encoder ------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.options.compile and self.device.type == "cuda":
            # CUDA graphs: a new step, so the previous replay's outputs (already copied out) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, D, S/16, S/16) float32 image embeddings."""
        s = self.img_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"FastSam.encode expects preprocessed (B, 3, {s}, {s}), got {tuple(x.shape)}")
        outputs = []
        with torch.inference_mode():
            for start, stop, size in batch_chunks(x.shape[0], self.encoder_buckets):
                chunk = pad_batch(x[start:stop], size).to(self.device, self.dtype)
                if self.options.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                out = self._call(self._encoder, chunk)
                # copy out of the (possibly CUDA-graph-owned) output buffer, dropping the padding
                outputs.append(out[: stop - start].to(torch.float32, copy=True))
        return torch.cat(outputs)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 255] (the "image_encoder" graph's input) -> (B, D, S/16, S/16) float32:
        reference preprocessing, then :meth:`encode`."""
        return self.encode(self.preprocess(images))

    # ---- decoder ------------------------------------------------------------------------------------------
    def _decode_padded(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoding (float32) + mask decoding (``dtype``) on one bucket-sized batch."""
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.sam.prompt_encoder(
            points=points, boxes=boxes, masks=mask_input, batch_size=image_embeddings.shape[0]
        )
        return self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self._image_pe,
            sparse_prompt_embeddings=sparse.to(self.dtype),
            dense_prompt_embeddings=dense.to(self.dtype),
            multimask_output=multimask_output,
        )

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for one prompt set per image, as :meth:`Sam.decode` (same arguments and frames).

        Args:
            image_embeddings: (B or 1, D, h, w); batch 1 is shared by the B prompt sets.
            point_coords: (B, N, 2) xy input-frame pixels, with point_labels (B, N); or None.
            boxes: (B, 4) xyxy input-frame pixels or None.
            mask_input: (B, 1, 4h, 4w) logits or None.
            multimask_output: return ``num_multimask_outputs`` masks instead of one.

        Returns:
            low_res_logits (B, M, 4h, 4w) and IoU (B, M), float32.
        """
        prompts = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, "mask_input": mask_input}
        n = self._check_decode_inputs(image_embeddings, prompts)
        emb = image_embeddings.to(self.device, self.dtype)
        prompts = {k: None if v is None else v.to(self.device, torch.float32) for k, v in prompts.items()}
        lows, ious = [], []
        with torch.inference_mode():
            for start, stop, size in batch_chunks(n, self.decoder_buckets):
                chunk = {k: None if v is None else pad_batch(v[start:stop], size) for k, v in prompts.items()}
                chunk_emb = emb if emb.shape[0] == 1 else pad_batch(emb[start:stop], size)
                low, iou = self._call(
                    self._decoder, chunk_emb, chunk["point_coords"], chunk["point_labels"], chunk["boxes"],
                    chunk["mask_input"], bool(multimask_output),
                )
                lows.append(low[: stop - start].to(torch.float32, copy=True))
                ious.append(iou[: stop - start].to(torch.float32, copy=True))
        return torch.cat(lows), torch.cat(ious)

    def _check_decode_inputs(self, image_embeddings: torch.Tensor, prompts: Mapping[str, torch.Tensor | None]) -> int:
        """Validate shapes like :meth:`Sam.decode`; returns the number of prompt sets B."""
        d, grid = self.config.prompt_embed_dim, self.config.embedding_size
        if image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != (d, grid, grid):
            raise ValueError(
                f"FastSam.decode: image_embeddings must be (B, {d}, {grid}, {grid}), "
                f"got {tuple(image_embeddings.shape)}"
            )
        coords, labels = prompts["point_coords"], prompts["point_labels"]
        boxes, masks = prompts["boxes"], prompts["mask_input"]
        if (coords is None) != (labels is None):
            raise ValueError("FastSam.decode: point_coords and point_labels must be given together")
        if coords is not None and (coords.ndim != 3 or coords.shape[-1] != 2):
            raise ValueError(f"FastSam.decode: point_coords must be (B, N, 2), got {tuple(coords.shape)}")
        if labels is not None and tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(
                f"FastSam.decode: point_labels must be (B, N) = {tuple(coords.shape[:2])}, got {tuple(labels.shape)}"
            )
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise ValueError(f"FastSam.decode: boxes must be (B, 4), got {tuple(boxes.shape)}")
        low = (1, 4 * grid, 4 * grid)
        if masks is not None and (masks.ndim != 4 or tuple(masks.shape[1:]) != low):
            raise ValueError(f"FastSam.decode: mask_input must be (B, {low}), got {tuple(masks.shape)}")
        batches = {t.shape[0] for t in (coords, boxes, masks) if t is not None}
        if len(batches) > 1:
            raise ValueError(f"FastSam.decode: prompts disagree on the number of prompt sets: {sorted(batches)}")
        n = batches.pop() if batches else image_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, n):
            raise ValueError(
                f"FastSam.decode: image_embeddings has batch {image_embeddings.shape[0]}, expected 1 or the "
                f"number of prompt sets {n}"
            )
        return n

    def describe(self) -> dict[str, Any]:
        """Options and model sizes, JSON-ready (for benchmark reports and ``model_info``)."""
        return {"options": self.options.to_dict(), "config": self.config.to_dict()}


# ---- builders ---------------------------------------------------------------------------------------------
def fast_sam_from(
    sam: Sam,
    *,
    dtype: torch.dtype = torch.bfloat16,
    attn_impl: str = "flex",
    compile: bool = True,
    compile_mode: str = "reduce-overhead",
    cuda_graph_buckets: Sequence[int] = DEFAULT_BUCKETS,
    decoder_buckets: Sequence[int] | None = None,
    channels_last: bool = True,
    device: str | torch.device | None = None,
) -> FastSam:
    """Wrap a copy of a loaded reference ``sam`` (untouched) as a :class:`FastSam`; arguments as in
    :class:`FastSamOptions`."""
    options = FastSamOptions(
        dtype=dtype, attn_impl=attn_impl, compile=compile, compile_mode=compile_mode,
        cuda_graph_buckets=tuple(cuda_graph_buckets),
        decoder_buckets=None if decoder_buckets is None else tuple(decoder_buckets),
        channels_last=channels_last, device=None if device is None else str(device),
    )
    return FastSam(copy.deepcopy(sam), options)


def build_fast_sam(
    name_or_config: str | SamConfig | Mapping[str, Any],
    dtype: torch.dtype = torch.bfloat16,
    attn_impl: str = "flex",
    compile: bool = True,
    cuda_graph_buckets: Sequence[int] = DEFAULT_BUCKETS,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    compile_mode: str = "reduce-overhead",
    decoder_buckets: Sequence[int] | None = None,
    channels_last: bool = True,
    device: str | torch.device | None = None,
) -> FastSam:
    """Build a SAM from a preset / config, load ``state_dict`` strictly (official names; None keeps the
    official initialisation), and wrap it as a :class:`FastSam`.

    Args:
        name_or_config: as in :func:`models.sam.build_sam`.
        dtype, attn_impl, compile, cuda_graph_buckets, compile_mode, decoder_buckets, channels_last, device:
            see :class:`FastSamOptions`.
        state_dict: weights for the reference model (e.g. ``weights.sam_checkpoint`` / a run's refiner.* keys).

    Raises:
        ValueError: unknown preset or invalid option; RuntimeError: state dict keys or shapes do not match.
    """
    config = get_sam_config(name_or_config)
    sam = build_sam(config)
    if state_dict is not None:
        sam.load_state_dict(dict(state_dict), strict=True)
    options = FastSamOptions(
        dtype=dtype, attn_impl=attn_impl, compile=compile, compile_mode=compile_mode,
        cuda_graph_buckets=tuple(cuda_graph_buckets),
        decoder_buckets=None if decoder_buckets is None else tuple(decoder_buckets),
        channels_last=channels_last, device=None if device is None else str(device),
    )
    return FastSam(sam, options)
