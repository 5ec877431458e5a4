"""Which registered model versions this server holds loaded: at most K (LRU, the production one pinned),
each loaded on first use from ``registry.materialize`` (hash-verified); requests name ``name[:v|@alias]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from inference.protocols import Segmenter
from service.errors import BadRequest, NotFound, ServiceError

if TYPE_CHECKING:
    from medplatform.registry import ModelRegistry

__all__ = ["LoadedVersion", "LoadedVersions", "ModelVersions", "open_versions", "precision_report"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"  # medplatform.registry.DEFAULT_MODEL, without importing SQLAlchemy here
PRODUCTION = "production"
DEFAULT_MAX_LOADED = 2
DEFAULT_TTL_S = 1.0  # how stale an alias may be in a process that did not move it itself

Key = tuple[str, int | None]  # (model name, registry version); None: the one version of a registry-less server


def precision_report(info: Mapping[str, Any]) -> dict[str, Any]:
    """What /readyz and every answer say about precision, from a pipeline's ``model_info()``:
    ``{"artifacts": "fp32+int8", "graphs": {"transunet": "int8", "image_encoder": "fp32", ...}}``."""
    engine = info.get("engine") or {}
    return {"artifacts": str(info.get("precision", "fp32")), "graphs": dict(engine.get("precision") or {})}


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    """One loaded model version: its pipeline (``inference.pipeline.SegmentationPipeline``) and names."""

    name: str
    version: int | None  # None: served without a registry (the artifacts the server was started with)
    pipeline: Segmenter
    artifact_version: str

    @property
    def key(self) -> Key:
        return (self.name, self.version)

    @property
    def label(self) -> str:
        """What answers carry: ``name:version``, or the artifact (manifest) version without a registry."""
        return self.artifact_version if self.version is None else f"{self.name}:{self.version}"

    @property
    def oip_version(self) -> str:
        """The version as the Open Inference Protocol names it (``/v2/models/segment/versions/{v}``)."""
        return self.artifact_version if self.version is None else str(self.version)


class LoadedVersions(Protocol):
    """What the platform API asks before deleting a version (a loaded one is refused)."""

    def is_loaded(self, name: str, version: int) -> bool: ...


class ModelVersions:
    """Resolve model references and keep at most ``max_loaded`` versions loaded (least recently used go).

    Args:
        registry: a ``medplatform.registry.ModelRegistry``, or None to serve only ``initial``.
        loader: ``loader(art_dir) -> pipeline`` (blocking; runs in a worker thread).
        default_name: the model a request gets when it names none (its ``production`` alias).
        max_loaded: K >= 1; the production version of ``default_name`` is never evicted.
        ttl_s: how long a resolved alias or version list is trusted (``on_alias_changed`` clears it at once).
        initial: an already loaded version (the artifacts the server started with).
    """

    def __init__(self, *, registry: ModelRegistry | None = None, loader: Callable[[Path], Segmenter] | None = None,
                 default_name: str = DEFAULT_MODEL, max_loaded: int = DEFAULT_MAX_LOADED,
                 ttl_s: float = DEFAULT_TTL_S, initial: LoadedVersion | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded} (MEDREFINE_MAX_LOADED_VERSIONS)")
        if registry is None and initial is None:
            raise ValueError("ModelVersions without a registry needs the initial version")
        self.registry = registry
        self.loader = loader
        self.default_name = default_name
        self.max_loaded = max_loaded
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded: OrderedDict[Key, LoadedVersion] = OrderedDict()  # oldest use first
        self._loading: dict[Key, threading.Lock] = {}
        self._aliases: dict[tuple[str, str], tuple[int, float]] = {}  # (name, alias) -> (version, expires)
        self._numbers: dict[str, tuple[tuple[int, ...], float]] = {}  # name -> (live versions, expires)
        self._pinned: Key | None = initial.key if initial is not None else None  # last known production
        self.loads = 0  # versions loaded after start-up (for tests and logs)
        if initial is not None:
            self._loaded[initial.key] = initial

    # -- resolving --------------------------------------------------------------------------------------

    def resolve(self, spec: str | None) -> Key:
        """``None`` -> the default model's production; ``name``, ``name:3``, ``name@alias`` -> (name, version).

        Raises:
            service.errors.NotFound (404, field ``model``): no such model, version or alias.
            service.errors.BadRequest (400, field ``model``): not of the form ``name[:version|@alias]``.
        """
        if self.registry is None:
            (only,) = self._loaded.values()
            if spec in (None, "", only.name, f"{only.name}@{PRODUCTION}"):
                return only.key
            raise NotFound(f"model {spec!r} is not served here; this server serves only {only.name!r} "
                           "(no model registry)", "model")
        from medplatform.errors import InvalidValue
        from medplatform.registry import parse_model_spec

        if not spec:
            return self._resolve(self.default_name, None, "model")
        try:
            name, ref = parse_model_spec(spec)
        except InvalidValue as exc:
            raise BadRequest(f"model {spec!r}: expected name, name:VERSION or name@ALIAS", "model") from exc
        return self._resolve(name, ref, "model")

    def resolve_oip(self, version: str) -> Key:
        """An OIP/gRPC version of the ``segment`` model: ``""`` -> production, ``"3"`` -> version 3 of the
        default model. Raises ``NotFound`` (field ``version``)."""
        if self.registry is None:
            (only,) = self._loaded.values()
            if version in ("", only.oip_version):
                return only.key
            raise NotFound(f"model 'segment' has no version {version!r}", "version")
        if not version:
            return self._resolve(self.default_name, None, "version")
        if not version.isdigit():
            raise NotFound(f"model 'segment' has no version {version!r}; versions are registry numbers "
                           f"of {self.default_name!r}: {', '.join(self.oip_versions())}", "version")
        return self._resolve(self.default_name, int(version), "version")

    def _resolve(self, name: str, ref: int | str | None, field: str) -> Key:
        if isinstance(ref, int):
            if ref not in self.numbers(name, field) and ref not in self.numbers(name, field, fresh=True):
                raise NotFound(f"model {name!r} has no version {ref}; versions: "
                               f"{', '.join(map(str, self.numbers(name, field))) or 'none'}", field)
            return (name, ref)
        alias = PRODUCTION if ref is None else ref.lstrip("@")
        now = self._clock()
        with self._lock:
            cached = self._aliases.get((name, alias))
        if cached is not None and cached[1] > now:
            return (name, cached[0])
        from medplatform.errors import NotFound as RegistryNotFound

        try:
            version = self.registry.resolve(name, f"@{alias}").version
        except RegistryNotFound as exc:
            what = f"model {name!r}" if exc.field == "name" else f"alias {alias!r} of model {name!r}"
            raise NotFound(f"{what} is not registered", field) from exc
        with self._lock:
            self._aliases[(name, alias)] = (version, now + self.ttl_s)
            if (name, alias) == (self.default_name, PRODUCTION):
                self._pinned = (name, version)
        return (name, version)

    def numbers(self, name: str, field: str = "model", *, fresh: bool = False) -> tuple[int, ...]:
        """Live registry versions of ``name`` (cached for ``ttl_s``). Raises ``NotFound`` for an unknown name."""
        if self.registry is None:
            return ()
        now = self._clock()
        with self._lock:
            cached = self._numbers.get(name)
        if cached is not None and cached[1] > now and not fresh:
            return cached[0]
        from medplatform.errors import NotFound as RegistryNotFound

        try:
            numbers = tuple(info.version for info in self.registry.list_versions(name))
        except RegistryNotFound as exc:
            raise NotFound(f"model {name!r} is not registered", field) from exc
        with self._lock:
            self._numbers[name] = (numbers, now + self.ttl_s)
        return numbers

    def oip_versions(self) -> tuple[str, ...]:
        """The ``segment`` model's versions for OIP metadata: the one served by default first."""
        if self.registry is None:
            return tuple(v.oip_version for v in self._loaded.values())
        production = self._resolve(self.default_name, None, "version")[1]
        return (str(production), *(str(n) for n in self.numbers(self.default_name) if n != production))

    def on_alias_changed(self, name: str) -> None:
        """Forget what was resolved for ``name``: the next request reads the registry (promotion, rollback)."""
        with self._lock:
            for key in [k for k in self._aliases if k[0] == name]:
                del self._aliases[key]
            self._numbers.pop(name, None)

    # -- loading ----------------------------------------------------------------------------------------

    async def select(self, key: Key) -> LoadedVersion:
        """The loaded version ``key``, loading it first (in a worker thread) when it is not loaded."""
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
                return loaded
        return await asyncio.to_thread(self.load, key)

    def load(self, key: Key) -> LoadedVersion:
        """Blocking: materialize (re-hash) and load ``key`` once, however many requests wait for it."""
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is not None:
                    self._loaded.move_to_end(key)
                    return loaded
            name, version = key
            assert version is not None
            started = time.perf_counter()
            pipeline = self._load_pipeline(name, version)
            loaded = LoadedVersion(name, version, pipeline, str(pipeline.model_info().get("version", "")))
            with self._lock:
                self._loaded[key] = loaded
                self.loads += 1
                self._evict()
                self._loading.pop(key, None)
            logger.info("model %s loaded in %.1f s; loaded: %s", loaded.label, time.perf_counter() - started,
                        ", ".join(self.loaded()))
            return loaded

    def _load_pipeline(self, name: str, version: int) -> Segmenter:
        """Materialize (every file re-hashed) and build; refusals become client-visible errors without paths."""
        from medplatform.errors import IntegrityFailure
        from medplatform.errors import NotFound as RegistryNotFound

        assert self.registry is not None and self.loader is not None
        try:
            family = self.registry.get_version(name, version).family
            if family != "segmentation":  # e.g. a synthesizer registered beside the segmentation models
                raise BadRequest(f"model {name}:{version} is a {family} version, not a segmentation model; "
                                 "/synthesize serves registered generators", "model")
            return self.loader(self.registry.materialize(name, version))
        except RegistryNotFound as exc:  # deleted since it was resolved
            raise NotFound(f"model {name}:{version} is no longer registered", "model") from exc
        except IntegrityFailure as exc:
            logger.error("model %s:%d refused: %s", name, version, exc)
            raise ServiceError(f"model {name}:{version} cannot be served: its stored artifacts fail their "
                               "sha256 check (see the server log)", "model", code=500) from exc
        except BadRequest:
            raise
        except Exception as exc:
            logger.exception("model %s:%d failed to load", name, version)
            raise ServiceError(f"model {name}:{version} failed to load (see the server log)", "model",
                               code=500) from exc

    def _evict(self) -> None:
        """Drop least recently used versions beyond ``max_loaded`` (caller holds the lock). A batch already
        running on an evicted version keeps its pipeline alive until it finishes."""
        for key in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                break
            if key != self._pinned:
                logger.info("model %s unloaded (least recently used of %d)", self._loaded[key].label,
                            len(self._loaded))
                del self._loaded[key]

    def is_loaded(self, name: str, version: int) -> bool:
        with self._lock:
            return (name, version) in self._loaded

    def loaded(self) -> list[str]:
        """Labels of the loaded versions, least recently used first."""
        with self._lock:
            return [v.label for v in self._loaded.values()]

    def default(self) -> LoadedVersion | None:
        """The default model's production version if it is loaded (for probes; never loads)."""
        try:
            key = self.resolve(None)
        except NotFound:
            return None
        with self._lock:
            return self._loaded.get(key)


