"""``ServiceRuntime``: the one object every front end (REST, OIP-HTTP, gRPC) calls in a server process.

It owns the pipeline, the shared batching queue, the metrics and the process state (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.protocols import Segmenter
from service.batcher import AdaptiveBatcher, BatcherConfig
from service.errors import BadRequest, NotReady, PayloadTooLarge, client_error
from service.metrics import ServiceMetrics
from service.model_versions import DEFAULT_MODEL, LoadedVersion, ModelVersions, precision_report
from service.settings import ServiceSettings

if TYPE_CHECKING:  # the pipeline module imports torch; the runtime loads it on first use
    from inference.pipeline import RefineResult, SegmentOptions, SegmentResult
    from service.generation import GenerationRuntime

__all__ = ["RefineRequest", "ServiceRuntime", "SegmentRequest"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SegmentRequest:
    """One queued segmentation: ``image (H, W) float32 in [0, 1]``, its options and pixel spacing (mm)."""

    image: np.ndarray
    options: SegmentOptions
    spacing: tuple[float, float] | None = None
    pipeline: Segmenter | None = None  # the chosen version's pipeline (None: the runtime's start-up pipeline)


@dataclass(frozen=True, eq=False)
class RefineRequest:
    """One queued interactive refinement (prompts in the image's pixel frame)."""

    image: np.ndarray
    kwargs: dict[str, Any]
    pipeline: Segmenter | None = None


class ServiceRuntime:
    """The pipeline (built once from the verified artifact directory), the adaptive batcher in front of it,
    the metrics facade and the process state (``live``, ``ready``, ``draining``).

    Lifecycle: ``ServiceRuntime.load(settings)`` (blocking: loads and hash-verifies artifacts, builds the
    engine) -> ``await start()`` on the serving event loop (ready) -> ``begin_drain()`` (signal-safe:
    readiness false) -> ``await stop()`` (completes accepted requests, stops the worker thread).

    Args:
        settings: the process settings.
        pipeline: the start-up pipeline (``inference.pipeline.SegmentationPipeline``).
        metrics: the metrics facade (default: a new one over the module-level Prometheus objects).
        generation: the ``service.generation.GenerationRuntime`` (its own queue), or None when generation
            is off.
        versions: the registry versions requests may choose (``service.model_versions.ModelVersions``);
            default: only ``pipeline``.
    """

    def __init__(self, settings: ServiceSettings, pipeline: Segmenter, *, metrics: ServiceMetrics | None = None,
                 generation: GenerationRuntime | None = None, versions: ModelVersions | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.versions = versions or ModelVersions(
            initial=LoadedVersion(DEFAULT_MODEL, None, pipeline, str(pipeline.model_info().get("version", ""))))
        self.generation = generation
        self.metrics = metrics or ServiceMetrics()
        self.live = True
        self.draining = False
        self.drain_deadline: float | None = None  # time.monotonic() by which the whole shutdown is over
        self._cut_short = False  # a drain ran out of time and answered 503 to what was left
        self._started = False
        self._info = dict(pipeline.model_info())
        self._info.setdefault("backend", settings.backend)
        self.batcher: AdaptiveBatcher[SegmentRequest | RefineRequest, SegmentResult | RefineResult] = AdaptiveBatcher(
            self._run_batch,
            BatcherConfig(
                max_batch_size=settings.max_batch_size,
                max_latency_ms=settings.max_latency_ms,
                max_queue=settings.max_queue,
                timeout_s=settings.request_timeout_s,
                lanes=settings.inference_lanes,
                # A lone request goes at once, and the next batch waits at the worker while one runs: on a
                # shared CPU each loop wake-up between batches cost a scheduler slot (A/Bs in the README).
                adaptive_window=True,
                prefetch=True,
                # Whole static-shape batches: 11 waiting images run as 8 now and 3 with whoever comes next,
                # not as an 8 + 2 + 1 call (README, Performance).
                preferred_sizes=tuple(size for size in pipeline.preferred_batch_sizes
                                      if size <= settings.max_batch_size),
            ),
            observer=self.metrics,
        )
        self.metrics.set_model_info(self.model_version, self.backend)
        self.sync_metrics()

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: ServiceSettings, *, metrics: ServiceMetrics | None = None) -> ServiceRuntime:
        """Build the pipeline from ``settings.artifacts`` (every graph hash-verified against the manifest).

        Generators are loaded too when ``settings.generators_dir`` names a directory (always on ONNX Runtime,
        on the device ``settings`` picks for it).

        Raises:
            inference.artifacts.ArtifactError: the directory (or the generator directory) is missing,
                malformed or does not match.
        """
        from inference.pipeline import SegmentationPipeline

        started = time.perf_counter()
        pipeline = SegmentationPipeline.from_artifacts(
            settings.artifacts,
            settings.backend,
            embedding_cache_bytes=settings.embedding_cache_bytes,
            max_points=settings.max_points,
            **engine_options(settings),
        )
        generation = load_generation(settings)

        def load_version(art_dir: Path) -> Segmenter:  # another registry version, on first use
            return SegmentationPipeline.from_artifacts(
                art_dir, settings.backend, embedding_cache_bytes=settings.embedding_cache_bytes,
                max_points=settings.max_points, **engine_options(settings))

        from service.model_versions import open_versions

        versions = open_versions(settings.artifacts, pipeline, load_version)
        runtime = cls(settings, pipeline, metrics=metrics, generation=generation, versions=versions)
        logger.info("model %s loaded on %s in %.1f s%s", runtime.model_version[:12], runtime.backend,
                    time.perf_counter() - started,
                    f"; generators {generation.version[:12]} from {settings.generators_dir}" if generation else "")
        return runtime

    # -- state ------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once started and until draining begins (artifacts were verified when the pipeline loaded)."""
        return self._started and not self.draining and self.batcher.accepting

    @property
    def serving(self) -> bool:
        """True while accepted requests can still run: started and the batcher not stopped (also while draining)."""
        return self._started and self.batcher.accepting

    @property
    def busy(self) -> bool:
        """True while any queue holds or runs work (segmentation or generation)."""
        return self.batcher.busy or (self.generation is not None and self.generation.batcher.busy)

    @property
    def model_version(self) -> str:
        return str(self._info.get("version", ""))

    @property
    def backend(self) -> str:
        return str(self._info.get("backend", self.settings.backend))

    def model_info(self) -> dict[str, Any]:
        """The served model: ``version`` (artifact manifest version), ``backend`` and pipeline details."""
        return dict(self._info)

    def readiness(self) -> dict[str, Any]:
        """The ``/readyz`` body."""
        report: dict[str, Any] = {
            "ready": self.ready,
            "live": self.live,
            "draining": self.draining,
            "backend": self.backend,
            "model_version": self.model_version,
            "precision": precision_report(self._info),
            "queue_depth": self.batcher.queue_depth,
            "loaded_versions": self.versions.loaded(),
            "generation": self.generation.info() if self.generation is not None else None,
        }
        if not self.ready:
            report["reason"] = "draining for shutdown" if self.draining else "starting"
        return report

    def check_api_key(self, presented: str | None) -> bool:
        """Constant-time comparison with the configured key; True when authentication is off."""
        expected = self.settings.api_key
        if not expected:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))

    def check_capacity(self) -> None:
        """Refuse early (before a request's upload is decoded) when the batching queue is already full.

        Cheap and advisory: ``segment`` / ``refine`` check again when they queue. Draining does not refuse
        here, so requests accepted before SIGTERM are still served.

        Raises:
            QueueFullError: 503 + Retry-After.
        """
        self.batcher.check_capacity()

    async def start(self) -> None:
        """Start the batchers on the running loop; the runtime is ready afterwards."""
        await self.batcher.start()
        if self.generation is not None:
            await self.generation.start()
        self._started = True

    def begin_drain(self) -> None:
        """Turn readiness off and start the shutdown clock (safe to call from a signal handler); requests
        already accepted still run. The first call fixes ``drain_deadline`` = now + ``drain_timeout_s``:
        one deadline for the whole shutdown, however many steps it has."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self.draining = True

    def drain_time_left(self) -> float:
        """Seconds left until ``drain_deadline`` (>= 0); the full ``drain_timeout_s`` before draining began."""
        if self.drain_deadline is None:
            return float(self.settings.drain_timeout_s)
        return max(0.0, self.drain_deadline - time.monotonic())

    async def stop(self, timeout_s: float | None = None) -> bool:
        """Drain: refuse new requests, complete accepted ones, stop the inference threads. What is still
        queued or running when the time is up is answered 503 (``NotReady``) at once; a running
        generation loop drops those requests at its next step.

        Args:
            timeout_s: how long accepted requests may still run; default: until ``drain_deadline``.

        Returns:
            True if every accepted request completed (in this call and any earlier one).
        """
        self.begin_drain()
        timeout = self.drain_time_left() if timeout_s is None else max(0.0, timeout_s)
        deadline = time.monotonic() + timeout
        completed = await self.batcher.drain(timeout)
        if self.generation is not None:
            completed = await self.generation.drain(max(0.0, deadline - time.monotonic())) and completed
        self._cut_short = self._cut_short or not completed
        self.sync_metrics()
        return not self._cut_short

    # -- inference --------------------------------------------------------------------------------------

    async def select_model(self, spec: str | None) -> LoadedVersion:
        """The version a REST ``model`` field names (``name``, ``name:3``, ``name@alias``; None: the default
        model's production), loaded on first use. Raises NotFound (404) / BadRequest (400), field ``model``."""
        return await self.versions.select(self.versions.resolve(spec))

    async def select_oip_version(self, version: str) -> LoadedVersion:
        """As :meth:`select_model` for an OIP/gRPC ``model_version`` (``""``: production); field ``version``."""
        return await self.versions.select(self.versions.resolve_oip(version))

    async def segment(self, image: np.ndarray, options: SegmentOptions | None = None, *, protocol: str,
                      spacing: Sequence[float] | None = None, model: LoadedVersion | None = None) -> SegmentResult:
        """Segment one image through the shared batching queue.

        Images with equal options (threshold, gate) share batches whatever arrays they asked for: the
        batch computes every output array and each caller gets the ones its ``options.outputs`` names.

        Args:
            image: ``(H, W) float32 in [0, 1]``.
            options: ``inference.pipeline.SegmentOptions`` or None for the model's defaults.
            protocol: ``"rest"``, ``"oip-http"`` or ``"grpc"`` (for logs).
            spacing: ``(row, col)`` pixel spacing in mm for ``area_mm2``, or None.
            model: the version to run (:meth:`select_model`); None: the start-up pipeline.

        Returns:
            ``inference.pipeline.SegmentResult``.

        Raises:
            QueueFullError (503), RequestTimeoutError (504), NotReady (503), PayloadTooLarge (413),
            BadRequest (400: image or option checks).
        """
        from inference.pipeline import OUTPUT_ARRAYS, SegmentOptions

        image = self._checked_image(image)
        options = options if options is not None else SegmentOptions()
        wanted = tuple(options.outputs)
        batch_options = dataclasses.replace(options, outputs=OUTPUT_ARRAYS)
        pipeline = model.pipeline if model is not None else self.pipeline
        request = SegmentRequest(image, batch_options, _spacing(spacing), pipeline)
        # The version is part of the batch key: one queue (one bound, one inference thread) for all
        # versions, and a batch never mixes them.
        version_key = model.key if model is not None else None
        with self.metrics.inflight():
            result = await self.batcher.submit(request, ("segment", version_key, batch_options))
        dropped = {name: None for name in OUTPUT_ARRAYS if name not in wanted}
        return dataclasses.replace(result, **dropped) if dropped else result

    async def refine(
        self,
        image: np.ndarray,
        *,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[float] | None = None,
        prior_mask: np.ndarray | None = None,
        image_key: str | None = None,
        threshold: float | None = None,
        spacing: Sequence[float] | None = None,
        protocol: str,
        model: LoadedVersion | None = None,
    ) -> RefineResult:
        """Refine one image with user prompts (box / points / prior mask) through the shared queue.

        Prompts are in the image's pixel frame: ``box`` (4,) xyxy, ``points`` (N, 2) xy with
        ``point_labels`` (N,) in {0, 1}, ``prior_mask`` (H, W) in [0, 1]. The image embedding is cached
        under ``image_key`` (default: the pixels' sha256), so editing the prompts on the same image only
        re-runs the decoder.

        Returns:
            ``inference.pipeline.RefineResult`` (with ``cache_hit``).

        Raises:
            As :meth:`segment`; BadRequest names the prompt at fault.
        """
        image = self._checked_image(image)
        if points is not None and len(points) > self.settings.max_points:
            raise BadRequest(f"{len(points)} points given, at most {self.settings.max_points} allowed (max_points)",
                             "points")
        if box is None and points is None and prior_mask is None:
            raise BadRequest("refine needs a prompt: a box, points or a prior mask", "box")
        kwargs = {"box": box, "points": points, "point_labels": point_labels, "prior_mask": prior_mask,
                  "image_key": image_key, "threshold": threshold, "spacing": _spacing(spacing)}
        with self.metrics.inflight():
            return await self.batcher.submit(RefineRequest(image, kwargs, model.pipeline if model else None),
                                             ("refine",), batchable=False)

    # -- internals --------------------------------------------------------------------------------------

    def _checked_image(self, image: np.ndarray) -> np.ndarray:
        if not self._started:
            raise NotReady("server is starting: the model is not ready yet")
        array = np.asarray(image)
        if array.ndim != 2:
            raise BadRequest(f"image must be 2-D (H, W) grayscale, got shape {tuple(array.shape)}", "image")
        height, width = array.shape
        if height < 1 or width < 1:
            raise BadRequest(f"image is empty (shape {tuple(array.shape)})", "image")
        if height * width > self.settings.max_pixels:
            raise PayloadTooLarge(
                f"image of {width}x{height} = {height * width} pixels is over the limit of "
                f"{self.settings.max_pixels} pixels (max_pixels)", "image")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise BadRequest("image values must be finite and in [0, 1]", "image")
        return array

    def sync_metrics(self) -> None:
        """Mirror the embedding cache counters into the Prometheus metrics (also called on each scrape)."""
        stats = self.pipeline.cache_stats()
        self.metrics.sync_cache(int(stats.hits), int(stats.misses), int(stats.bytes))

    def _run_batch(self, key: Hashable, items: list[Any]) -> list[Any]:
        """Worker-thread side of the batcher: one pipeline call per batch; failures isolated per item."""
        try:
            if key[0] == "segment":
                results = self._segment_batch(items)
            else:
                results = [self._refine_one(item) for item in items]
        finally:
            self.sync_metrics()
        return results

    def _segment_batch(self, items: list[SegmentRequest]) -> list[SegmentResult | Exception]:
        images = [item.image for item in items]
        try:
            results = (items[0].pipeline or self.pipeline).segment(
                images, items[0].options, spacings=[item.spacing for item in items]
            )
        except Exception as exc:
            if len(items) == 1:
                return [self._client_error(exc)]
            # One bad image must not fail its neighbours: retry one by one.
            return [self._segment_one(item) for item in items]
        self._observe_timings(results[0] if results else None)
        return list(results)

    def _segment_one(self, item: SegmentRequest) -> SegmentResult | Exception:
        try:
            (result,) = (item.pipeline or self.pipeline).segment([item.image], item.options, spacings=[item.spacing])
        except Exception as exc:
            return self._client_error(exc)
        self._observe_timings(result)
        return result

    def _refine_one(self, item: RefineRequest) -> RefineResult | Exception:
        try:
            result = (item.pipeline or self.pipeline).refine(item.image, **item.kwargs)
        except Exception as exc:
            return self._client_error(exc)
        self._observe_timings(result)
        return result

    def _observe_timings(self, result: SegmentResult | RefineResult | None) -> None:
        timings = result.timings if result is not None else None
        if timings:
            self.metrics.observe_stages(timings)

    @staticmethod
    def _client_error(exc: Exception) -> Exception:
        return client_error(exc, generic="inference failed; see the server log")


def _spacing(spacing: Sequence[float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    values = tuple(float(v) for v in spacing)
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise BadRequest(f"spacing must be two positive numbers (row, col) in mm, got {list(values)}", "spacing")
    return values  # type: ignore[return-value]


def load_generation(settings: ServiceSettings) -> GenerationRuntime | None:
    """The ``GenerationRuntime`` over ``settings.generators_dir`` (ONNX Runtime), or None when it is off.

    Raises:
        inference.artifacts.ArtifactError: the directory is missing, malformed or does not match its manifest.
    """
    from inference.synthesizer import load_served_generators
    from medplatform.synthesizer import choose_synthesizer
    from service.generation import GenerationRuntime

    options = engine_options(dataclasses.replace(settings, backend="onnxruntime", precision="auto",
                                                 device="cpu" if settings.device == "tensorrt" else settings.device))
    # /synthesize serves the generator MEDREFINE_SYNTHESIZER chooses (a GenSeg export), else stage one's
    generators = load_served_generators(settings.generators_dir, choose_synthesizer(settings.synthesizer), **options)
    return None if generators is None else GenerationRuntime(generators, settings)


def engine_options(settings: ServiceSettings) -> dict[str, Any]:
    """Engine keyword options for ``settings.backend`` from ``device``, ``intra_op_threads`` and ``precision``.

    ``device="auto"`` picks CUDA when the backend can use it here (onnxruntime: the CUDA execution provider
    is installed; torch: a CUDA device is visible), else the CPU; TensorRT always runs on a GPU.
    """
    device = settings.device
    if settings.backend == "onnxruntime":
        opts: dict[str, Any] = {}
        if device == "auto":
            import onnxruntime

            device = "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
        opts["device"] = "cuda" if device.startswith("cuda") else device
        if settings.intra_op_threads:
            opts["intra_op_threads"] = settings.intra_op_threads
        return opts
    if settings.backend == "openvino":  # the CPU only (settings refuse another device)
        opts = {"intra_op_threads": settings.intra_op_threads} if settings.intra_op_threads else {}
        if settings.precision != "auto":
            opts["precision"] = settings.precision
        return opts
    if settings.backend == "torch":
        return {} if device == "auto" else {"device": device}
    if settings.backend == "tensorrt":
        return {"device": int(device[5:])} if device.startswith("cuda:") else {}
    return {}
