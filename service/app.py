"""The BentoML 1.4 service: REST (/segment, /refine), KServe v2 over HTTP (/v2) and gRPC, /ui, probes, /metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import typing as t
from pathlib import Path

import bentoml
from pydantic import Field

from service import rest, rest_generation
from service.bento_pages import BentoPagesMiddleware
from service.bentoml_metrics import bound_bentoml_metric_paths
from service.errors import NotReady
from service.heap import freeze_startup_heap
from service.log_privacy import install_log_redaction
from service.metrics import exposition_if_separate
from service.middleware import API_ROUTES, GuardMiddleware, OpenRequests, rest_api
from service.oip_http import create_oip_app
from service.platform_api import (
    PlatformState,
    create_platform_app,
    dataset_upload_limit,
    start_platform,
    stop_platform,
)
from service.protocols import FrontEndRuntime
from service.settings import ServiceSettings

logger = logging.getLogger("service.app")
# BentoML's server logging shows INFO for its own loggers only; ours report start-up, drain and shutdown.
logging.getLogger("service").setLevel(logging.INFO)

SETTINGS = ServiceSettings.from_env()
install_log_redaction()  # BentoML's request-error log would quote submitted form values
UI_DIR = Path(__file__).resolve().parent / "ui"
_MODEL_FIELD = "registry model: name, name:VERSION or name@ALIAS; default: the default model's production"


class _Process:
    """This worker process's runtime (None until built, or if the artifacts failed to load)."""

    runtime: FrontEndRuntime | None = None
    load_failed: bool = False

    def not_ready_reason(self) -> str:
        if self.load_failed:
            return "model artifacts failed to load or verify (see the server log)"
        return "starting"


def _rest_api(route: str) -> t.Callable[[t.Callable[..., t.Any]], t.Any]:
    """``@bentoml.api(route=...)`` over ``rest_api``: the handler's exceptions are answered by one mapping
    (``rest.error_response``), and the guard knows BentoML has parsed the request once the handler runs."""

    def declare(handler: t.Callable[..., t.Any]) -> t.Any:
        return bentoml.api(route=route)(rest_api(rest.error_response)(handler))

    return declare


PROCESS = _Process()
OPEN_REQUESTS = OpenRequests()  # HTTP requests let in by the guard and not yet answered
PLATFORM = PlatformState()  # /datasets, /jobs, /models (service.platform_api); opened in start_platform