def open_versions(art_dir: Path, startup: Segmenter, loader: Callable[[Path], Segmenter],
                  env: Mapping[str, str] | None = None) -> ModelVersions:
    """Wire the platform (``open_platform``: the database under MEDREFINE_DATA_DIR, migrated), register the
    artifacts the server started with (``ensure_default_registered``) and serve registry versions.

    ``MEDREFINE_MODEL_NAME`` (default ``default``) names the model; ``MEDREFINE_MAX_LOADED_VERSIONS`` (2) is
    K. When the platform cannot be opened (no ``medplatform`` package, a read-only data directory, artifacts
    without their run directory) the server serves just ``startup``, as before the registry existed.
    """
    env = os.environ if env is None else env
    name = env.get("MEDREFINE_MODEL_NAME") or DEFAULT_MODEL
    max_loaded = int(env.get("MEDREFINE_MAX_LOADED_VERSIONS") or DEFAULT_MAX_LOADED)
    artifact_version = str(startup.model_info().get("version", ""))
    try:
        from medplatform.context import open_platform
        from medplatform.registry import ensure_default_registered

        run_dir = json.loads((Path(art_dir) / "manifest.json").read_text())["source"]["run_dir"]
        platform = open_platform(env)
        info = ensure_default_registered(platform.registry, run_dir=run_dir, art_dir=art_dir, name=name)
    except Exception as exc:  # any failure here leaves the server as it was before the registry: one model
        logger.warning("model registry unavailable (%s: %s); serving only the artifacts given at start",
                       type(exc).__name__, exc)
        return ModelVersions(initial=LoadedVersion(name, None, startup, artifact_version), default_name=name,
                             max_loaded=max_loaded)
    logger.info("registry: serving %s (the start-up artifacts are %s:%d)", name, name, info.version)
    return ModelVersions(registry=platform.registry, loader=loader, default_name=name, max_loaded=max_loaded,
                         initial=LoadedVersion(name, info.version, startup, artifact_version))
