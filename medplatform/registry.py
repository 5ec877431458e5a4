"""The model registry: numbered versions per model name, aliases (``production``...), resolving a request's
model reference, and a hash-verified artifact directory for the service to load. Rows in ``medplatform.db``,
files in the BentoML store, mirrored to blobs ``models/<name>/{artifacts/<manifest version>,runs/<weights sha>}/``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from inference.manifest import ArtifactError, check_hashes, load_manifest
from inference.manifest import sha256_file as file_sha256
from medplatform.bento import BentoModels
from medplatform.blobs import BlobStore
from medplatform.db import Alias, ModelVersion, utcnow, write_session
from medplatform.errors import AliasInUse, IntegrityFailure, InvalidValue, NotFound
from medplatform.provenance import CheckedSources, check_sources, generator_metrics, version_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN_DIR = REPO_ROOT / "checkpoints" / "default"  # as weights.checkpoints, without importing torch
DEFAULT_ART_DIR = REPO_ROOT / "artifacts" / "default"
DEFAULT_MODEL = "default"
DEFAULT_ALIAS = "production"
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?$")  # a BentoML tag name, lowercase
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # not all digits: "3" is a version, "@3" is nothing
_REGISTER_TRIES = 5

Ref = int | str | None  # None -> alias "production"; int -> that version; "@alias" -> the alias's version


def check_name(name: str, *, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidValue(field, name, "a model name is 1-63 of a-z 0-9 . _ -, starting and ending alphanumeric")
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise InvalidValue("alias", alias, "an alias is 1-63 of a-z 0-9 _ -, starting with a letter")
    return alias


def parse_model_spec(spec: str) -> tuple[str, Ref]:
    """REST ``model=`` values: ``name`` -> (name, None); ``name:3`` -> (name, 3); ``name@staging`` ->
    (name, "@staging"). Raises ``InvalidValue`` (field ``model``) otherwise."""
    match = re.fullmatch(r"([^:@]+)(?::(\d+)|(@[^:@]+))?", spec or "")
    if not match:
        raise InvalidValue("model", spec, "expected name, name:VERSION or name@ALIAS")
    name, number, alias = match.groups()
    check_name(name, field="model")
    if alias:
        check_alias(alias[1:])
    return name, int(number) if number else alias


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as callers see it (a detached copy of the row plus its aliases)."""

    name: str
    version: int
    metrics: dict[str, Any]
    hyperparameters: dict[str, Any]
    artifact_version: str | None
    artifact_hashes: dict[str, Any]
    bento_tag: str
    created_at: dt.datetime
    dataset_id: str | None = None
    dataset_sha256: str | None = None
    job_id: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """``"generators"`` (a generator artifact) or ``"segmentation"`` (also every version registered
        before generators could be)."""
        return str(self.artifact_hashes.get("family", "segmentation"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``GET /models/{name}/versions`` answers per version."""
        return {"name": self.name, "version": self.version, "metrics": self.metrics,
                "hyperparameters": self.hyperparameters, "artifact_version": self.artifact_version,
                "artifact_hashes": self.artifact_hashes, "bento_tag": self.bento_tag,
                "created_at": self.created_at.isoformat(), "dataset_id": self.dataset_id,
                "dataset_sha256": self.dataset_sha256, "job_id": self.job_id, "aliases": list(self.aliases)}


@dataclass(frozen=True)
class ModelSummary:
    """A model name with its live versions and aliases (``GET /models``)."""

    name: str
    versions: list[int]
    aliases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": self.versions, "latest": max(self.versions, default=None),
                "aliases": self.aliases}


def _info(row: ModelVersion, aliases: list[str]) -> VersionInfo:
    return VersionInfo(name=row.name, version=row.version, metrics=dict(row.metrics),
                       hyperparameters=dict(row.hyperparameters), artifact_version=row.artifact_version,
                       artifact_hashes=dict(row.artifact_hashes), bento_tag=row.bento_tag, created_at=row.created_at,
                       dataset_id=row.dataset_id, dataset_sha256=row.dataset_sha256, job_id=row.job_id,
                       aliases=tuple(sorted(aliases)))


def artifacts_prefix(name: str, artifact_version: str) -> str:
    """Blob prefix of an artifact directory: content-addressed, so versions of the same bytes share it."""
    return f"models/{name}/artifacts/{artifact_version}/"


def run_prefix(name: str, weights_sha256: str) -> str:
    """Blob prefix of a run directory (run.json, weights, logs), by the weights' sha256."""
    return f"models/{name}/runs/{weights_sha256}/"


class ModelRegistry:
    """Register, list, alias, resolve, delete and materialize model versions.

    Args:
        sessions: from ``medplatform.db.session_factory`` on a migrated database.
        blobs: where run and artifact files are mirrored (local directory or S3).
        bento: the BentoML model store the service loads from.
    """

    def __init__(self, sessions: sessionmaker[Session], blobs: BlobStore, bento: BentoModels) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.bento = bento

    # -- writing ----------------------------------------------------------------------------------------------

    def register(self, run_dir: str | os.PathLike[str], art_dir: str | os.PathLike[str], *, name: str,
                 evaluation: Mapping[str, Any] | None = None, hyperparameters: Mapping[str, Any] | None = None,
                 dataset_id: str | None = None, dataset_sha256: str | None = None,
                 job_id: str | None = None, reuse_existing: bool = False) -> VersionInfo:
        """Record the next version of ``name`` from a finished run and its exported ONNX artifacts.

        ``evaluation``: a ``python -m training evaluate`` result of these weights (held-out metrics); without
        it, a ``RUN_DIR/eval_test.json`` is used when present, else run.json's validation Dice.
        ``hyperparameters`` default to run.json's training settings and preset. ``reuse_existing``: when these
        exact artifacts already are a live version of ``name``, return it instead (decided under the lock).
        Generator artifacts (``python -m export genseg`` / ``generators``; ``run_dir`` is the run they name)
        take no evaluation: their metrics are the export's consistency Dice (``generator_metrics``).

        Raises:
            InvalidValue, IntegrityFailure, Conflict: from ``check_sources`` and ``BentoModels.save``.
        """
        check_name(name)
        sources = check_sources(run_dir, art_dir)
        if sources.family == "generators" and evaluation is not None:
            raise InvalidValue("evaluation", "given", "a generator version records the consistency Dice of its "
                               "export; segmentation evaluations are for segmentation models")
        if sources.family == "segmentation" and evaluation is None and (sources.run_dir / "eval_test.json").is_file():
            from inference.manifest import read_json_object

            try:
                evaluation = read_json_object(sources.run_dir / "eval_test.json")
            except ArtifactError as exc:
                raise InvalidValue("evaluation", str(sources.run_dir / "eval_test.json"), str(exc)) from exc
        metrics = (generator_metrics(sources.run, sources.manifest) if sources.family == "generators"
                   else version_metrics(sources.run, evaluation))
        if hyperparameters is None:
            training = sources.run.get("training") or {}
            hyperparameters = {**(training.get("settings") or {}), "preset": training.get("preset"),
                               "kind": sources.run.get("kind"), "phase": sources.run.get("phase")}
        # 1. Mirror first, outside the write lock (uploads may be slow); the keys are content-addressed.
        self._mirror(name, sources)
        # 2. Number and commit the row under the lock: a short transaction.
        for attempt in range(_REGISTER_TRIES):
            try:
                info, created = self._number(sources, name=name, metrics=metrics,
                                             hyperparameters=dict(hyperparameters), dataset_id=dataset_id,
                                             dataset_sha256=dataset_sha256, job_id=job_id,
                                             reuse_existing=reuse_existing)
                break
            except IntegrityError:  # another process took this number between our read and our insert
                if attempt == _REGISTER_TRIES - 1:
                    raise
        if created:
            # 3. Committed: re-put anything a delete of the same bytes removed meanwhile, then the BentoML
            # copy. If this process dies here, materialize() restores the version from the mirror.
            self._mirror(name, sources)
            self.bento.save(info.bento_tag, sources.art_dir, sources.manifest,
                            {"name": name, "version": info.version, "metrics": metrics,
                             "dataset_sha256": dataset_sha256, "job_id": job_id})
        return info

    def _mirror(self, name: str, sources: CheckedSources) -> None:
        for prefix, directory, files in (
                (artifacts_prefix(name, sources.artifact_version), sources.art_dir, sources.artifact_files),
                (run_prefix(name, sources.weights_sha256), sources.run_dir, sources.run_files)):
            for file in files:
                if not self.blobs.exists(prefix + file):
                    self.blobs.put_file(prefix + file, directory / file)

    def _number(self, sources: CheckedSources, *, name: str, metrics: dict[str, Any],
                hyperparameters: dict[str, Any], dataset_id: str | None, dataset_sha256: str | None,
                job_id: str | None, reuse_existing: bool) -> tuple[VersionInfo, bool]:
        """(the version, whether it is new): the next number for ``name``, committed."""
        with write_session(self.sessions) as session:
            if reuse_existing:
                same = session.scalar(select(ModelVersion).where(
                    ModelVersion.name == name, ModelVersion.artifact_version == sources.artifact_version,
                    ModelVersion.deleted_at.is_(None)).order_by(ModelVersion.version).limit(1))
                if same is not None:
                    return _info(same, self._aliases(session, name, same.version)), False
            latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
            version = (latest or 0) + 1  # deleted versions keep their rows: numbers are never reused
            tag = self.bento.tag(name, version)
            self.bento.holds(tag, sources.manifest)  # a stale store with other bytes under this tag: Conflict
            row = ModelVersion(name=name, version=version, dataset_id=dataset_id, dataset_sha256=dataset_sha256,
                               hyperparameters=hyperparameters, metrics=metrics, artifact_hashes=sources.hashes(),
                               artifact_version=sources.artifact_version, bento_tag=tag, job_id=job_id,
                               created_at=utcnow())
            session.add(row)
            session.flush()  # the unique (name, version) check
            return _info(row, []), True

    def set_alias(self, name: str, alias: str, version: int) -> VersionInfo:
        """Point ``alias`` of ``name`` at ``version`` (creating or moving it). Raises ``NotFound`` (field
        ``version``) when that version does not exist or was deleted."""
        check_alias(alias)
        with write_session(self.sessions) as session:
            row = self._row(session, name, version, lock=True)
            existing = session.scalar(select(Alias).where(Alias.name == name, Alias.alias == alias))
            if existing is None:
                session.add(Alias(name=name, alias=alias, version=row.version, updated_at=utcnow()))
            else:
                existing.version, existing.updated_at = row.version, utcnow()
            session.flush()
            return _info(row, self._aliases(session, name, row.version))

    def remove_alias(self, name: str, alias: str) -> None:
        """Drop an alias; ``NotFound`` (field ``alias``) when it is not set."""
        with write_session(self.sessions) as session:
            existing = session.scalar(select(Alias).where(Alias.name == name, Alias.alias == alias))
            if existing is None:
                raise NotFound("alias", alias, f"model {name!r} has no such alias")
            session.delete(existing)

    def delete_version(self, name: str, version: int) -> None:
        """Delete a version's files (BentoML store and blobs); its row stays, marked deleted, so its number is
        never reused. The caller (the service) must refuse first while the version is loaded.

        Raises:
            AliasInUse: an alias points at it (field ``version``, ``aliases`` lists them).
            NotFound: no such live version.
        """
        with write_session(self.sessions) as session:
            row = self._row(session, name, version, lock=True)
            aliases = self._aliases(session, name, version)
            if aliases:
                raise AliasInUse("version", version, aliases)
            row.deleted_at = utcnow()
            session.flush()
            # Mirrored files go when no live version of the name uses them any more; decided under the lock,
            # and a registration of the same bytes re-puts them after its own commit.
            live = session.scalars(select(ModelVersion.artifact_hashes).where(
                ModelVersion.name == name, ModelVersion.deleted_at.is_(None))).all()
            hashes = row.artifact_hashes
            orphans = []
            if all(h.get("artifact_version") != hashes.get("artifact_version") for h in live):
                orphans.append(artifacts_prefix(name, hashes["artifact_version"]))
            if all(h.get("weights_sha256") != hashes.get("weights_sha256") for h in live):
                orphans.append(run_prefix(name, hashes["weights_sha256"]))
            for prefix in orphans:
                for key in self.blobs.list(prefix):
                    self.blobs.delete(key)
        self.bento.delete(row.bento_tag)

    # -- reading ----------------------------------------------------------------------------------------------

    def _row(self, session: Session, name: str, version: int, *, lock: bool = False) -> ModelVersion:
        """The live row; ``lock``: FOR UPDATE where the database has it (SQLite: write_session's lock)."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidValue("version", version, "a version is an integer")
        query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version,
                                           ModelVersion.deleted_at.is_(None))
        row = session.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise NotFound("version", version, f"model {name!r} has no such version")
        return row

    @staticmethod
    def _aliases(session: Session, name: str, version: int) -> list[str]:
        return list(session.scalars(select(Alias.alias).where(Alias.name == name, Alias.version == version)))

    def get_version(self, name: str, version: int) -> VersionInfo:
        with self.sessions() as session:
            row = self._row(session, name, version)
            return _info(row, self._aliases(session, name, version))

    def resolve(self, name: str, ref: Ref = None) -> VersionInfo:
        """The version a request means: ``None`` -> alias ``production``; an int -> that version; ``"@alias"``
        -> the alias's version. Raises ``NotFound`` naming ``name``, ``version`` or ``alias``."""
        if isinstance(ref, int) and not isinstance(ref, bool):
            return self.get_version(name, ref)
        if ref is None:
            alias = DEFAULT_ALIAS
        elif isinstance(ref, str) and ref.startswith("@"):
            alias = check_alias(ref[1:])
        else:
            raise InvalidValue("version", ref, "expected None, an integer version or '@alias'")
        with self.sessions() as session:
            target = session.scalar(select(Alias.version).where(Alias.name == name, Alias.alias == alias))
            if target is None:
                if session.scalar(select(ModelVersion.id).where(ModelVersion.name == name).limit(1)) is None:
                    raise NotFound("name", name, "no model of this name is registered")
                raise NotFound("alias", alias, f"model {name!r} has no such alias")
            row = self._row(session, name, target)
            return _info(row, self._aliases(session, name, target))

    def list_models(self) -> list[ModelSummary]:
        with self.sessions() as session:
            rows = session.execute(select(ModelVersion.name, ModelVersion.version)
                                   .where(ModelVersion.deleted_at.is_(None))
                                   .order_by(ModelVersion.name, ModelVersion.version)).all()
            aliases = session.execute(select(Alias.name, Alias.alias, Alias.version)).all()
        models: dict[str, ModelSummary] = {}
        for name, version in rows:
            models.setdefault(name, ModelSummary(name=name, versions=[])).versions.append(version)
        for name, alias, version in aliases:
            if name in models:
                models[name].aliases[alias] = version
        return list(models.values())

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Live versions of ``name``, oldest first, with their metrics for comparison; ``NotFound`` if none."""
        with self.sessions() as session:
            rows = list(session.scalars(select(ModelVersion).where(ModelVersion.name == name,
                                                                    ModelVersion.deleted_at.is_(None))
                                        .order_by(ModelVersion.version)))
            aliases: dict[int, list[str]] = {}
            for alias, version in session.execute(select(Alias.alias, Alias.version).where(Alias.name == name)):
                aliases.setdefault(version, []).append(alias)
        if not rows:
            raise NotFound("name", name, "no model of this name is registered")
        return [_info(row, aliases.get(row.version, [])) for row in rows]

    def find_by_artifacts(self, name: str, artifact_version: str) -> VersionInfo | None:
        """The live version of ``name`` registered from these exact artifacts (manifest version), if any."""
        with self.sessions() as session:
            row = session.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                            ModelVersion.artifact_version == artifact_version,
                                                            ModelVersion.deleted_at.is_(None))
                                 .order_by(ModelVersion.version).limit(1))
            return None if row is None else _info(row, self._aliases(session, name, row.version))

    # -- loading ----------------------------------------------------------------------------------------------

    def materialize(self, name: str, version: int) -> Path:
        """A local artifact directory of the version, every file re-hashed against the registry's record.

        When the BentoML store lacks it (a new machine sharing the database and an S3 store), it is restored
        from the blob mirror first.

        Raises:
            NotFound: no such live version, or neither store holds its files.
            IntegrityFailure: a file is missing or its bytes differ (field: the file's path).
        """
        info = self.get_version(name, version)
        path = self.bento.path(info.bento_tag)
        if path is None:
            path = self._restore(info)
        _verify(path, info.artifact_hashes)
        return path

    def _restore(self, info: VersionInfo) -> Path:
        prefix = artifacts_prefix(info.name, str(info.artifact_hashes["artifact_version"]))
        keys = self.blobs.list(prefix)
        if not keys:
            raise NotFound("version", info.version, f"{info.bento_tag} is in neither the BentoML store nor the "
                                                   "blob store")
        with tempfile.TemporaryDirectory(prefix="medplatform-restore-") as tmp:
            for key in keys:
                self.blobs.get_file(key, Path(tmp) / key[len(prefix):])
            _verify(Path(tmp), info.artifact_hashes)
            manifest = load_manifest(tmp)
            self.bento.save(info.bento_tag, Path(tmp), manifest, {"name": info.name, "version": info.version,
                                                                  "metrics": info.metrics, "restored": True})
        path = self.bento.path(info.bento_tag)
        assert path is not None
        return path


def _verify(art_dir: Path, hashes: Mapping[str, Any]) -> None:
    for file, expected in sorted((hashes.get("files") or {}).items()):
        path = art_dir / file
        if not path.is_file():
            raise IntegrityFailure(str(path), None, "missing from the stored artifacts")
        actual = file_sha256(path)
        if actual != expected:
            raise IntegrityFailure(str(path), actual[:16], f"sha256 differs from the registered {expected[:16]}...")
    try:
        check_hashes(art_dir, load_manifest(art_dir))
    except ArtifactError as exc:
        raise IntegrityFailure(str(art_dir), None, str(exc)) from exc


def ensure_default_registered(registry: ModelRegistry, *, run_dir: str | os.PathLike[str] = DEFAULT_RUN_DIR,
                              art_dir: str | os.PathLike[str] = DEFAULT_ART_DIR, name: str = DEFAULT_MODEL,
                              alias: str = DEFAULT_ALIAS) -> VersionInfo:
    """Register the committed default model (checkpoints/default exported to artifacts/default by
    ``make export``) unless these artifacts already are a version of ``name``; point ``alias`` at it when the
    alias is not set yet (a promoted version is never demoted). On a fresh database: ``default`` v1 =
    ``production``.

    Raises:
        InvalidValue: ``art_dir`` holds no export (field ``art_dir``; run ``make export``).
    """
    if not (Path(art_dir) / "manifest.json").is_file():
        raise InvalidValue("art_dir", str(art_dir), "no manifest.json: export the default model first (make export)")
    manifest = load_manifest(art_dir)
    info = registry.find_by_artifacts(name, str(manifest["version"]))
    if info is None:  # two processes starting at once: the second finds the first's version under the lock
        info = registry.register(run_dir, art_dir, name=name, reuse_existing=True)
    try:
        registry.resolve(name, f"@{alias}")
    except NotFound:
        info = registry.set_alias(name, alias, info.version)
    return info

