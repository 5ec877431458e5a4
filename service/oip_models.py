"""The models the Open Inference Protocol fronts serve (``segment``, ``generate``, ``synthesize``; their tensors
in docs/api.md) and ``ModelRegistry.infer``, where both transports meet the runtime. A new model is an
``OipModel`` subclass (tensor specs and ``run``) added to the registry; both transports then serve it unchanged.
"""

from __future__ import annotations

import abc
import importlib.metadata
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from core.imageio import LUMA_WEIGHTS
from service.errors import BadRequest, NotReady, PayloadTooLarge
from service.model_versions import precision_report
from service.oip import (
    BINARY_DATA_EXTENSION,
    DATATYPES,
    InferRequest,
    InferResponse,
    InferTensor,
    ModelNotFoundError,
    OipError,
)
from service.protocols import FrontEndRuntime

if TYPE_CHECKING:
    from inference.pipeline import SegmentOptions
    from service.model_versions import LoadedVersion

__all__ = [
    "SERVER_NAME",
    "ModelRegistry",
    "OipModel",
    "GenerateModel",
    "ParameterSpec",
    "SegmentModel",
    "SynthesizeModel",
    "TensorSpec",
    "default_registry",
    "server_metadata",
]

SERVER_NAME = "medrefine"

# Request parameters that belong to the protocol or the client library, not to a model: accepted, ignored.
_PROTOCOL_PARAMETERS = frozenset(
    {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers"}
)


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output tensor.

    ``shapes`` lists every accepted shape (``-1`` = any size); the first one is what model metadata
    reports. An input with ``optional=True`` may be left out of a request.
    """

    name: str
    datatype: str
    shapes: tuple[tuple[int, ...], ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"TensorSpec {self.name!r}: unknown datatype {self.datatype!r}")
        if not self.shapes:
            raise ValueError(f"TensorSpec {self.name!r}: needs at least one shape")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[0]

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return any(
            len(spec) == len(shape) and all(s == -1 or s == d for s, d in zip(spec, shape, strict=True))
            for spec in self.shapes
        )

    def describe_shapes(self) -> str:
        return " or ".join(str(list(s)) for s in self.shapes)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ParameterSpec:
    """A model option passed as a request-level parameter: a finite number in ``(low, high)`` exclusive."""

    name: str
    low: float
    high: float
    description: str = ""

    def parse(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OipError(
                f"parameter '{self.name}' must be a number in ({self.low}, {self.high}), got {value!r}",
                field=f"parameters.{self.name}",
            )
        number = float(value)
        if not math.isfinite(number) or not self.low < number < self.high:
            raise OipError(
                f"parameter '{self.name}' must be a finite number in ({self.low}, {self.high}), got {value!r}",
                field=f"parameters.{self.name}",
            )
        return number


class OipModel(abc.ABC):
    """One servable model: its tensor/parameter declarations and how it runs on the ``ServiceRuntime``."""

    name: ClassVar[str]
    platform: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]
    parameters: ClassVar[tuple[ParameterSpec, ...]] = ()

    def versions(self, runtime: FrontEndRuntime) -> tuple[str, ...]:
        """Versions a request may name; the first is the one served. Default: the artifact version."""
        try:
            version = runtime.model_info().get("version")
        except Exception:  # model_info may be unavailable before the runtime is ready
            return ()
        return (str(version),) if version else ()

    def is_ready(self, runtime: FrontEndRuntime) -> bool:
        return runtime.ready

    def available(self, runtime: FrontEndRuntime) -> bool:
        """Whether this server serves the model at all (e.g. generators are optional)."""
        return True

    async def select(self, runtime: FrontEndRuntime, version: str) -> LoadedVersion | None:
        """The loaded version a request names (``""``: the default); None where the model has one version."""
        return None

    def served_version(self, runtime: FrontEndRuntime, selected: LoadedVersion | None) -> str:
        """The ``model_version`` an answer carries."""
        versions = self.versions(runtime)
        return versions[0] if versions else ""

    def check_capacity(self, runtime: FrontEndRuntime) -> None:
        """503 at once when the queue this model runs on is full (default: the segmentation queue)."""
        runtime.check_capacity()

    @abc.abstractmethod
    async def run(
        self,
        runtime: FrontEndRuntime,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, float],
        *,
        protocol: str,
    ) -> Mapping[str, np.ndarray]:
        """Run the model.

        Args:
            runtime: the ``service.runtime.ServiceRuntime``.
            inputs: input name -> array, already validated against ``inputs`` (dtype and shape).
            parameters: parameter name -> parsed value, only those the request gave.
            protocol: metrics/protocol label of the caller (``"oip-http"`` or ``"grpc"``).

        Returns:
            output name -> array for every declared output (dtype and shape as declared).
        """


class SegmentModel(OipModel):
    """UltraRefiner segmentation of one 2-D image through ``runtime.segment`` (the shared batching queue)."""

    name = "segment"
    platform = "medrefine_ultrarefiner"
    # Metadata reports the first shape: [H, W, 3] (RGB or gray repeated) is what a client reading it may
    # send; [H, W] gray is accepted as well.
    inputs = (TensorSpec("IMAGE", "UINT8", ((-1, -1, 3), (-1, -1))),)
    outputs = (
        TensorSpec("MASK", "UINT8", ((-1, -1),)),
        TensorSpec("PROBABILITY", "FP32", ((-1, -1),)),
        TensorSpec("BOX", "FP32", ((4,),)),
        TensorSpec("IOU", "FP32", ((1,),)),
        TensorSpec("NEEDS_REVIEW", "BOOL", ((1,),)),
        TensorSpec("LESION_FOUND", "BOOL", ((1,),)),
    )
    parameters = (ParameterSpec("threshold", 0.0, 1.0, "mask threshold on PROBABILITY"),)

    # Versions are the registry's numbers of the served model name (``/v2/models/segment/versions/2``).
    def versions(self, runtime: FrontEndRuntime) -> tuple[str, ...]:
        return runtime.versions.oip_versions()

    async def select(self, runtime: FrontEndRuntime, version: str) -> LoadedVersion | None:
        return await runtime.select_oip_version(version)

    def served_version(self, runtime: FrontEndRuntime, selected: LoadedVersion | None) -> str:
        return selected.oip_version if selected is not None else super().served_version(runtime, selected)

    async def run(
        self,
        runtime: FrontEndRuntime,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, float],
        *,
        protocol: str,
        selected: LoadedVersion | None = None,
    ) -> Mapping[str, np.ndarray]:
        image = inputs["IMAGE"]
        height, width = int(image.shape[0]), int(image.shape[1])
        if height == 0 or width == 0:
            raise OipError(f"input 'IMAGE' must not be empty, got shape {list(image.shape)}", field="IMAGE")
        max_pixels = int(runtime.settings.max_pixels)
        if height * width > max_pixels:
            raise PayloadTooLarge(
                f"input 'IMAGE' has {height} x {width} = {height * width} pixels, more than the limit {max_pixels}",
                "IMAGE",
            )
        gray = _to_gray_unit(image)
        options = _segment_options(parameters)
        result = await runtime.segment(gray, options, protocol=protocol,
                                       **({"model": selected} if selected is not None else {}))
        return {
            "MASK": np.asarray(result.mask).astype(np.uint8, copy=False),
            "PROBABILITY": np.asarray(result.probability).astype(np.float32, copy=False),
            "BOX": np.asarray(result.box, dtype=np.float32).reshape(4),
            "IOU": np.asarray(result.iou, dtype=np.float32).reshape(1),
            "NEEDS_REVIEW": np.array([bool(result.needs_review)], dtype=np.bool_),
            "LESION_FOUND": np.array([bool(result.lesion_found)], dtype=np.bool_),
        }


class _GenerationModel(OipModel):
    """A model served by ``runtime.generation`` (present only when the server loaded generators)."""

    def versions(self, runtime: FrontEndRuntime) -> tuple[str, ...]:
        return (runtime.generation.version,) if runtime.generation is not None else ()

    def check_capacity(self, runtime: FrontEndRuntime) -> None:
        if runtime.generation is not None:  # else available() was False and the request never got here
            runtime.generation.check_capacity()


class GenerateModel(_GenerationModel):
    """Text + modality -> images through ``runtime.generation.generate`` (the generation queue).

    ``BEST_OF`` N keeps the best of N candidates per prompt (instead of ``NUM_IMAGES``), ranked by ``RANK_BY``
    (``selector`` or ``reward``); ``SCORE`` holds the kept images' scores then, and is empty otherwise.
    """

    name = "generate"
    platform = "medrefine_text2image"
    inputs = (
        TensorSpec("PROMPT", "BYTES", ((-1,),)),
        TensorSpec("MODALITY", "BYTES", ((-1,),)),
        TensorSpec("NEGATIVE_PROMPT", "BYTES", ((-1,),), optional=True),
        TensorSpec("GUIDANCE_SCALE", "FP32", ((1,),), optional=True),
        TensorSpec("STEPS", "INT32", ((1,),), optional=True),
        TensorSpec("SEED", "INT64", ((1,),), optional=True),
        TensorSpec("NUM_IMAGES", "INT32", ((1,),), optional=True),
        TensorSpec("BEST_OF", "INT32", ((1,),), optional=True),
        TensorSpec("RANK_BY", "BYTES", ((1,),), optional=True),
    )
    outputs = (TensorSpec("IMAGE", "UINT8", ((-1, -1, -1),)), TensorSpec("SEED", "INT64", ((1,),)),
               TensorSpec("SCORE", "FP32", ((-1,),)))

    def available(self, runtime: FrontEndRuntime) -> bool:
        return runtime.generation is not None and runtime.generation.generators.text2image is not None

    async def run(
        self,
        runtime: FrontEndRuntime,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, float],
        *,
        protocol: str,
    ) -> Mapping[str, np.ndarray]:
        prompts = _strings(inputs["PROMPT"], "PROMPT")
        count = len(prompts)
        modalities = _broadcast(_strings(inputs["MODALITY"], "MODALITY"), count, "MODALITY")
        negatives = None
        if "NEGATIVE_PROMPT" in inputs:
            negatives = _broadcast(_strings(inputs["NEGATIVE_PROMPT"], "NEGATIVE_PROMPT"), count, "NEGATIVE_PROMPT")
        scalars = {name: inputs[name].reshape(-1)[0].item() for name in ("GUIDANCE_SCALE", "STEPS", "SEED",
                                                                          "NUM_IMAGES", "BEST_OF") if name in inputs}
        rank_by = _strings(inputs["RANK_BY"], "RANK_BY")[0] if "RANK_BY" in inputs else None
        try:
            assert runtime.generation is not None  # available() checked it before the request got here
            result = await runtime.generation.generate(
                prompts, modalities, negative_prompts=negatives,
                guidance_scale=float(scalars.get("GUIDANCE_SCALE", 1.5)), steps=int(scalars.get("STEPS", 25)),
                seed=int(scalars["SEED"]) if "SEED" in scalars else None,
                num_images=int(scalars.get("NUM_IMAGES", 1)),
                best_of=int(scalars["BEST_OF"]) if "BEST_OF" in scalars else None, rank_by=rank_by,
            )
        except BadRequest as exc:
            exc.rename_field(_OIP_FIELDS)  # the input's name, not the runtime's
            raise OipError(exc.message, field=exc.field) from None
        score = np.zeros(0, np.float32) if result.scores is None else np.asarray(result.scores, np.float32)
        return {"IMAGE": result.images, "SEED": np.asarray([result.seed], dtype=np.int64), "SCORE": score}


# inference.generation argument names -> this model's input names, for error messages.
_OIP_FIELDS = {"prompts": "PROMPT", "modalities": "MODALITY", "negative_prompts": "NEGATIVE_PROMPT",
               "guidance_scale": "GUIDANCE_SCALE", "steps": "STEPS", "seed": "SEED", "num_images": "NUM_IMAGES",
               "best_of": "BEST_OF", "candidates": "BEST_OF", "rank_by": "RANK_BY"}


class SynthesizeModel(_GenerationModel):
    """Mask -> image through ``runtime.generation.synthesize`` (the generation queue)."""

    name = "synthesize"
    platform = "medrefine_pix2pix"
    inputs = (TensorSpec("MASK", "UINT8", ((-1, -1),)),)
    outputs = (TensorSpec("IMAGE", "UINT8", ((-1, -1),)),)

    def available(self, runtime: FrontEndRuntime) -> bool:
        return runtime.generation is not None and runtime.generation.generators.pix2pix is not None

    # The version of the generator /synthesize serves: its registry number (``synthesizer:2`` -> "2") when
    # MEDREFINE_SYNTHESIZER chose a registry version, else its artifact version.
    def versions(self, runtime: FrontEndRuntime) -> tuple[str, ...]:
        from inference.synthesizer import served_synthesizer

        if runtime.generation is None:
            return ()
        served = served_synthesizer(runtime.generation.generators)
        return (str(served["registry"]).rpartition(":")[2] if served["registry"] else served["version"],)

    async def run(
        self,
        runtime: FrontEndRuntime,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, float],
        *,
        protocol: str,
    ) -> Mapping[str, np.ndarray]:
        mask = inputs["MASK"]
        if min(mask.shape) < 1:
            raise OipError(f"input 'MASK' must not be empty, got shape {list(mask.shape)}", field="MASK")
        assert runtime.generation is not None  # available() checked it
        result = await runtime.generation.synthesize(mask)
        return {"IMAGE": result.image}


def _strings(array: np.ndarray, name: str) -> list[str]:
    """A 1-D BYTES tensor -> UTF-8 strings (OipError naming the tensor otherwise)."""
    if array.size < 1:
        raise OipError(f"input '{name}' must hold at least one string", field=name)
    try:
        return [bytes(item).decode("utf-8") for item in array.reshape(-1)]
    except UnicodeDecodeError:
        raise OipError(f"input '{name}' must hold UTF-8 text", field=name) from None


def _broadcast(values: list[str], count: int, name: str) -> list[str]:
    if len(values) == count:
        return values
    if len(values) == 1:
        return values * count
    raise OipError(f"input '{name}' has {len(values)} entries; expected 1 or one per prompt ({count})", field=name)


def _to_gray_unit(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 -> ``(H, W) float32 in [0, 1]`` (RGB as BT.601 luminance)."""
    pixels = image.astype(np.float32)
    if pixels.ndim == 3:
        pixels = pixels @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    return np.clip(pixels / 255.0, 0.0, 1.0).astype(np.float32, copy=False)


def _segment_options(parameters: Mapping[str, float]) -> SegmentOptions | None:
    if not parameters:
        return None
    from inference.pipeline import SegmentOptions  # the pipeline module loads engines; import it on first use

    return SegmentOptions(**parameters)


class ModelRegistry:
    """Models by name, plus the shared request -> runtime -> response path of both OIP transports.

    Raises:
        ValueError: if two models share a name.
    """

    def __init__(self, models: Iterable[OipModel]) -> None:
        self._models: dict[str, OipModel] = {}
        for model in models:
            if model.name in self._models:
                raise ValueError(f"ModelRegistry: model name {model.name!r} registered twice")
            self._models[model.name] = model

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def get(self, runtime: FrontEndRuntime, name: str, version: str = "") -> OipModel:
        """The model called ``name``; ``version`` must be empty or one of its versions.

        Raises:
            ModelNotFoundError: unknown model or version (the message lists what exists).
        """
        model = self._models.get(name)
        if model is None or not model.available(runtime):
            served = [n for n, m in self._models.items() if m.available(runtime)]
            raise ModelNotFoundError(
                f"unknown model '{name}'; this server serves: {', '.join(served) or 'nothing'}", field="model"
            )
        if version:
            versions = model.versions(runtime)
            if version not in versions:
                raise ModelNotFoundError(
                    f"model '{name}' has no version '{version}'; available: {', '.join(versions) or 'none'}",
                    field="version",
                )
        return model

    def model_metadata(self, runtime: FrontEndRuntime, name: str, version: str = "") -> dict[str, Any]:
        """The KServe v2 model metadata object (JSON form; the gRPC transport maps it to protobuf)."""
        model = self.get(runtime, name, version)
        return {
            "name": model.name,
            "versions": list(model.versions(runtime)),
            "platform": model.platform,
            "inputs": [spec.metadata() for spec in model.inputs],
            "outputs": [spec.metadata() for spec in model.outputs],
        }

    def model_ready(self, runtime: FrontEndRuntime, name: str, version: str = "") -> bool:
        """Whether the model can take inference requests now (raises ``ModelNotFoundError`` if unknown)."""
        return self.get(runtime, name, version).is_ready(runtime)

    async def infer(self, runtime: FrontEndRuntime, request: InferRequest, *, protocol: str) -> InferResponse:
        """Validate ``request``, run its model on ``runtime``, and return the requested outputs.

        Raises:
            ModelNotFoundError: unknown model/version.
            OipError: unknown/missing inputs, wrong datatype or shape, unknown or invalid parameters,
                unknown requested outputs (each message names the tensor or parameter).
            service.errors.ServiceError: from the runtime (not ready, queue full, timeout, too large).
        """
        # 1. The model and the outputs to send (checked before any work is queued).
        model = self.get(runtime, request.model_name, request.model_version)
        output_specs = _requested_output_specs(model, request)
        # 2. Inputs and parameters against the model's declarations.
        inputs = _validated_inputs(model, request.inputs)
        parameters = _validated_parameters(model, request.parameters)
        # A request the transport let in before a drain began still runs (``serving``); new ones are
        # refused at the transport's entry.
        if not runtime.serving:
            raise NotReady(f"model '{model.name}' is not ready")
        model.check_capacity(runtime)  # 503 at once when its queue is full
        # 3. The version (loaded on first use), run (through the runtime's shared queue), pack the outputs.
        selected = await model.select(runtime, request.model_version)
        extra = {"selected": selected} if selected is not None else {}
        results = await model.run(runtime, inputs, parameters, protocol=protocol, **extra)
        outputs = tuple(_output_tensor(model, spec, results) for spec in output_specs)
        info = selected.pipeline.model_info() if selected is not None else runtime.model_info()
        return InferResponse(
            model_name=model.name,
            model_version=model.served_version(runtime, selected),
            id=request.id,
            outputs=outputs,
            parameters={"precision": precision_report(info)["artifacts"]},  # e.g. "fp32+int8"
        )


def _requested_output_specs(model: OipModel, request: InferRequest) -> tuple[TensorSpec, ...]:
    if not request.outputs:
        return model.outputs
    by_name = {spec.name: spec for spec in model.outputs}
    specs = []
    for requested in request.outputs:
        spec = by_name.get(requested.name)
        if spec is None:
            raise OipError(
                f"unknown output '{requested.name}' for model '{model.name}'; outputs: {', '.join(by_name)}",
                field=requested.name,
            )
        if spec in specs:
            raise OipError(f"output '{requested.name}' is requested more than once", field=requested.name)
        specs.append(spec)
    return tuple(specs)


def _validated_inputs(model: OipModel, tensors: Iterable[InferTensor]) -> dict[str, np.ndarray]:
    by_name = {spec.name: spec for spec in model.inputs}
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise OipError(
                f"unknown input '{tensor.name}' for model '{model.name}'; expected: {', '.join(by_name)}",
                field=tensor.name,
            )
        if tensor.name in arrays:
            raise OipError(f"input '{tensor.name}' is given more than once", field=tensor.name)
        if tensor.datatype != spec.datatype:
            raise OipError(
                f"input '{tensor.name}' has datatype {tensor.datatype}, model '{model.name}' expects {spec.datatype}",
                field=tensor.name,
            )
        if not spec.accepts(tensor.shape):
            raise OipError(
                f"input '{tensor.name}' has shape {list(tensor.shape)}, model '{model.name}' expects "
                f"{spec.describe_shapes()} (-1 = any size)",
                field=tensor.name,
            )
        arrays[tensor.name] = tensor.data
    missing = [spec.name for spec in model.inputs if not spec.optional and spec.name not in arrays]
    if missing:
        raise OipError(f"model '{model.name}' needs input(s) {', '.join(missing)}", field=missing[0])
    return arrays


def _validated_parameters(model: OipModel, raw: Mapping[str, object]) -> dict[str, float]:
    specs = {spec.name: spec for spec in model.parameters}
    parsed: dict[str, float] = {}
    for key, value in raw.items():
        if key in _PROTOCOL_PARAMETERS or key.startswith("triton_"):
            continue
        spec = specs.get(key)
        if spec is None:
            known = ", ".join(specs) or "none"
            raise OipError(
                f"unknown parameter '{key}' for model '{model.name}'; model parameters: {known}",
                field=f"parameters.{key}",
            )
        parsed[key] = spec.parse(value)
    return parsed


def _output_tensor(model: OipModel, spec: TensorSpec, results: Mapping[str, np.ndarray]) -> InferTensor:
    if spec.name not in results:
        raise RuntimeError(f"model '{model.name}' returned no output '{spec.name}'")
    data = np.asarray(results[spec.name]).astype(DATATYPES[spec.datatype], copy=False)
    if not spec.accepts(tuple(data.shape)):
        raise RuntimeError(
            f"model '{model.name}' output '{spec.name}' has shape {list(data.shape)}, declared {spec.describe_shapes()}"
        )
    return InferTensor(name=spec.name, datatype=spec.datatype, data=data)


def server_metadata() -> dict[str, Any]:
    """The KServe v2 server metadata object: name, version (the installed package's) and extensions."""
    try:
        version = importlib.metadata.version("medrefine")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": SERVER_NAME, "version": version, "extensions": [BINARY_DATA_EXTENSION]}


def default_registry() -> ModelRegistry:
    """The registry both transports use unless given another: ``segment``, plus ``generate`` and
    ``synthesize`` where the runtime has those generators."""
    return ModelRegistry([SegmentModel(), GenerateModel(), SynthesizeModel()])
