"""``FrontEndRuntime``: what REST, OIP-HTTP and gRPC call on the runtime (``service.runtime.ServiceRuntime``).

Test doubles implement it in full (tests/support/runtime_doubles.py), so the front ends need no ``hasattr`` checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from inference.pipeline import RefineResult, SegmentOptions, SegmentResult
    from service.generation import GenerationRuntime
    from service.metrics import ServiceMetrics
    from service.model_versions import LoadedVersion, ModelVersions
    from service.settings import ServiceSettings

__all__ = ["FrontEndRuntime"]


@runtime_checkable
class FrontEndRuntime(Protocol):
    """The runtime as the transports see it; process lifecycle (start, drain, stop) stays with the app."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    versions: ModelVersions
    generation: GenerationRuntime | None  # None: generation is off
    live: bool
    draining: bool

    @property
    def ready(self) -> bool:
        """Takes new requests (started, not draining)."""
        ...

    @property
    def serving(self) -> bool:
        """Runs requests already accepted (also while draining)."""
        ...

    @property
    def model_version(self) -> str:
        ...

    @property
    def backend(self) -> str:
        ...

    def model_info(self) -> dict[str, Any]:
        ...

    def readiness(self) -> dict[str, Any]:
        """The ``/readyz`` body: ``ready`` (bool) and what it depends on."""
        ...

    def check_api_key(self, presented: str | None) -> bool:
        ...

    def check_capacity(self) -> None:
        """Raise ``QueueFullError`` (503) when the segmentation queue is full."""
        ...

    async def select_model(self, spec: str | None) -> LoadedVersion:
        ...

    async def select_oip_version(self, version: str) -> LoadedVersion:
        ...

    async def segment(self, image: np.ndarray, options: SegmentOptions | None = None, *, protocol: str,
                      spacing: Sequence[float] | None = None, model: LoadedVersion | None = None) -> SegmentResult:
        """``image (H, W) float32 in [0, 1]`` through the shared batching queue."""
        ...

    async def refine(self, image: np.ndarray, *, box: Sequence[float] | None = None,
                     points: Sequence[Sequence[float]] | None = None, point_labels: Sequence[float] | None = None,
                     prior_mask: np.ndarray | None = None, image_key: str | None = None,
                     threshold: float | None = None, spacing: Sequence[float] | None = None, protocol: str,
                     model: LoadedVersion | None = None) -> RefineResult:
        """Prompts in the image's pixel frame (``box`` (4,) xyxy, ``points`` (N, 2) xy)."""
        ...
