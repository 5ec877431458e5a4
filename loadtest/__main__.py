"""``python -m loadtest COMMAND``: the benchmark, the soak test, and single load steps."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


def _add_step_arguments(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--url", default=default_url, help="loopback server address")
    parser.add_argument("--mode", default="closed", choices=("closed", "open"))
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight")
    parser.add_argument("--rate", type=float, default=10.0, help="open loop: arrivals per second")
    parser.add_argument("--arrival", default="poisson", choices=("poisson", "fixed"))
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--warmup-s", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    parser.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any request failed")


def _step(args: argparse.Namespace, command: str) -> int:
    from loadtest.driver import LoadSpec
    from loadtest.workload import Workload

    spec = LoadSpec(mode=args.mode, concurrency=args.concurrency, rate_rps=args.rate if args.mode == "open" else 0.0,
                    arrival=args.arrival, duration_s=args.duration_s, max_requests=args.max_requests,
                    warmup_s=args.warmup_s)
    workload = Workload(size=args.image_size)
    if command == "grpc":
        from loadtest.grpc_load import run_grpc_load_sync

        run = run_grpc_load_sync(args.url, spec, workload, timeout_s=args.timeout_s)
    else:
        from loadtest.http_load import run_http_load_sync

        run = run_http_load_sync(args.url, args.protocol, spec, workload, timeout_s=args.timeout_s)
    summary = run.summary()
    print(json.dumps(summary, indent=2))
    return 1 if args.fail_on_errors and summary["errors_total"] else 0


def _offline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loadtest.bench import offline_throughput

    result = offline_throughput(args.artifacts, batch_sizes=args.batch_sizes, threads=args.threads,
                                duration_s=args.duration_s, image_size=args.image_size, backend=args.backend,
                                precision=args.precision)
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    else:
        print(text)
    return 0


# Subcommands with their own argument parser: ``python -m loadtest NAME ARGS`` runs ``NAME``'s ``main(ARGS)``.
DELEGATED: dict[str, tuple[str, str]] = {
    "corrections": ("loadtest.corrections", "the corrections loop through the service API -> results JSON"),
    "rlhf": ("loadtest.rlhf", "the ratings loop: simulated ratings -> reward model -> fine-tuned generator"),
}


def main(argv: Sequence[str] | None = None) -> int:
    from loadtest import bench, client_overhead, optimize, soak

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(sub.add_parser("bench", help="offline vs naive vs served benchmark -> results JSON + PNG"))
    soak.add_arguments(sub.add_parser("soak", help="N minutes at a fraction of peak: errors and RSS over time"))
    client_overhead.add_arguments(sub.add_parser("client-overhead", help="the HTTP generator's own CPU per request"))
    optimize.add_arguments(sub.add_parser("optimize", help="fp32 vs int8 / fused / thread layouts, offline A/B"))
    offline = sub.add_parser("offline", help="offline pipeline throughput by batch size (no server)")
    offline.add_argument("--artifacts", required=True)
    offline.add_argument("--backend", default="onnxruntime")
    offline.add_argument("--precision", default="auto", help="the openvino backend's inference precision")
    offline.add_argument("--threads", type=int, default=1)
    offline.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 8, 16])
    offline.add_argument("--duration-s", type=float, default=8.0)
    offline.add_argument("--image-size", type=int, default=256)
    offline.add_argument("--json-out", default=None)
    http = sub.add_parser("http", help="one load step over REST or OIP-HTTP")
    _add_step_arguments(http, "http://127.0.0.1:3000")
    http.add_argument("--protocol", default="rest", choices=("rest", "oip-http"))
    _add_step_arguments(sub.add_parser("grpc", help="one load step over OIP gRPC"), "127.0.0.1:8001")
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (its own flags: python -m loadtest {name} --help)", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "soak":
        return soak.run(args)
    if args.command == "offline":
        return _offline(args)
    if args.command == "client-overhead":
        return client_overhead.run(args)
    if args.command == "optimize":
        return optimize.run(args)
    try:
        from loadtest.http_load import require_loopback

        require_loopback(args.url)
    except ValueError as exc:
        print(f"python -m loadtest {args.command}: {exc}", file=sys.stderr)
        return 2
    return _step(args, args.command)


if __name__ == "__main__":
    sys.exit(main())
