"""Which generator /synthesize serves (MEDREFINE_SYNTHESIZER, ``--synthesizer``): a generator artifact directory,
a registry version (``name``, ``name:N``, ``name@alias``), ``auto`` (``synthesizer@production`` if registered) or
``off`` (the stage-one pix2pix of the generator artifacts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from inference.manifest import ArtifactError
from inference.synthesizer import SynthesizerChoice, check_synthesizer_dir
from medplatform.errors import PlatformError
from medplatform.registry import DEFAULT_ALIAS, ModelRegistry, parse_model_spec

__all__ = ["SETTING", "SYNTHESIZER_MODEL", "choose_synthesizer"]

logger = logging.getLogger(__name__)

SETTING = "MEDREFINE_SYNTHESIZER (--synthesizer)"
SYNTHESIZER_MODEL = "synthesizer"  # the registry name ``auto`` looks up
_OFF = ("", "off", "none", "0")


def _is_path(value: str) -> bool:
    """A path has a separator or starts with ``.``/``~`` (``./dir``); registry names never do."""
    return "/" in value or os.sep in value or value.startswith((".", "~"))


def _registered(env: Mapping[str, str]) -> ModelRegistry | None:
    """The registry when there can be one: a database URL is set, or the SQLite file exists (never created)."""
    from medplatform import settings
    from medplatform.context import open_platform

    if not env.get("MEDREFINE_DB_URL") and not (settings.data_dir(env) / settings.DB_FILE).is_file():
        return None
    return open_platform(env).registry


def _version(registry: ModelRegistry, name: str, ref: int | str | None, value: str) -> SynthesizerChoice:
    """Resolve and materialize (every file re-hashed) a registry version; ArtifactError naming the setting."""
    try:
        info = registry.resolve(name, ref)
        if info.family != "generators":
            raise ArtifactError(f"{name}:{info.version} is a {info.family} model; a synthesizer is a generator "
                                "version (python -m export genseg, then python -m medplatform register)")
        art_dir = registry.materialize(name, info.version)
        check_synthesizer_dir(art_dir)
    except (PlatformError, ArtifactError) as exc:
        raise ArtifactError(f"{SETTING} = {value!r}: {exc}") from exc
    return SynthesizerChoice(art_dir, name, info.version)


def choose_synthesizer(value: str, env: Mapping[str, str] | None = None) -> SynthesizerChoice | None:
    """The generator artifact ``value`` names, checked (hashes; a pix2pix graph), or None for stage one.

    ``auto``: ``synthesizer@production`` when the platform database (MEDREFINE_DB_URL / MEDREFINE_DATA_DIR)
    has it, else None; a database that cannot be opened is logged and read as none.

    Raises:
        ArtifactError: naming the setting: a directory without generator artifacts, a malformed reference,
            an unknown model, version or alias, stored files that fail their hashes.
    """
    env = os.environ if env is None else env
    value = (value or "").strip()
    if value.lower() in _OFF:
        return None
    if value.lower() == "auto":
        try:
            registry = _registered(env)
            if registry is None:
                return None
            registry.resolve(SYNTHESIZER_MODEL, f"@{DEFAULT_ALIAS}")
        except PlatformError:  # not registered, or no production alias: stage one
            return None
        except Exception as exc:  # an unreachable database must not stop segmentation from being served
            logger.warning("%s = auto: model registry unavailable (%s: %s); /synthesize serves stage one",
                           SETTING, type(exc).__name__, exc)
            return None
        return _version(registry, SYNTHESIZER_MODEL, None, f"auto ({SYNTHESIZER_MODEL}@{DEFAULT_ALIAS})")
    if _is_path(value):
        path = Path(value).expanduser()
        try:
            check_synthesizer_dir(path)
        except ArtifactError as exc:
            raise ArtifactError(f"{SETTING} = {value!r}: {exc}") from exc
        return SynthesizerChoice(path)
    try:
        name, ref = parse_model_spec(value)
    except PlatformError as exc:
        raise ArtifactError(f"{SETTING} = {value!r}: expected off, auto, a generator artifact directory (with a "
                            "'/', e.g. ./artifacts/synthesizer) or a registry reference name[:VERSION|@ALIAS]") from exc
    try:
        registry = _registered(env)
    except Exception as exc:  # the database named by the environment cannot be opened
        raise ArtifactError(f"{SETTING} = {value!r}: the model registry cannot be opened ({type(exc).__name__}: "
                            f"{exc})") from exc
    if registry is None:
        raise ArtifactError(f"{SETTING} = {value!r}: no model registry here (MEDREFINE_DB_URL unset and no "
                            "database under MEDREFINE_DATA_DIR); register the generator first (python -m medplatform "
                            "register RUN_DIR ART_DIR --name NAME)")
    return _version(registry, name, ref, value)
