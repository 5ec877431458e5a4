"""``python -m service``: check the artifacts, then serve REST + OIP-HTTP (BentoML) and gRPC in one worker.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from service.settings import ServiceSettings, SettingsError, parse_cli

SERVICE_IMPORT = "service.app:MedRefine"
REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("service")


def bentoml_serve_args(settings: ServiceSettings) -> list[str]:
    """The ``bentoml serve`` argument list equivalent to ``settings``."""
    return [
        "serve", SERVICE_IMPORT,
        "--host", settings.host,
        "--port", str(settings.port),
        "--working-dir", str(REPO_ROOT),
        "--timeout-graceful-shutdown", str(max(1, math.ceil(settings.drain_timeout_s))),
        "--timeout-keep-alive", str(settings.keepalive_timeout_s),
    ]


def preflight(settings: ServiceSettings) -> str:
    """Load and hash-verify the artifact directory (and, for ``--backend tensorrt``, the engine record
    against this GPU and TensorRT; and the generator directory when one is configured); returns the
    model version.

    Raises:
        inference.artifacts.ArtifactError: naming the file at fault.
        inference.tensorrt_runtime.EngineCompatibilityError: TensorRT engines built for another GPU or TensorRT version.
        inference.tensorrt_runtime.MissingDependencyError: ``--backend tensorrt`` without TensorRT or a GPU,
            ``--backend openvino`` without openvino.
    """
    from inference.artifacts import check_tensorrt_engines, load_artifacts
    from inference.manifest import check_hashes, load_manifest

    artifacts = load_artifacts(settings.artifacts)
    if settings.backend == "tensorrt":
        check_tensorrt_engines(artifacts)
    if settings.backend == "openvino":
        import importlib.util

        from inference.engines import OPENVINO_MISSING
        from inference.tensorrt_runtime import MissingDependencyError

        if importlib.util.find_spec("openvino") is None:
            raise MissingDependencyError(OPENVINO_MISSING)
    generators = settings.generators_dir
    if generators is not None:
        check_hashes(generators, load_manifest(generators))
    return artifacts.version


def preflight_synthesizer(settings: ServiceSettings) -> str:
    """Resolve and hash-check what /synthesize will serve (``medplatform.synthesizer.choose_synthesizer``);
    returns the worker's MEDREFINE_SYNTHESIZER: ``name:version``, the directory, or ``off`` (stage one).

    Raises:
        inference.artifacts.ArtifactError: naming MEDREFINE_SYNTHESIZER and what is wrong with it.
    """
    from medplatform.synthesizer import choose_synthesizer

    choice = choose_synthesizer(settings.synthesizer)
    return choice.reference if choice is not None else "off"


def _startup_errors() -> tuple[type[BaseException], ...]:
    """What a failed preflight raises: each is answered with one line on stderr and exit code 2."""
    from inference.artifacts import ArtifactError
    from inference.tensorrt_runtime import EngineCompatibilityError, MissingDependencyError

    return ArtifactError, EngineCompatibilityError, MissingDependencyError, OSError


def private_prometheus_dir() -> str:
    """A new empty directory for this instance's Prometheus multiprocess files, made BentoML's choice and
    removed when this process exits (``atexit``: a normal return, SIGTERM's drain or Ctrl-C)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    directory = tempfile.mkdtemp(prefix="medrefine-prometheus-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    from service.log_privacy import install_log_redaction

    install_log_redaction()
    args = parse_cli(argv)
    try:
        settings = ServiceSettings.from_args(args)
    except SettingsError as exc:
        print(f"python -m service: {exc}", file=sys.stderr)
        return 2
    try:
        version = preflight(settings)
        synthesizer = preflight_synthesizer(settings)
    except _startup_errors() as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"python -m service: cannot serve: {reason}", file=sys.stderr)
        return 2
    print(
        f"medrefine: model {version[:12]} on {settings.backend}; HTTP http://{settings.host}:{settings.port} "
        f"(REST, /v2, /ui, /metrics), gRPC "
        + (f"{settings.host}:{settings.grpc_port}" if settings.grpc_port else "off")
        + f", generators {settings.generators_dir or 'off'}"
        + (f", /synthesize {synthesizer}" if synthesizer != "off" else "")  # off: the generators' own pix2pix
        + f", API key {'on' if settings.api_key else 'off'}",
        file=sys.stderr,
        flush=True,
    )
    os.environ.update(settings.to_env())
    os.environ["MEDREFINE_SYNTHESIZER"] = synthesizer  # the worker serves what was checked, never "auto" again
    os.environ["MEDREFINE_ARTIFACTS"] = str(Path(settings.artifacts).resolve())
    # Resolved here, so the worker serves what preflight checked whatever its working directory.
    os.environ["MEDREFINE_GENERATORS"] = (
        str(Path(settings.generators_dir).resolve()) if settings.generators_dir else "off"
    )
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics from a medical service

    from bentoml_cli.cli import cli

    private_prometheus_dir()
    try:
        cli.main(args=bentoml_serve_args(settings), prog_name="bentoml", standalone_mode=False)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
