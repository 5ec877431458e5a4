"""`python -m training synth`: write a synthetic phantom data set, and/or the phantom sample grid.
(Details: docs/architecture.md, "training".)
"""

from __future__ import annotations

import argparse
import sys

from core.phantoms import KINDS, sample_grid, write_dataset


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "synth") -> None:
    """Add the ``synth`` flags to ``parser``."""
    parser.description = (
        "Write synthetic phantoms: images/ + masks/ (ultrasound, chest_xray) or images/ + captions.csv "
        "(modality), and/or a PNG grid of samples."
    )
    kinds = ", ".join(f"{k} ({v.description})" for k, v in KINDS.items())
    parser.add_argument("--kind", choices=sorted(KINDS), help=f"phantom kind: {kinds}".replace("%", "%%"))
    parser.add_argument("--n", type=int, help="number of samples")
    parser.add_argument("--out", help="output directory (its images/ and masks/ must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0); same seed, same bytes")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels (default: 256 ultrasound/chest_xray, 64 modality)",
    )
    parser.add_argument(
        "--grid", metavar="PATH", help="also (or only) write a PNG grid of samples of every kind"
    )


def run(args: argparse.Namespace) -> int:
    """Generate what ``args`` asks for; returns 0, or 2 on a usage error (message on stderr)."""
    given = [a is not None for a in (args.kind, args.n, args.out)]
    if any(given) != all(given) or not (all(given) or args.grid):
        print(
            "synth: give all of --kind, --n and --out to write a data set, and/or --grid PATH",
            file=sys.stderr,
        )
        return 2
    if args.kind is not None:
        try:
            out = write_dataset(args.kind, args.n, args.out, seed=args.seed, size=args.size)
        except (ValueError, FileExistsError) as exc:
            print(f"synth: {exc}", file=sys.stderr)
            return 2
        layout = "images/, masks/" if KINDS[args.kind].has_masks else "images/, captions.csv"
        print(f"wrote {args.n} {args.kind} samples to {out} ({layout})")
    if args.grid:
        path = sample_grid(args.grid, seed=args.seed)
        print(f"wrote sample grid {path}")
    return 0
