"""The mask-to-image generator /synthesize serves: the stage-one pix2pix of the generator artifacts, or another
generator artifact (a GenSeg export, usually a registry version) put in its place (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.manifest import MANIFEST_NAME, ArtifactError, check_hashes, load_manifest

if TYPE_CHECKING:
    from inference.generator_artifacts import Generators

__all__ = [
    "SynthesizerChoice",
    "check_synthesizer_dir",
    "describe_synthesizer",
    "load_served_generators",
    "load_synthesizer",
    "serve_synthesizer",
    "served_synthesizer",
]


@dataclass(frozen=True)
class SynthesizerChoice:
    """A generator artifact directory to serve on /synthesize; ``name``/``version``: its registry version
    (None for a directory given as such)."""

    art_dir: Path
    name: str | None = None
    version: int | None = None

    @property
    def reference(self) -> str:
        """What names it to another process: ``name:version``, or the directory's absolute path."""
        return f"{self.name}:{self.version}" if self.name is not None else str(Path(self.art_dir).resolve())


def check_synthesizer_dir(art_dir: str | Path) -> dict[str, Any]:
    """The manifest of a generator artifact directory holding a pix2pix graph, every file re-hashed.

    Raises:
        ArtifactError: no manifest, not generator artifacts, no pix2pix graph, or a file that fails its hash.
    """
    manifest = load_manifest(art_dir)
    where = Path(art_dir) / MANIFEST_NAME
    pipeline = manifest.get("pipeline")
    if not isinstance(pipeline, Mapping) or pipeline.get("kind") != "generators" or "pix2pix" not in pipeline:
        kind = pipeline.get("kind") if isinstance(pipeline, Mapping) else None
        raise ArtifactError(f"{where}: pipeline.kind is {kind!r} with blocks {sorted(pipeline or {})}; a "
                            "synthesizer is a generator artifact with a pix2pix block (python -m export genseg)")
    check_hashes(art_dir, manifest)
    return manifest


def describe_synthesizer(manifest: Mapping[str, Any], *, name: str | None = None,
                         version: int | None = None) -> dict[str, Any]:
    """What /synthesize answers say about the generator: artifact version, how it was trained (``"genseg"``:
    end to end for a segmenter; ``"pix2pix"``: stage one), its registry version and consistency Dice."""
    source = manifest.get("source") or {}
    return {"version": str(manifest["version"]),
            "trained_by": "genseg" if source.get("kind") == "genseg" else "pix2pix",
            "registry": f"{name}:{version}" if name is not None else None,
            "consistency_dice": (source.get("consistency") or {}).get("dice")}


def load_synthesizer(choice: SynthesizerChoice, **options: Any) -> Generators:
    """Load ``choice`` as ``Generators`` whose ``info["synthesizer"]`` describes it.

    ``options``: ``inference.generator_artifacts.load_generators``'s (device, intra_op_threads, verify).

    Raises:
        ArtifactError: as :func:`check_synthesizer_dir`, or a graph ONNX Runtime cannot load.
    """
    from inference.generator_artifacts import load_generators

    manifest = check_synthesizer_dir(choice.art_dir)
    generators = load_generators(choice.art_dir, **options)
    info = {**generators.info, "synthesizer": describe_synthesizer(manifest, name=choice.name,
                                                                   version=choice.version)}
    return dataclasses.replace(generators, info=info)


def serve_synthesizer(generators: Generators | None, synthesizer: Generators) -> Generators:
    """``generators`` with ``synthesizer``'s pix2pix pipeline in place of its own (``synthesizer`` alone
    when there are no generator artifacts)."""
    if generators is None:
        return synthesizer
    info = dict(generators.info)
    info["synthesizer"] = synthesizer.info["synthesizer"]
    info["image_sizes"] = {**info.get("image_sizes", {}), "pix2pix": synthesizer.info["image_sizes"]["pix2pix"]}
    info["graphs"] = {**info.get("graphs", {}), "pix2pix": synthesizer.info["graphs"]["pix2pix"]}
    return dataclasses.replace(generators, pix2pix=synthesizer.pix2pix, info=info)


def load_served_generators(generators_dir: str | Path | None, choice: SynthesizerChoice | None,
                           **options: Any) -> Generators | None:
    """The generators a server loads: those of ``generators_dir`` with ``choice`` serving /synthesize;
    None when both are off."""
    from inference.generator_artifacts import load_generators

    generators = load_generators(generators_dir, **options) if generators_dir is not None else None
    if choice is None:
        return generators
    return serve_synthesizer(generators, load_synthesizer(choice, **options))


def served_synthesizer(generators: Generators) -> dict[str, Any]:
    """:func:`describe_synthesizer` of what /synthesize serves: the chosen generator, else stage one's."""
    chosen = generators.info.get("synthesizer")
    if chosen is not None:
        return dict(chosen)
    return {"version": str(generators.version), "trained_by": "pix2pix", "registry": None, "consistency_dice": None}
