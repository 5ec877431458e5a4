"""GPU benchmark of SAM's fast path (``models.sam.fast``) against the float32 reference (``--help``: what it
measures, what it writes, its exit codes).
"""


from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.metrics import dice_per_case
from models.sam import SAM_PRESETS, Sam, build_sam
from models.sam.fast import FastSam, FastSamOptions

_HELP = """GPU benchmark of SAM's fast path (``models.sam.fast``) against the float32 reference, one command:

    python -m loadtest.gpu_bench --out loadtest/results/gpu-<name>.json
        [--model vit_b] [--checkpoint sam_vit_b_01ec64.pth]

Needs an NVIDIA GPU: without CUDA it prints why on stderr, measures nothing, writes nothing and exits 3.
Expect 10-20 minutes on one H100 (one fresh compilation per compiled variant and batch size).

Measured, all on the GPU with inputs already on the device (no host-to-device copies, no preprocessing):

1. Image encoder (``--model``, default vit_b at 1024 x 1024) images/s per variant:
   ``fp32_eager_reference`` (the reference model, batch 1), ``bf16_eager_reference`` (bfloat16, reference
   attention, no compile), ``bf16_sdpa_compile`` and ``bf16_flex_compile`` (bfloat16, channels-last,
   torch.compile with ``--compile-mode``), the latter three at every ``--batches`` size (32 is the headline).
   Each (variant, batch) is a fresh model after ``torch._dynamo.reset()``, so its peak memory
   (``torch.cuda.max_memory_allocated``, weights included) and compile time are its own.
   Agreement: ``--agreement-images`` phantoms (``core.phantoms``, ultrasound and chest X-ray alternating) are
   encoded and decoded (2 points + box + mask prompt from the phantom mask, as the pipeline does) by each
   variant and by the float32 reference; the final masks (logits > 0 at full resolution) must reach
   Dice >= ``--min-dice`` (0.99) on every image.
2. Prompt encoder + mask decoder prompts/s: one image embedding with P prompt sets, and B embeddings with
   one prompt set each; float32 eager reference vs bfloat16 compiled.
3. Peak GPU memory per batch size (inside 1).

Weights: ``--checkpoint`` (official SAM / MedSAM .pth or .safetensors, loaded strictly); without it seeded
random weights with the relative-position tables drawn from N(0, 0.1) so the attention bias is exercised.

Writes JSON (schema ``medrefine-gpu-bench/1``) with top-level ``gpu``, ``encoder_vit_b_img_per_s``
({variant: images/s at the headline batch}), ``decoder_prompts_per_s`` ({case: {variant: {P: prompts/s}}}),
``pipeline_img_per_s`` (null: the end-to-end served number comes from ``python -m loadtest bench`` on the
GPU machine), ``peak_memory_bytes``, ``agreement``, per-variant ``encoder`` / ``decoder`` details and
``environment``. Exit codes: 0 all measured and every agreement check passed, 1 a variant failed or an
agreement check failed (the JSON is still written), 2 usage error, 3 no CUDA.
"""  # the --help text

SCHEMA = "medrefine-gpu-bench/1"
ENCODER_VARIANTS = ("fp32_eager_reference", "bf16_eager_reference", "bf16_sdpa_compile", "bf16_flex_compile")
DECODER_VARIANTS = ("fp32_eager_reference", "bf16_compile")
FAST_VARIANTS: dict[str, dict[str, Any]] = {
    "bf16_eager_reference": {"dtype": torch.bfloat16, "attn_impl": "reference", "compile": False},
    "bf16_sdpa_compile": {"dtype": torch.bfloat16, "attn_impl": "sdpa", "compile": True},
    "bf16_flex_compile": {"dtype": torch.bfloat16, "attn_impl": "flex", "compile": True},
}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
DEVICE = torch.device("cuda", 0)  # every measurement runs here
REL_POS_STD = 0.1
PIPELINE_NOTE = (
    "not measured here: the end-to-end served pipeline number comes from `python -m loadtest bench` run on the "
    "GPU machine (torch or TensorRT backend)"
)


