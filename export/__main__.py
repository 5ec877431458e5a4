"""`python -m export COMMAND ...`: ONNX artifacts, verification, TensorRT engines, BentoML, Triton.
(Details: docs/architecture.md, "export".)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

EXIT_FAILED = 1
EXIT_MISSING_DEPENDENCY = 3


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _add_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("onnx", help="export a run directory to parity-checked ONNX graphs + manifest.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="run directory, or 'default' for checkpoints/default")
    src.add_argument("--random-config", metavar="NAME",
                     help="export freshly built models with random weights (UltraRefiner preset NAME, e.g. 'paper')")
    p.add_argument("--out", required=True, help="artifact directory to write (replaced only on success)")
    p.add_argument("--fp16", action="store_true", help="convert the graphs to fp16 after fp32 export")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the parity check")
    p.add_argument("--graphs", help="comma-separated subset of graphs to export (default: all the run serves)")
    p.add_argument("--int8", nargs="?", const="transunet", metavar="GRAPHS",
                   help="static int8 (QDQ, calibrated on phantoms through the pipeline) for these comma-separated "
                        "graphs (default: transunet, the only one where int8 ran faster; not part of --optimize)")
    p.add_argument("--fuse-rel-pos", action="store_true",
                   help="export the image encoder with its relative-position term inside the attention matmul")
    p.add_argument("--optimize", action="store_true",
                   help="what measured faster on CPU without changing a mask (loadtest/results/optimize-*.json): "
                        "--fuse-rel-pos; int8 on top added 0 %% (b1) to 7 %% (b16) and moved one held-out mask "
                        "to Dice 0.966 against fp32, so it stays opt-in")


def _add_generators(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generators", help="export the generator runs (text2image, pix2pix, selector) to "
                                          "parity-checked ONNX graphs + manifest.json")
    p.add_argument("--model", default="default",
                   help="generators directory holding text2image/ pix2pix/ selector/ run directories, or "
                        "'default' for checkpoints/generators")
    p.add_argument("--out", default="artifacts/generators", help="artifact directory to write (replaced only on "
                                                                 "success)")
    p.add_argument("--fp16", action="store_true", help="convert the graphs to fp16 after fp32 export")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the parity check")


def _add_genseg(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("genseg", help="export the generator of a GenSeg run (python -m training genseg) as a "
                                      "generator artifact /synthesize can serve")
    p.add_argument("run_dir", help="a 'genseg' run directory")
    p.add_argument("--out", default="artifacts/synthesizer", help="artifact directory to write (replaced only on "
                                                                  "success)")
    p.add_argument("--fp16", action="store_true", help="convert the graph to fp16 after fp32 export")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the parity check")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-check hashes and parity (or structure) of an artifact directory")
    p.add_argument("art_dir")
    p.add_argument("--structural", action="store_true", help="skip the parity re-run even if the run exists")
    p.add_argument("--threads", type=int, default=1)


def _add_tensorrt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tensorrt", help="build TensorRT engines (needs tensorrt and an NVIDIA GPU)")
    p.add_argument("--onnx", required=True, metavar="ART_DIR", help="artifact directory from `export onnx`")
    p.add_argument("--out", help="engine directory (default ART_DIR/trt)")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--min-points", type=int, default=1)
    p.add_argument("--opt-points", type=int, default=5)
    p.add_argument("--max-points", type=int, default=10)
    p.add_argument("--max-image-size", type=int, default=2048, help="largest orig_im_size value of the decoder")
    p.add_argument("--timing-cache", help="timing cache file (read if present, written after the build)")


def _add_bentoml(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bentoml", help="register an artifact directory in the BentoML model store")
    p.add_argument("art_dir")
    p.add_argument("--name", default="medrefine")


def _add_triton(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton", help="write a Triton model repository (one folder per graph + ensemble)")
    p.add_argument("art_dir")
    p.add_argument("--out", required=True, metavar="REPO")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--no-ensemble", action="store_true")


def _log(message: str) -> None:
    print(message, flush=True)


def cmd_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import export_artifacts

    start = time.perf_counter()
    only = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    int8 = [g.strip() for g in (args.int8 or "").split(",") if g.strip()]
    if int8 and args.fp16:
        raise ValueError("--int8 and --fp16 exclude each other: int8 graphs are quantized from the fp32 export")
    if only is not None:
        int8 = [g for g in int8 if g in only]
    options = {"int8": int8, "fuse_rel_pos": args.fuse_rel_pos or args.optimize}
    if args.random_config:
        from export.graphs import save_random_run

        with tempfile.TemporaryDirectory(prefix="medrefine-random-run-") as tmp:
            run_dir = save_random_run(args.random_config, Path(tmp) / "run")
            _log(f"built random-weight run {args.random_config!r} in {time.perf_counter() - start:.1f} s")
            manifest = export_artifacts(run_dir, args.out, fp16=args.fp16, opset=args.opset,
                                        threads=args.threads, only=only, log=_log, **options)
    else:
        from weights.checkpoints import resolve_run_dir

        manifest = export_artifacts(resolve_run_dir(args.model), args.out, fp16=args.fp16, opset=args.opset,
                                    threads=args.threads, only=only, log=_log, **options)
    total = sum(g["bytes"] for g in manifest["graphs"].values())
    print(f"wrote {args.out}: version {manifest['version'][:16]}, {len(manifest['graphs'])} graphs, "
          f"{total / 1e6:.1f} MB, precision {manifest['precision']}, {time.perf_counter() - start:.1f} s")
    return 0


def cmd_generators(args: argparse.Namespace) -> int:
    from export.generators import export_generator_artifacts

    start = time.perf_counter()
    manifest = export_generator_artifacts(args.model, args.out, fp16=args.fp16, opset=args.opset,
                                          threads=args.threads, log=_log)
    total = sum(g["bytes"] for g in manifest["graphs"].values())
    print(f"wrote {args.out}: version {manifest['version'][:16]}, {len(manifest['graphs'])} graphs "
          f"({', '.join(manifest['graphs'])}), {total / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


def cmd_genseg(args: argparse.Namespace) -> int:
    from export.genseg_export import export_genseg_generator

    manifest = export_genseg_generator(args.run_dir, args.out, fp16=args.fp16, opset=args.opset,
                                       threads=args.threads, log=_log)
    print(f"wrote {args.out}: version {manifest['version'][:16]}, GenSeg generator of {args.run_dir}, "
          f"consistency Dice {manifest['source']['consistency']['dice']:.3f}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from export.verify import verify_artifacts

    report = verify_artifacts(args.art_dir, rerun_parity=not args.structural, threads=args.threads)
    for note in report.notes:
        print(note)
    for name, result in report.graphs.items():
        extra = f" max abs err {result['max_abs_err']:.2e} <= {result['bound']:g}" if "max_abs_err" in result else ""
        print(f"  {name}: ok{extra}")
    print(f"ok: {args.art_dir} version {report.version[:16]} ({report.mode} check)")
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt import build_engines

    record = build_engines(args.onnx, args.out, fp16=args.fp16,
                           batch=(args.min_batch, args.opt_batch, args.max_batch),
                           num_points=(args.min_points, args.opt_points, args.max_points),
                           max_image_size=args.max_image_size, timing_cache=args.timing_cache)
    print(json.dumps({"gpu": record["gpu"], "tensorrt_version": record["tensorrt_version"],
                      "engines": {k: v["file"] for k, v in record["engines"].items()}}, indent=2))
    return 0


def cmd_bentoml(args: argparse.Namespace) -> int:
    from export.bentoml_store import register_artifacts

    print(register_artifacts(args.art_dir, name=args.name))
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from export.triton import write_triton_repository

    written = write_triton_repository(args.art_dir, args.out, max_batch_size=args.max_batch_size,
                                      ensemble=not args.no_ensemble)
    for name, folder in written.items():
        print(f"{name}: {folder}")
    return 0


COMMANDS = {
    "onnx": cmd_onnx,
    "generators": cmd_generators,
    "genseg": cmd_genseg,
    "verify": cmd_verify,
    "tensorrt": cmd_tensorrt,
    "bentoml": cmd_bentoml,
    "triton": cmd_triton,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_onnx, _add_generators, _add_genseg, _add_verify, _add_tensorrt, _add_bentoml, _add_triton):
        add(sub)
    args = parser.parse_args(argv)

    from inference.tensorrt_runtime import MissingDependencyError

    try:
        return COMMANDS[args.command](args)
    except MissingDependencyError as exc:
        _err(str(exc))
        return EXIT_MISSING_DEPENDENCY
    except (RuntimeError, ValueError, OSError) as exc:
        # ArtifactError, ParityError, EngineCompatibilityError (RuntimeError); RunDirError (ValueError)
        _err(str(exc))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