@bentoml.service(
    name="medrefine",
    workers=1,
    # max_concurrency and the timeouts are GuardMiddleware's (429 / 408 / 504 with Retry-After or our JSON
    # body); BentoML's own timeout counts from the first byte, so it is set past the longest upload allowed.
    traffic={"timeout": SETTINGS.longest_request_s},
    metrics={"enabled": True},
    # `bentoml serve service.app:MedRefine` binds MEDREFINE_HOST:MEDREFINE_PORT (loopback by default) as
    # `python -m service` does; its --host/--port (BENTOML_HOST/BENTOML_PORT) still win.
    http={"host": SETTINGS.host, "port": SETTINGS.port},
)
class MedRefine:
    """UltraRefiner lesion segmentation (TransUNet + SAM refiner) over verified exported artifacts."""

    def __init__(self) -> None:
        from inference.artifacts import ArtifactError
        from service.runtime import ServiceRuntime

        self.settings = ServiceSettings.from_env()
        self.grpc: t.Any = None
        if self.settings.backend in ("onnxruntime", "openvino"):
            # torch only runs the glue between graphs here: with its own thread pool it competes with
            # ONNX Runtime's threads and the HTTP loop for the same cores (measured: p50 at 70 % load
            # 101-125 ms with one torch thread vs 194-320 ms with the default, equal peak throughput). On
            # OpenVINO its idle OpenMP worker spun at a third of a core (REST 45 req/s: p50 190 -> 67 ms).
            import torch

            torch.set_num_threads(1)
        try:
            self.runtime: t.Any = ServiceRuntime.load(self.settings)
        except (ArtifactError, ValueError, OSError) as exc:
            logger.error("cannot serve: %s", exc)
            PROCESS.load_failed = True
            self.runtime = None

    @bentoml.on_startup
    async def start_platform(self) -> None:
        """Open the platform (database migrated) and start its job workers; inference serves even if this fails."""
        await asyncio.to_thread(start_platform, PLATFORM, self.settings,
                                self.runtime.versions if self.runtime is not None else None)

    @bentoml.on_shutdown
    async def stop_platform(self) -> None:
        """Stop the local job workers (their running jobs go back to the queue)."""
        await asyncio.to_thread(stop_platform, PLATFORM)

    @bentoml.on_startup
    async def start_runtime(self) -> None:
        """Start the batcher, then gRPC on this loop; only then is the process ready."""
        if self.runtime is None:
            return
        await self.runtime.start()
        if self.settings.grpc_port:
            from service.grpc_server import start_grpc_server

            self.grpc = await start_grpc_server(self.runtime, self.settings.host, self.settings.grpc_port)
        _chain_drain_on_signals(self.runtime)
        freeze_startup_heap()  # last: everything loaded and started is in it
        PROCESS.runtime = self.runtime
        logger.info("ready: model %s on %s, HTTP REST + /v2, gRPC %s", self.runtime.model_version[:12],
                    self.runtime.backend, self.grpc.address if self.grpc else "off")

    @bentoml.on_shutdown
    async def stop_runtime(self) -> None:
        """Readiness off, gRPC stops with grace (in-flight RPCs finish), then the queue drains."""
        if self.runtime is None:
            return
        self.runtime.begin_drain()
        if self.grpc is not None:  # in-flight RPCs finish within what is left of the one shutdown deadline
            await self.grpc.stop(self.runtime.drain_time_left())
            self.grpc = None
        completed = await self.runtime.stop()
        logger.info("drained (%s)", "all accepted requests answered" if completed else "drain timeout hit")

    def __is_ready__(self) -> bool:
        return self.runtime is not None and bool(self.runtime.ready)

    def __metrics__(self, content: str) -> str:
        """Append our metrics when BentoML's multiprocess collector does not already list them."""
        if self.runtime is not None:
            self.runtime.sync_metrics()
        return content + exposition_if_separate().decode("utf-8")

    def _require_runtime(self) -> t.Any:
        # Not `ready`: a request accepted before SIGTERM must still be served while the server drains
        # (the batcher refuses new work only once uvicorn has finished the open requests).
        if self.runtime is None:
            raise NotReady(f"server not ready: {PROCESS.not_ready_reason()}")
        return self.runtime

    @_rest_api("/segment")
    async def segment(
        self,
        file: Path,
        threshold: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False,
                                        description="mask threshold in (0, 1); default: the model's"),
        gate: t.Literal["none", "uncertainty", "learned", "hybrid"] | None = Field(
            None, description="gate override: none | uncertainty | the model's own (learned / hybrid)"),
        gamma: float | None = Field(None, gt=0, allow_inf_nan=False, description="uncertainty-gate gamma (> 0)"),
        gate_min: float | None = Field(None, ge=0, le=1, description="uncertainty-gate floor in [0, 1]"),
        gate_max: float | None = Field(None, ge=0, le=1, description="uncertainty-gate ceiling in [0, 1]"),
        outputs: str | list[str] | None = Field(
            None, description="comma list of image, mask, coarse_mask, probability, coarse_probability, gate"),
        dicom_seg: bool = Field(False, description="also return a DICOM SEG (DICOM uploads only)"),
        anonymize: bool | None = Field(
            None, description="remove patient identifiers from the DICOM SEG; default: MEDREFINE_ANONYMIZE_DICOM (on)"),
        model: str | None = Field(None, description=_MODEL_FIELD),
    ) -> dict[str, t.Any]:
        """Segment one uploaded image (PNG, JPEG, TIFF, DICOM, NIfTI); masks come back as base64 PNGs."""
        return await rest.segment(
            self._require_runtime(), file, threshold=threshold, gate=gate, gamma=gamma, gate_min=gate_min,
            gate_max=gate_max, outputs=outputs, dicom_seg=dicom_seg, anonymize=anonymize, model=model,
        )

    @_rest_api("/refine")
    async def refine(
        self,
        file: Path,
        box: list[float] | None = Field(None, min_length=4, max_length=4,
                                        description="[x0, y0, x1, y1] in image pixels"),
        points: list[list[float]] | None = Field(None, description="[[x, y], ...] in image pixels"),
        point_labels: list[float] | None = Field(None, description="1 foreground / 0 background per point"),
        # A list, not `Path | None`: BentoML 1.4 makes an optional Path a text field (and cannot build
        # `Optional[Path]` at all), while a list of Paths is an optional file part.
        prior_mask: list[Path] = Field(default_factory=list,
                                       description="a previous mask (PNG, one file) as the mask prompt"),
        threshold: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False, description="mask threshold in (0, 1)"),
        outputs: str | list[str] | None = Field(None, description="comma list of image, mask, probability"),
        model: str | None = Field(None, description=_MODEL_FIELD),
    ) -> dict[str, t.Any]:
        """Refine an uploaded image with your own prompts; the image embedding is cached between calls."""
        return await rest.refine(
            self._require_runtime(), file, box=box, points=points, point_labels=point_labels,
            prior_mask=rest.single_upload(prior_mask, "prior_mask"), threshold=threshold, outputs=outputs,
            model=model,
        )

    @_rest_api("/generate")
    async def generate(
        self,
        prompt: str = Field(description="text prompt, e.g. 'chest x-ray, left lower lobe nodule'"),
        modality: str = Field(description="one of the generator's modalities (see /readyz generation.modalities)"),
        negative_prompt: str | None = Field(None, description="what to steer away from (classifier-free guidance)"),
        # strict: JSON true is not the number 1 (pydantic's lax mode takes it as 1, and 2.0 as an integer)
        guidance_scale: float = Field(
            1.5, strict=True, allow_inf_nan=False, description="guidance weight w (1 = none)"
        ),
        steps: int = Field(25, strict=True, description="DDIM steps"),
        seed: int | None = Field(None, strict=True, description="same seed, same images; default: drawn and returned"),
        num_images: int = Field(1, strict=True, description="images for this prompt"),
        best_of: int | None = Field(None, strict=True, description="generate N candidates, return the best"),
        rank_by: str | None = Field(None, description="what ranks best_of: 'selector' (default) or 'reward' (the "
                                                      "RLHF reward model, when the generators have one)"),
    ) -> dict[str, t.Any]:
        """Text + modality -> images (MINIM-style conditional diffusion), as base64 PNGs."""
        return await rest_generation.generate(
            self._require_runtime(), prompt=prompt, modality=modality, negative_prompt=negative_prompt,
            guidance_scale=guidance_scale, steps=steps, seed=seed, num_images=num_images, best_of=best_of,
            rank_by=rank_by,
        )

    @_rest_api("/synthesize")
    async def synthesize(self, file: Path) -> dict[str, t.Any]:
        """Mask -> image (GenSeg's pix2pix generator): upload a mask image (nonzero = foreground)."""
        return await rest_generation.synthesize(self._require_runtime(), file)