# ---- command line -----------------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _variant_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in ENCODER_VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or text!r}; known: {', '.join(ENCODER_VARIANTS)}"
        )
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.gpu_bench", description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default loadtest/results/gpu-<device name>.json)")
    parser.add_argument("--model", default="vit_b", choices=sorted(SAM_PRESETS),
                        help="SAM preset of the encoder (default vit_b, 1024 x 1024)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="official SAM weights (.pth / .safetensors)")
    parser.add_argument("--variants", type=_variant_list, default=ENCODER_VARIANTS,
                        help=f"comma-separated subset of {', '.join(ENCODER_VARIANTS)}")
    parser.add_argument("--batch", type=_positive_int, default=32, help="headline encoder batch (default 32)")
    parser.add_argument("--batches", type=_int_list, default=(1, 8, 16, 32),
                        help="encoder batch sizes for throughput and peak memory (fp32 reference: batch 1 only)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    parser.add_argument("--iters", type=_positive_int, default=5, help="timed encoder calls per repeat")
    parser.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats (the median is reported)")
    parser.add_argument(
        "--warmup", type=_positive_int, default=2, help="untimed calls first (compilation happens here)"
    )
    parser.add_argument("--decoder-prompts", type=_int_list, default=(1, 8, 32, 128),
                        help="prompt sets per image embedding (one image, many prompts)")
    parser.add_argument("--decoder-images", type=_int_list, default=(1, 8, 32),
                        help="image embeddings with one prompt set each")
    parser.add_argument("--decoder-iters", type=_positive_int, default=50)
    parser.add_argument("--agreement-images", type=_positive_int, default=4)
    parser.add_argument("--min-dice", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def no_cuda_message(out: Path | None) -> str:
    """Why nothing runs on a machine without CUDA, and what to do instead."""
    where = f"{out} was not written" if out is not None else "no JSON was written"
    return (
        "loadtest.gpu_bench needs an NVIDIA GPU with CUDA, but torch.cuda.is_available() is False "
        f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Nothing was measured and {where}. "
        "Run it on a CUDA machine: python -m loadtest.gpu_bench --out loadtest/results/gpu-<name>.json"
    )


# ---- small helpers ----------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words) or "gpu"


def _release() -> None:
    """Drop compiled code, CUDA-graph trees and cached blocks so the next measurement starts clean."""
    torch._dynamo.reset()  # also resets the CUDA-graph trees
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def time_calls(fn: Callable[[], Any], *, warmup: int, iters: int, repeats: int) -> dict[str, Any]:
    """Seconds per call of ``fn`` on the GPU: the first call alone (compilation included), ``warmup - 1`` more
    untimed calls, then ``repeats`` x ``iters`` back-to-back calls between two CUDA events."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1000.0 / iters)
    return {"first_call_s": first_s, "median_s": statistics.median(per_call), "min_s": min(per_call),
            "max_s": max(per_call), "iters": iters, "repeats": repeats}


def _error_record(exc: BaseException) -> dict[str, Any]:
    kind = "out_of_memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
    text = str(exc).strip()
    return {"error": kind, "message": text.splitlines()[0][:500] if text else kind}


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two boolean masks of one shape, over all elements (``core.metrics.dice_per_case``)."""
    return float(dice_per_case(a.reshape(1, -1), b.reshape(1, -1))[0])


# ---- inputs and weights -----------------------------------------------------------------------------------
def phantom_inputs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` phantoms (core.phantoms; breast ultrasound and chest X-ray alternating) at ``size`` x ``size``:
    images (n, 3, S, S) float32 in [0, 255] (gray repeated), masks (n, 1, S, S) float32 in {0, 1}."""
    import numpy as np

    from core.phantoms import breast_ultrasound, chest_xray

    pairs = [(breast_ultrasound if i % 2 == 0 else chest_xray)(seed + i, size) for i in range(n)]
    gray = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32))[:, None]
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))[:, None]
    return gray.repeat(1, 3, 1, 1), masks


def pipeline_prompts(masks: torch.Tensor, low_res: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Prompts as the pipeline builds them from a soft mask (models.prompts.extract_prompts), in the mask's
    pixel frame: point_coords (B, 2, 2) [positive, negative], point_labels (B, 2), boxes (B, 4) xyxy,
    mask_input (B, 1, 4h, 4w) logits."""
    from models.prompts import extract_prompts

    p = extract_prompts(masks)
    mask_input = F.interpolate(p.mask_logits, size=low_res, mode="bilinear", align_corners=False)
    return {"point_coords": p.points, "point_labels": p.point_labels, "boxes": p.box, "mask_input": mask_input}


def jittered_prompts(base: dict[str, torch.Tensor], n: int, seed: int, pixels: float = 16.0) -> dict[str, torch.Tensor]:
    """``n`` prompt sets around row 0 of ``base``: points and box corners moved by up to ``pixels``."""
    gen = torch.Generator().manual_seed(seed)
    coords = base["point_coords"][:1].repeat(n, 1, 1)
    boxes = base["boxes"][:1].repeat(n, 1)
    coords = coords + (torch.rand(coords.shape, generator=gen) * 2 - 1) * pixels
    boxes = boxes + (torch.rand(boxes.shape, generator=gen) * 2 - 1) * pixels
    return {"point_coords": coords, "point_labels": base["point_labels"][:1].repeat(n, 1), "boxes": boxes,
            "mask_input": base["mask_input"][:1].repeat(n, 1, 1, 1)}


def load_reference(args: argparse.Namespace) -> tuple[Sam, str]:
    """The float32 reference on the CPU, and a description of its weights."""
    if args.checkpoint is not None:
        from weights.sam_checkpoint import load_sam_checkpoint

        return load_sam_checkpoint(args.checkpoint, args.model).eval(), f"checkpoint {args.checkpoint}"
    torch.manual_seed(args.seed)
    sam = build_sam(args.model).eval()
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            for table in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                table.copy_(torch.randn(table.shape, generator=gen) * REL_POS_STD)
    return sam, f"random (official init, seed {args.seed}; relative-position tables N(0, {REL_POS_STD}))"


# ---- agreement --------------------------------------------------------------------------------------------
def reference_outputs(ref: Sam, images: torch.Tensor, prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 reference on the GPU: embeddings, low-res logits and full-resolution masks (logits > 0)."""
    with torch.inference_mode():
        emb = ref.encode(ref.preprocess(images))
        low, _ = ref.decode(emb, **prompts, multimask_output=False)
        size = (images.shape[-2], images.shape[-1])
        masks = ref.postprocess_masks(low, ref.input_size(size), size) > 0
    return {"embeddings": emb, "low_res": low, "masks": masks}


def agreement(fast: FastSam, images: torch.Tensor, prompts: dict[str, torch.Tensor],
              reference: dict[str, torch.Tensor], min_dice: float) -> dict[str, Any]:
    """Final-mask Dice of the fast path against the float32 reference, plus embedding and logit errors."""
    emb = fast.encode(fast.preprocess(images))
    low, _ = fast.decode(emb, **prompts, multimask_output=False)
    size = (images.shape[-2], images.shape[-1])
    masks = fast.postprocess_masks(low, fast.input_size(size), size) > 0
    dice = [mask_dice(m, r) for m, r in zip(masks, reference["masks"], strict=True)]
    foreground = [float(r.float().mean()) for r in reference["masks"]]
    return {
        "dice": dice, "min_dice": min(dice), "threshold": min_dice, "passed": min(dice) >= min_dice,
        "reference_foreground_fraction": foreground,
        "informative": all(0.01 < f < 0.99 for f in foreground),
        # small reference logits (random weights) put many pixels near the threshold: Dice is then pessimistic
        "reference_low_res_logit_abs_median": float(reference["low_res"].abs().median()),
        "embeddings_max_abs_err": float((emb - reference["embeddings"]).abs().max()),
        "embeddings_mean_abs_err": float((emb - reference["embeddings"]).abs().mean()),
        "low_res_logits_max_abs_err": float((low - reference["low_res"]).abs().max()),
    }


# ---- 1 + 3: encoder throughput and peak memory ------------------------------------------------------------
def measure_encoder(
    variant: str,
    batch: int,
    ref_cpu: Sam,
    args: argparse.Namespace,
    agree: tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
) -> dict[str, Any]:
    """One (variant, batch): images/s, first-call (compile) time, peak memory, and agreement when asked."""
    size = ref_cpu.img_size
    record: dict[str, Any] = {"batch": batch}
    model = copy.deepcopy(ref_cpu)
    if variant == "fp32_eager_reference":
        model = model.to(DEVICE)
        encoder = model.image_encoder

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return encoder(x)
    else:
        options = FastSamOptions(**FAST_VARIANTS[variant], compile_mode=args.compile_mode,
                                 cuda_graph_buckets=(batch,), device=str(DEVICE))
        fast = FastSam(model, options)
        record["options"] = options.to_dict()
        run = fast.encode
    record["weights_bytes"] = torch.cuda.memory_allocated()
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    torch.cuda.reset_peak_memory_stats()
    timing = time_calls(lambda: run(x), warmup=args.warmup, iters=args.iters, repeats=args.repeats)
    record.update(timing)
    record["img_per_s"] = batch / timing["median_s"]
    record["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    record["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if agree is not None and variant != "fp32_eager_reference":
        record["agreement"] = agreement(fast, *agree, min_dice=args.min_dice)
    return record


def bench_encoder(ref_cpu: Sam, args: argparse.Namespace,
                  agree: tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Every encoder variant at its batch sizes; a failure (OOM, compiler error) is recorded, not raised."""
    batches = sorted(set(args.batches) | {args.batch})
    results: dict[str, Any] = {}
    for variant in args.variants:
        per_batch: dict[str, Any] = {}
        for batch in (1,) if variant == "fp32_eager_reference" else batches:
            _release()
            try:
                record = measure_encoder(variant, batch, ref_cpu, args, agree if batch == args.batch else None)
            except Exception as exc:  # keep the other variants' numbers
                record = {"batch": batch, **_error_record(exc)}
            _release()
            per_batch[str(batch)] = record
            summary = (f"{record['img_per_s']:.2f} img/s, peak {record['peak_memory_allocated_bytes'] / 2**30:.2f} GiB"
                       if "img_per_s" in record else f"FAILED {record['error']}: {record['message']}")
            print(f"[encoder] {variant} batch {batch}: {summary}", file=sys.stderr, flush=True)
        results[variant] = per_batch
    return results


# ---- 2: prompt encoder + mask decoder ---------------------------------------------------------------------
def bench_decoder(ref_cpu: Sam, args: argparse.Namespace, embeddings: torch.Tensor,
                  base_prompts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """prompts/s for one embedding with P prompt sets and for B embeddings with one prompt set each."""
    _release()
    ref = copy.deepcopy(ref_cpu).to(DEVICE)
    sizes = sorted(set(args.decoder_prompts) | set(args.decoder_images))
    fast = FastSam(copy.deepcopy(ref_cpu), FastSamOptions(
        dtype=torch.bfloat16, attn_impl="sdpa", compile=True, compile_mode=args.compile_mode,
        cuda_graph_buckets=(1,), decoder_buckets=tuple(sizes), device=str(DEVICE)))

    def reference_decode(emb: torch.Tensor, prompts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return ref.decode(emb, **prompts, multimask_output=False)

    def fast_decode(emb: torch.Tensor, prompts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return fast.decode(emb, **prompts, multimask_output=False)

    cases = {
        "one_image_many_prompts": [(n, embeddings[:1], n) for n in args.decoder_prompts],
        "many_images_one_prompt": [
            (n, embeddings[torch.arange(n) % embeddings.shape[0]], n) for n in args.decoder_images
        ],
    }
    results: dict[str, Any] = {}
    for case, runs in cases.items():
        results[case] = {}
        for n, emb, prompt_sets in runs:
            prompts = {k: v.to(DEVICE) for k, v in jittered_prompts(base_prompts, prompt_sets, args.seed + n).items()}
            record: dict[str, Any] = {"prompt_sets": prompt_sets, "image_embeddings": emb.shape[0]}
            for variant, fn in (("fp32_eager_reference", reference_decode), ("bf16_compile", fast_decode)):
                try:
                    timing = time_calls(lambda fn=fn, emb=emb, prompts=prompts: fn(emb, prompts),
                                        warmup=args.warmup, iters=args.decoder_iters, repeats=args.repeats)
                    record[variant] = {**timing, "prompts_per_s": prompt_sets / timing["median_s"]}
                except Exception as exc:
                    record[variant] = _error_record(exc)
            try:
                low_ref, _ = reference_decode(emb, prompts)
                low_fast, _ = fast_decode(emb, prompts)
                record["low_res_logits_max_abs_err"] = float((low_fast - low_ref).abs().max())
                record["low_res_mask_dice_min"] = min(
                    mask_dice(a > 0, b > 0) for a, b in zip(low_fast, low_ref, strict=True)
                )
            except Exception as exc:
                record["agreement_error"] = _error_record(exc)
            results[case][str(n)] = record
            rates = ", ".join(f"{v} {record[v]['prompts_per_s']:.0f}/s" for v in DECODER_VARIANTS
                              if "prompts_per_s" in record.get(v, {}))
            print(f"[decoder] {case} n={n}: {rates or 'FAILED'}", file=sys.stderr, flush=True)
    return results


# ---- report -----------------------------------------------------------------------------------------------
def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(args: argparse.Namespace, weights: str) -> dict[str, Any]:
    """Device, library versions, numerics flags, arguments and the host (loadtest.system when available)."""
    props = torch.cuda.get_device_properties(0)
    env: dict[str, Any] = {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_total_memory_bytes": props.total_memory,
        "gpu_count": torch.cuda.device_count(),
        "nvidia_driver": _nvidia_driver(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "model": args.model,
        "weights": weights,
        "compile_mode": args.compile_mode,
        "argv": sys.argv[1:],
        "inputs": "encoder timing: random (B, 3, S, S) on the GPU, preprocessing and host copies excluded; "
                  "agreement: core.phantoms images with pipeline prompts",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        from loadtest.system import machine_description

        env["host"] = machine_description()
    except Exception as exc:  # psutil missing or similar: the GPU numbers stand without it
        env["host"] = {"error": str(exc)}
    return env


def headline(encoder: dict[str, Any], batch: int, key: str) -> dict[str, float | None]:
    """{variant: value of ``key``} at the headline batch (batch 1 for the fp32 reference)."""
    out: dict[str, float | None] = {}
    for variant, per_batch in encoder.items():
        record = per_batch.get("1" if variant == "fp32_eager_reference" else str(batch), {})
        out[variant] = record.get(key)
    return out


def run(args: argparse.Namespace) -> int:
    """All measurements on cuda:0; writes the JSON and returns the exit code."""
    gpu = torch.cuda.get_device_name(0)
    out = args.out or Path("loadtest/results") / f"gpu-{_slug(gpu)}.json"
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # 0. reference weights, agreement phantoms and the float32 reference outputs
    ref_cpu, weights = load_reference(args)
    size = ref_cpu.img_size
    images, masks = phantom_inputs(args.agreement_images, size, args.seed)
    prompts = {
        k: v.to(DEVICE) for k, v in pipeline_prompts(masks, tuple(ref_cpu.prompt_encoder.mask_input_size)).items()
    }
    images = images.to(DEVICE)
    ref_gpu = copy.deepcopy(ref_cpu).to(DEVICE)
    reference = reference_outputs(ref_gpu, images, prompts)
    del ref_gpu
    _release()

    # 1 + 3. image encoder variants, batch sizes and peak memory
    encoder = bench_encoder(ref_cpu, args, (images, prompts, reference))
    # 2. prompt encoder + mask decoder
    decoder = bench_decoder(ref_cpu, args, reference["embeddings"], {k: v.cpu() for k, v in prompts.items()})
    _release()

    agreements = {v: encoder[v].get(str(args.batch), {}).get("agreement") for v in encoder
                  if v != "fp32_eager_reference"}
    failed = [f"{v} batch {b}: {r['error']}" for v, per in encoder.items() for b, r in per.items() if "error" in r]
    failed += [f"decoder {case} n={n} {v}: {rec[v]['error']}" for case, runs in decoder.items()
               for n, rec in runs.items() for v in DECODER_VARIANTS if "error" in rec.get(v, {})]
    failed += [f"{v}: agreement " + ("missing" if a is None else f"min Dice {a['min_dice']:.4f} < {args.min_dice}")
               for v, a in agreements.items() if a is None or not a["passed"]]
    report = {
        "schema": SCHEMA,
        "created": started,
        "gpu": gpu,
        f"encoder_{args.model}_img_per_s": headline(encoder, args.batch, "img_per_s"),
        "encoder_headline_batch": {v: 1 if v == "fp32_eager_reference" else args.batch for v in encoder},
        "decoder_prompts_per_s": {
            case: {v: {n: rec.get(v, {}).get("prompts_per_s") for n, rec in runs.items()} for v in DECODER_VARIANTS}
            for case, runs in decoder.items()
        },
        "pipeline_img_per_s": None,
        "pipeline_note": PIPELINE_NOTE,
        "peak_memory_bytes": {v: {b: r.get("peak_memory_allocated_bytes") for b, r in per.items()}
                              for v, per in encoder.items()},
        "agreement": agreements,
        "failures": failed,
        "encoder": encoder,
        "decoder": decoder,
        "environment": environment(args, weights),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("gpu", f"encoder_{args.model}_img_per_s", "decoder_prompts_per_s",
                                              "failures")}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(no_cuda_message(args.out), file=sys.stderr)
        return EXIT_NO_CUDA
    if not 0.0 < args.min_dice <= 1.0:
        print(f"--min-dice must be in (0, 1], got {args.min_dice}", file=sys.stderr)
        return EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
