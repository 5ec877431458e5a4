"""``GenerationRuntime``: text + modality -> images and mask -> image, behind a batching queue of their own.

Why a second queue, and how requests batch: docs/architecture.md ("service").
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.protocols import BEST_OF_RANKERS
from service.batcher import AdaptiveBatcher, BatcherConfig
from service.errors import BadRequest, NotFound, NotReady, PayloadTooLarge, ServiceError, client_error
from service.metrics import GENERATION_BATCH_SIZE, GENERATION_QUEUE_DEPTH, GENERATION_STEPS, STAGE_LATENCY
from service.settings import ServiceSettings

if TYPE_CHECKING:  # both import torch; the runtime loads them only when generation is on
    from inference.generation import GenerationRequest, Pix2PixPipeline, Text2ImagePipeline
    from inference.generator_artifacts import Generators
    from inference.protocols import ImageScorer

__all__ = ["GenerateResult", "GenerationRuntime", "SynthesizeResult"]


@dataclass(frozen=True)
class GenerateResult:
    """``images (N, S, S) uint8`` prompt-major, the ``seed`` used, for best-of the ``scores (N,)`` of the kept
    images and ``ranked_by`` (one of ``BEST_OF_RANKERS``)."""

    images: np.ndarray
    seed: int
    scores: np.ndarray | None
    seconds: float
    ranked_by: str | None = None


@dataclass(frozen=True)
class SynthesizeResult:
    """``image (H, W) uint8`` generated from a mask of the same size."""

    image: np.ndarray
    seconds: float


@dataclass(frozen=True, eq=False)
class _GenerateItem:
    request: GenerationRequest
    best_of: int | None
    scorer: ImageScorer | None = None  # ranks best-of-N; None: the pipeline's selector
    # Set once nobody waits for the answer (answered, timed out, client gone, shutdown): the denoising
    # loop drops this request's images at its next step instead of finishing orphaned work.
    abandoned: threading.Event = field(default_factory=threading.Event)

    def wanted(self) -> bool:
        """Asked by the denoising loop before each step (worker thread); counts the steps run."""
        if self.abandoned.is_set():
            return False
        GENERATION_STEPS.inc()
        return True


class _QueueObserver:
    """The generation batcher's metrics (``medrefine_generation_*``), apart from segmentation's."""

    def observe_queue_depth(self, depth: int) -> None:
        GENERATION_QUEUE_DEPTH.set(depth)

    def observe_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        GENERATION_BATCH_SIZE.observe(size)


class GenerationRuntime:
    """The generator pipelines of a generator artifact directory behind an ``AdaptiveBatcher`` of their own;
    REST (``/generate``, ``/synthesize``), OIP-HTTP and gRPC (models ``generate``, ``synthesize``) share it.

    Args:
        generators: a ``inference.generator_artifacts.Generators`` (``text2image`` and ``pix2pix`` pipelines,
            either may be None; ``version``; ``info``).
        settings: the process settings (limits and batching).
    """

    def __init__(self, generators: Generators, settings: ServiceSettings) -> None:
        from inference.generation import GenerationLimits

        self.generators = generators
        self.settings = settings
        if generators.text2image is not None:
            generators.text2image.limits = GenerationLimits(
                max_steps=settings.generation_max_steps,
                max_images=settings.generation_max_images,
                max_total_images=settings.generation_max_images,
            )
        self.batcher: AdaptiveBatcher[Any, Any] = AdaptiveBatcher(
            self._run_batch,
            BatcherConfig(
                max_batch_size=settings.max_batch_size,
                max_latency_ms=settings.max_latency_ms,
                max_queue=settings.generation_max_queue,
                timeout_s=settings.request_timeout_s,
            ),
            observer=_QueueObserver(),
            name="medrefine-generate",
        )

    # -- state ------------------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return str(self.generators.version)

    @property
    def text2image(self) -> Text2ImagePipeline:
        """The text + modality pipeline; NotFound (404) when the artifacts have none."""
        if self.generators.text2image is None:
            raise NotFound("text-to-image generation is not enabled on this server (its generator artifacts "
                           "have no denoiser graph)")
        return self.generators.text2image

    @property
    def pix2pix(self) -> Pix2PixPipeline:
        """The mask-to-image pipeline; NotFound (404) when the artifacts have none."""
        if self.generators.pix2pix is None:
            raise NotFound("mask-to-image synthesis is not enabled on this server (its generator artifacts have "
                           "no pix2pix graph)")
        return self.generators.pix2pix

    def info(self) -> dict[str, Any]:
        """What ``/readyz`` and model metadata report: version, modalities, image sizes, limits, and ``rank_by``,
        what best-of-N can be ranked by here."""
        info = dict(self.generators.info)
        info.update(version=self.version, rank_by=[name for name in BEST_OF_RANKERS if info.get(name)],
                    max_images=self.settings.generation_max_images,
                    max_steps=self.settings.generation_max_steps, queue_depth=self.batcher.queue_depth)
        return info

    def check_capacity(self) -> None:
        """QueueFullError (503 + Retry-After) when the generation queue is full."""
        self.batcher.check_capacity()

    async def start(self) -> None:
        await self.batcher.start()

    async def drain(self, timeout_s: float) -> bool:
        return await self.batcher.drain(timeout_s)

    # -- requests ---------------------------------------------------------------------------------------

    async def generate(
        self,
        prompts: list[str],
        modalities: list[str],
        *,
        negative_prompts: list[str] | None = None,
        guidance_scale: float = 1.5,
        steps: int = 25,
        seed: int | None = None,
        num_images: int = 1,
        best_of: int | None = None,
        rank_by: str | None = None,
    ) -> GenerateResult:
        """Text + modality -> images through the generation queue.

        ``seed`` None draws one (returned, so the call can be repeated exactly). ``best_of`` N generates N
        candidates per prompt and returns the best one (``num_images`` must then be 1), ranked by ``rank_by``
        (``"selector"``, the default, or ``"reward"``: the reward model the artifacts hold after RLHF).

        Raises:
            BadRequest (400) naming the argument at fault, NotFound (404) without a text2image graph,
            QueueFullError (503), RequestTimeoutError (504).
        """
        from inference.generation import GenerationRequest

        pipeline = self.text2image
        if seed is None:
            seed = secrets.randbelow(2**31)
        if best_of is not None and num_images != 1:
            raise BadRequest(f"num_images = {num_images} with best_of = {best_of}: best-of returns one image per "
                             "prompt; set only one of them", "best_of")
        scorer = self._ranker(rank_by, best_of)
        request = GenerationRequest(list(prompts), list(modalities), negative_prompts, guidance_scale, steps, seed,
                                    best_of if best_of is not None else num_images)
        try:
            if best_of is not None:
                pipeline.check_candidates(best_of, scorer)
            pipeline.check_request(request)
        except ValueError as exc:
            raise _client_error(exc) from None
        item = _GenerateItem(request, best_of, scorer)
        try:
            images, scores, seconds = await self.batcher.submit(item, ("generate", int(request.steps)))
        finally:
            item.abandoned.set()
        ranked_by = None if best_of is None else rank_by or "selector"
        return GenerateResult(images=images, seed=int(seed), scores=scores, seconds=seconds, ranked_by=ranked_by)

    def _ranker(self, rank_by: str | None, best_of: int | None) -> ImageScorer | None:
        """The scorer ``rank_by`` names (None: the pipeline's selector); 400 naming ``rank_by`` for an unknown
        name, a reward ranking these artifacts cannot do, or a ranking without ``best_of``."""
        if rank_by is None:
            return None
        if rank_by not in BEST_OF_RANKERS:
            raise BadRequest(f"rank_by: {rank_by!r}; expected one of {list(BEST_OF_RANKERS)}", "rank_by")
        if best_of is None:
            raise BadRequest(f"rank_by = {rank_by!r} without best_of: only best-of-N is ranked", "rank_by")
        if rank_by == "selector":
            return None
        if self.generators.reward is None:
            raise BadRequest("rank_by: 'reward' needs a reward model; these generator artifacts have none (export "
                             "a generators directory that `python -m training rlhf` wrote)", "rank_by")
        return self.generators.reward

    async def synthesize(self, mask: np.ndarray) -> SynthesizeResult:
        """A mask ``(H, W)`` (any dtype; nonzero = foreground) -> an image ``(H, W) uint8``.

        Raises:
            BadRequest (400), PayloadTooLarge (413: over ``max_pixels``), NotFound (404), 503, 504.
        """
        self.pix2pix  # noqa: B018  (404 before queueing when there is no pix2pix graph)
        array = np.asarray(mask)
        if array.ndim != 2 or min(array.shape, default=0) < 1:
            raise BadRequest(f"mask must be a non-empty 2-D (H, W) array, got shape {list(array.shape)}", "mask")
        if array.size > self.settings.max_pixels:
            raise PayloadTooLarge(f"mask of {array.shape[1]}x{array.shape[0]} = {array.size} pixels is over the "
                                  f"limit of {self.settings.max_pixels} pixels (max_pixels)", "mask")
        binary = (array != 0).astype(np.uint8)
        image, seconds = await self.batcher.submit(binary, ("synthesize",))
        return SynthesizeResult(image=image, seconds=seconds)

    # -- worker thread ----------------------------------------------------------------------------------

    def _run_batch(self, key: Hashable, items: list[Any]) -> list[Any]:
        run = self._generate_batch if key[0] == "generate" else self._synthesize_batch
        try:
            return run(items)
        except Exception as exc:
            if len(items) == 1:
                return [_client_error(exc)]
        results = []
        for item in items:  # one failing request must not fail its neighbours
            try:
                results.append(run([item])[0])
            except Exception as exc:
                results.append(_client_error(exc))
        return results

    def _generate_batch(self, items: list[_GenerateItem]) -> list[Any]:
        from inference.generation import to_uint8

        started = time.perf_counter()
        pipeline = self.text2image
        samples = pipeline.sample_many([item.request for item in items], wanted=lambda i: items[i].wanted())
        results: list[Any] = []
        for item, images in zip(items, samples, strict=True):
            if images is None:  # dropped: nobody waits for this answer any more
                results.append(None)
            elif item.best_of is None:
                results.append((to_uint8(images), None))
            else:
                results.append(pipeline.select_best(images, item.request.modalities, item.best_of, item.scorer))
        seconds = time.perf_counter() - started
        STAGE_LATENCY.labels(stage="generate").observe(seconds)
        return [NotReady("generation stopped: nobody waits for this answer") if result is None
                else (*result, seconds) for result in results]

    def _synthesize_batch(self, masks: list[np.ndarray]) -> list[Any]:
        from inference.generation import to_uint8

        started = time.perf_counter()
        images = self.pix2pix.sample_many(masks)
        seconds = time.perf_counter() - started
        STAGE_LATENCY.labels(stage="synthesize").observe(seconds)
        return [(to_uint8(image)[0], seconds) for image in images]


def _client_error(exc: BaseException) -> ServiceError:
    return client_error(exc, generic="generation failed; see the server log")