def _chain_drain_on_signals(runtime: t.Any) -> None:
    """On SIGTERM/SIGINT: readiness off at once, finish what was accepted, then let uvicorn exit.

    uvicorn's own handler closes the listening socket immediately. Under BentoML the socket belongs to
    the supervisor process, which keeps it open until the worker has exited, so connections made in the
    meantime would wait unanswered and then be reset. Hence the worker keeps serving while it drains:
    new requests get a clean 503 (``GuardMiddleware``, gRPC ``ModelInfer``), and only once no accepted
    HTTP request is open and the batching queue is idle (or the deadline is near) is uvicorn's handler
    called. A second signal calls it at once.
    """
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(received: int, frame: t.Any, _previous: t.Any = previous) -> None:
            if not callable(_previous):
                if _previous == signal.SIG_DFL:
                    raise SystemExit(128 + received)
                return
            if runtime.draining:  # second signal: stop waiting
                _previous(received, frame)
                return
            runtime.begin_drain()  # starts the one shutdown clock: drain_timeout_s from now
            logger.info("signal %d: draining (readiness off, new requests answered 503)", received)
            loop.call_soon_threadsafe(_start_exit_after_drain, runtime, _previous, received, frame)

        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main thread (e.g. an embedded test server): uvicorn handles signals
            return


