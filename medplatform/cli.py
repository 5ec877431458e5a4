"""``python -m medplatform COMMAND``: migrate the database and manage registered model versions.

JSON on stdout; exit 0 success, 1 refused (one ``error:`` line naming the field), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medplatform.errors import InvalidValue, PlatformError

EXIT_REFUSED = 1
USAGE = """commands:
  migrate                                   upgrade the database (MEDREFINE_DB_URL) to the newest schema
  register RUN_DIR ART_DIR --name NAME [--evaluation EVAL.json] [--alias ALIAS]
  default [--run-dir DIR --art-dir DIR]     checkpoints/default + artifacts/default as default v1 = production
  models                                    model names, their versions and aliases
  versions NAME                             a model's versions with their metrics
  alias NAME ALIAS VERSION                  point ALIAS (e.g. production) at VERSION
  worker [--concurrency N] [--max-jobs N]   run queued jobs (train/evaluate/predict) until SIGTERM
  run-job JOB_ID [--dispatched-as ID]       claim and run one queued job here (what a Ray job runs)
  jobs [--status S]                         the newest jobs with their status and progress
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medplatform", description=__doc__.splitlines()[0],
                                     epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="upgrade the database (MEDREFINE_DB_URL) to the newest schema")
    reg = sub.add_parser("register", help="register a finished run + its ONNX export as the next version")
    reg.add_argument("run_dir")
    reg.add_argument("art_dir")
    reg.add_argument("--name", required=True)
    reg.add_argument("--evaluation", help="a `python -m training evaluate --json` result of the same weights")
    reg.add_argument("--alias", help="point this alias (e.g. production) at the new version")
    default = sub.add_parser("default", help="register the committed default model unless it already is")
    default.add_argument("--run-dir", default=None)
    default.add_argument("--art-dir", default=None)
    sub.add_parser("models", help="list model names, their versions and aliases")
    versions = sub.add_parser("versions", help="list a model's versions with their metrics")
    versions.add_argument("name")
    alias = sub.add_parser("alias", help="point ALIAS of NAME at VERSION")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    worker = sub.add_parser("worker", help="run queued jobs from the database until SIGTERM")
    worker.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")
    worker.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (one process)")
    run_job = sub.add_parser("run-job", help="claim and run one queued job in this process")
    run_job.add_argument("job_id")
    run_job.add_argument("--dispatched-as", default=None, help="the runner id the job was handed to (Ray)")
    jobs = sub.add_parser("jobs", help="list the newest jobs")
    jobs.add_argument("--status", default=None)
    return parser


def _read_evaluation(path: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidValue("evaluation", path, f"not a readable JSON file ({exc})") from exc
    if not isinstance(value, dict):
        raise InvalidValue("evaluation", path, "expected a JSON object")
    return value


def _run(args: argparse.Namespace) -> Any:
    from medplatform import db
    from medplatform.context import open_platform

    platform = open_platform()
    registry = platform.registry
    if args.command == "migrate":
        return {"db_url": platform.db_url, "revision": db.current_revision(platform.db_url)}
    if args.command == "register":
        evaluation = _read_evaluation(args.evaluation) if args.evaluation else None
        info = registry.register(args.run_dir, args.art_dir, name=args.name, evaluation=evaluation)
        if args.alias:
            info = registry.set_alias(args.name, args.alias, info.version)
        return info.to_dict()
    if args.command == "default":
        from medplatform.registry import DEFAULT_ART_DIR, DEFAULT_RUN_DIR, ensure_default_registered

        return ensure_default_registered(registry, run_dir=args.run_dir or DEFAULT_RUN_DIR,
                                         art_dir=args.art_dir or DEFAULT_ART_DIR).to_dict()
    if args.command == "models":
        return [m.to_dict() for m in registry.list_models()]
    if args.command == "versions":
        return [v.to_dict() for v in registry.list_versions(args.name)]
    if args.command == "alias":
        return registry.set_alias(args.name, args.alias, args.version).to_dict()
    if args.command in ("worker", "run-job", "jobs"):
        return _run_jobs(args, platform)
    raise AssertionError(args.command)


def _run_jobs(args: argparse.Namespace, platform: Any) -> Any:
    from medplatform import jobs, worker

    settings = worker.WorkerSettings.from_env()
    if args.command == "jobs":
        return [jobs.job_to_dict(job) for job in jobs.list_jobs(platform, status=args.status)]
    if args.command == "run-job":
        status = worker.run_one(platform, args.job_id, settings, dispatched_as=args.dispatched_as)
        return jobs.job_to_dict(jobs.get_job(platform, args.job_id)) | {"status": status}
    import threading

    stop = threading.Event()
    worker.install_sigterm(stop)
    if args.concurrency == 1:
        return {"worker": worker.worker_id(), "jobs_run": worker.serve(platform, settings, stop=stop,
                                                                       max_jobs=args.max_jobs)}
    procs = worker.start_local_workers(args.concurrency)
    while not stop.wait(1.0) and any(p.poll() is None for p in procs):
        pass
    worker.stop_local_workers(procs)
    return {"workers": [p.pid for p in procs], "exit_codes": [p.returncode for p in procs]}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.command == "run-job" and result["status"] != "succeeded":
        return EXIT_REFUSED  # a Ray job then ends FAILED; the job's row holds the reason
    return 0
