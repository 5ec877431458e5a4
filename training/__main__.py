"""`python -m training COMMAND ...`: one entry point, one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synth", "write a synthetic phantom data set (images/, masks/, captions.csv)"),
    "transunet": ("training.phases", "phase 1: train the TransUNet coarse segmenter"),
    "refiner": ("training.phases", "phase 2: fine-tune the SAM refiner on augmented coarse masks"),
    "e2e": ("training.phases", "phase 3: joint end-to-end UltraRefiner training"),
    "evaluate": ("training.evaluate", "Dice/IoU/precision/recall/HD95 of coarse and refined masks"),
    "default-models": ("training.default_models", "train the small committed default models on phantoms"),
    "calibrate": ("training.calibration", "choose needs_review / no-finding thresholds on a calibration split"),
    "quality-report": ("training.quality", "Dice per prompt, IoU confidence, review flag, no-finding via the API"),
    "pix2pix": ("training.generators", "GenSeg stage 1: pix2pix mask-to-image GAN (L1 + adversarial)"),
    "genseg": ("training.genseg", "GenSeg stage 2: segmenter + generator, one-step unrolled bilevel training"),
    "genseg-benchmark": ("training.genseg", "9-label GenSeg vs baseline, in- and out-of-domain"),
    "genseg-diagnostics": ("training.genseg_diagnostics", "why GenSeg's synthetic pairs help or hurt (one seed)"),
    "genseg-errors": ("training.genseg_errors", "where a GenSeg benchmark's Dice goes; lesion contrast"),
    "text2image": ("training.text2image", "MINIM-style text + modality conditional diffusion"),
    "selector": ("training.selector", "modality/realness classifier that picks the best of N"),
    "evaluate-generation": ("training.evaluate_generation", "modality accuracy, SSIM, diversity, pix2pix consistency"),
    "default-generators": ("training.generators", "train the small committed default generators"),
    "rlhf": ("training.rlhf", "ratings -> reward model -> reward-weighted fine-tune of the text-to-image model"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        command_parser.set_defaults(module=module_name)
        # Only the chosen command's module is imported to add its arguments.
        if argv and argv[0] == name:
            importlib.import_module(module_name).add_arguments(command_parser, name)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