_BACKGROUND: set[asyncio.Task[None]] = set()  # keeps the drain task referenced until it is done


# Of the shutdown deadline, the part kept for what follows the drain: answering the requests cut short,
# uvicorn's and gRPC's stop, the worker's exit and the supervisor noticing it (measured: about 1 s here).
_EXIT_RESERVE_S, _EXIT_RESERVE_FRACTION = 2.0, 0.25


def _start_exit_after_drain(runtime: t.Any, uvicorn_exit: t.Callable[[int, t.Any], None], signum: int,
                            frame: t.Any) -> None:
    task = asyncio.get_running_loop().create_task(_exit_after_drain(runtime, uvicorn_exit, signum, frame))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _exit_after_drain(runtime: t.Any, uvicorn_exit: t.Callable[[int, t.Any], None], signum: int,
                            frame: t.Any) -> None:
    """Let accepted work finish until shortly before ``runtime.drain_deadline``, answer the rest 503, then
    let uvicorn exit with what is left of the deadline as its graceful timeout (not a second full one)."""
    reserve = min(_EXIT_RESERVE_S, _EXIT_RESERVE_FRACTION * runtime.drain_time_left())
    while (OPEN_REQUESTS.count > 0 or runtime.busy) and runtime.drain_time_left() > reserve:
        await asyncio.sleep(0.05)
    if OPEN_REQUESTS.count > 0 or runtime.busy:
        await runtime.stop(timeout_s=0)  # queued and running requests: 503 now, while it can still be sent
        while OPEN_REQUESTS.count > 0 and runtime.drain_time_left() > reserve / 2:
            await asyncio.sleep(0.02)
    # uvicorn_exit is its Server.handle_exit; the server reads its graceful timeout (the full
    # drain_timeout_s, from the command line) only once it stops, so it still gets just the time left.
    config = getattr(getattr(uvicorn_exit, "__self__", None), "config", None)
    if config is not None and hasattr(config, "timeout_graceful_shutdown"):
        config.timeout_graceful_shutdown = max(0.1, runtime.drain_time_left())
    uvicorn_exit(signum, frame)


def _runtime() -> t.Any:
    return PROCESS.runtime


def _settings() -> ServiceSettings:
    return SETTINGS


def _generation() -> t.Any:
    return None if PROCESS.runtime is None else PROCESS.runtime.generation


MedRefine.add_asgi_middleware(GuardMiddleware, runtime=_runtime, settings=_settings,
                              not_ready_reason=PROCESS.not_ready_reason, open_requests=OPEN_REQUESTS,
                              upload_limits={"/datasets": dataset_upload_limit})
MedRefine.add_asgi_middleware(BentoPagesMiddleware, api_key=lambda: SETTINGS.api_key)  # no Tag Manager page
# PassiveMount at "/" with prefix "/v2": GET /v2 answers directly (tritonclient does not follow redirects)
# while BentoML's own routes ("/", "/metrics", ...) still match first.
MedRefine.mount_asgi_app(create_oip_app(_runtime, prefix="/v2"), path="/", name="oip")
MedRefine.mount_asgi_app(create_platform_app(PLATFORM, settings=_settings,
                                             stopping=lambda: PROCESS.runtime is not None and PROCESS.runtime.draining,
                                             generation=_generation),
                         path="/", name="platform")
# BentoML's bentoml_service_* series are labelled by route, not by raw path: made-up paths add no series.
bound_bentoml_metric_paths([api.route for api in MedRefine.apis.values()])
# The guard's policy table must know every API, and every API must answer its own errors (via _rest_api).
if {api.route for api in MedRefine.apis.values()} != set(API_ROUTES) or not all(
        getattr(api.func, "answers_own_errors", False) for api in MedRefine.apis.values()):
    raise RuntimeError("every MedRefine API is declared with _rest_api and has a RoutePolicy in service.middleware")


if (UI_DIR / "index.html").is_file():
    from starlette.staticfiles import StaticFiles

    MedRefine.mount_asgi_app(StaticFiles(directory=str(UI_DIR), html=True), path="/ui", name="ui")
else:  # an install without the package data: serve the APIs anyway
    logger.warning("web UI files not found next to service/app.py; /ui is not served")
