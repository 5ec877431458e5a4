"""One runtime double for the transports' tests: implements ``service.protocols.FrontEndRuntime`` in full."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.embedding_cache import CacheStats
from service.metrics import ServiceMetrics
from service.model_versions import DEFAULT_MODEL, LoadedVersion, ModelVersions
from service.settings import ServiceSettings

__all__ = ["FailingRuntime"]


class _NoInference:
    """The double's pipeline (``inference.protocols.Segmenter``): the runtime fails before it would run."""

    def __init__(self, version: str) -> None:
        self.version = version

    def segment(self, images, options=None, *, spacings=None):
        raise AssertionError("FailingRuntime never reaches its pipeline")

    def refine(self, image, **prompts):
        raise AssertionError("FailingRuntime never reaches its pipeline")

    def model_info(self) -> dict[str, Any]:
        return {"version": self.version}

    def cache_stats(self) -> CacheStats:
        return CacheStats(hits=0, misses=0, evictions=0, entries=0, bytes=0, max_bytes=0)

    preferred_batch_sizes: tuple[int, ...] = ()


class FailingRuntime:
    """A started runtime whose ``segment`` / ``refine`` raise ``error``: what the real batcher raises under
    load (QueueFullError, RequestTimeoutError, NotReady) or an unexpected bug (RuntimeError)."""

    def __init__(self, error: Exception, *, version: str = "v-test", ready: bool = True, live: bool = True) -> None:
        self.error = error
        self.settings = ServiceSettings()
        self.metrics = ServiceMetrics()
        pipeline = _NoInference(version)
        self.versions = ModelVersions(initial=LoadedVersion(DEFAULT_MODEL, None, pipeline, version))
        self.generation = None
        self.live = live
        self.draining = False
        self._ready = ready

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def serving(self) -> bool:
        return self._ready

    @property
    def model_version(self) -> str:
        return self.versions.default().artifact_version

    @property
    def backend(self) -> str:
        return self.settings.backend

    def model_info(self) -> dict[str, Any]:
        return {"version": self.model_version, "backend": self.backend}

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready, "live": self.live, "draining": self.draining, "backend": self.backend,
                "model_version": self.model_version}

    def check_api_key(self, presented: str | None) -> bool:
        return True

    def check_capacity(self) -> None:
        pass  # the queue has room: the failure comes when the request runs

    async def select_model(self, spec: str | None) -> LoadedVersion:
        return await self.versions.select(self.versions.resolve(spec))

    async def select_oip_version(self, version: str) -> LoadedVersion:
        return await self.versions.select(self.versions.resolve_oip(version))

    async def segment(self, image: np.ndarray, options: Any = None, *, protocol: str,
                      spacing: Sequence[float] | None = None, model: LoadedVersion | None = None) -> Any:
        raise self.error

    async def refine(self, image: np.ndarray, *, protocol: str, model: LoadedVersion | None = None,
                     **prompts: Any) -> Any:
        raise self.error
