"""Inference engines: ``Engine.run(graph_name, {input: array}) -> {output: array}`` on ONNX Runtime, OpenVINO,
torch or TensorRT (:class:`OnnxRuntimeEngine`, :class:`OpenVINOEngine`, :class:`TorchEngine`,
:class:`TensorRTEngine`); ``build_engine`` picks one by name.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inference.artifacts import ArtifactError, Artifacts, check_tensorrt_engines, load_artifacts

__all__ = [
    "ENGINE_REGISTRY",
    "Engine",
    "OPENVINO_PRECISIONS",
    "OnnxRuntimeEngine",
    "WrappedEngine",
    "OpenVINOEngine",
    "TensorRTEngine",
    "TorchEngine",
    "build_engine",
    "graph_precisions",
    "openvino_precisions",
    "ort_providers",
    "ort_session_options",
    "physical_cores",
]

TENSORRT_MISSING = "tensorrt is not installed: pip install 'medrefine[gpu]' on an NVIDIA GPU machine"
OPENVINO_MISSING = "openvino is not installed: pip install 'medrefine[openvino]'"

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def physical_cores() -> int:
    """Physical CPU cores available to this process (falls back to logical cores)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(physical, logical))


ORT_DEVICE_PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_providers(device: str = "cpu", providers: list[str] | None = None) -> list[str]:
    """The onnxruntime provider list for ``device`` (``ORT_DEVICE_PROVIDERS``), or ``providers`` as given,
    checked against this onnxruntime build.

    Raises:
        ValueError: unknown device, or a provider this build lacks (install onnxruntime-gpu for CUDA / TensorRT).
    """
    import onnxruntime as ort

    if providers is None:
        if device not in ORT_DEVICE_PROVIDERS:
            raise ValueError(f"onnxruntime device {device!r} is not one of {sorted(ORT_DEVICE_PROVIDERS)}")
        providers = ORT_DEVICE_PROVIDERS[device]
    available = ort.get_available_providers()
    unavailable = [p for p in providers if p not in available]
    if unavailable:
        raise ValueError(
            f"onnxruntime providers {unavailable} are not available in this build (available: {available}); "
            "GPU providers need `pip install 'medrefine[gpu]'` (onnxruntime-gpu) on an NVIDIA GPU machine"
        )
    return list(providers)


def ort_session_options(intra_op_threads: int, *, allow_spinning: bool = False) -> Any:
    """The serving session options: ``intra_op_threads`` threads inside an operator, one across operators,
    sequential execution, every graph optimisation.

    ``allow_spinning`` lets idle intra-op threads busy-wait for the next operator (ONNX Runtime's own
    default). It is off here: where the HTTP side and other processes share the cores, spinning threads
    burn the CPU they need. On the 2-core benchmark box, 2 intra-op threads ran the transunet and
    image_encoder graphs at batch 16 1.7x as fast as 1 thread without spinning, 1.2x with it. It makes no
    difference with one thread.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def graph_precisions(artifacts: Artifacts, names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """{graph: "fp32" | "fp16" | "int8"} from the manifest's graph entries (older manifests: the top-level one)."""
    entries = artifacts.manifest.get("graphs", {})
    return {name: str(entries.get(name, {}).get("precision", artifacts.precision)) for name in names}


class Engine(abc.ABC):
    """Runs exported graphs by name. Implementations are safe to call from several threads.

    Graph names and signatures are those of the artifact manifest (docs/architecture.md): ``transunet``,
    ``image_encoder``, ``mask_decoder`` and, for learned gates, ``gate``.
    """

    backend: str = ""

    @property
    @abc.abstractmethod
    def graph_names(self) -> tuple[str, ...]:
        """The graphs this engine can run."""

    @abc.abstractmethod
    def input_names(self, graph_name: str) -> tuple[str, ...]:
        """Input names of ``graph_name``, in graph order."""

    @abc.abstractmethod
    def output_names(self, graph_name: str) -> tuple[str, ...]:
        """Output names of ``graph_name``, in graph order."""

    @abc.abstractmethod
    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a graph on validated inputs (exactly its input names)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """``{"backend": ..., "providers" or "device": ...}`` for /model_info and logs."""

    def max_batch(self, graph_name: str) -> int | None:
        """The largest batch ``graph_name`` runs at; None: no limit."""
        return None

    def preferred_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes that run at their own static shape, ascending; another size runs as several of them.
        Empty: any size runs in one call."""
        return ()

    def run(self, graph_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``graph_name`` on ``inputs`` and return every output as float32 (or its integer dtype).

        Extra inputs that the graph does not declare are ignored (an exporter may fold away an
        unused input such as ``orig_im_size``); missing ones raise.

        Raises:
            KeyError: unknown graph (the message names the available graphs).
            ValueError: a declared input is missing.
        """
        if graph_name not in self.graph_names:
            raise KeyError(f"{self.backend} engine has no graph {graph_name!r}; available: {list(self.graph_names)}")
        names = self.input_names(graph_name)
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ValueError(f"graph {graph_name!r} needs inputs {list(names)}; missing {missing}")
        outputs = self._run(graph_name, {name: np.asarray(inputs[name]) for name in names})
        return {
            name: value.astype(np.float32) if value.dtype in (np.float16, np.float64) else value
            for name, value in outputs.items()
        }


class OnnxRuntimeEngine(Engine):
    """ONNX graphs on onnxruntime.

    Args:
        artifacts: a loaded, verified artifact directory.
        device: ``"cpu"`` (default), ``"cuda"`` or ``"tensorrt"`` (TensorRT execution provider with CUDA
            and CPU fallbacks); ignored when ``providers`` is given.
        providers: explicit onnxruntime provider list (first = preferred).
        intra_op_threads: threads inside one operator (default: physical cores).
        allow_spinning: let idle intra-op threads busy-wait between operators (off: see
            ``ort_session_options``).
        graphs: restrict to these graph names (default: all in the manifest).

    Raises:
        ValueError: unknown device, or a requested provider that this onnxruntime build lacks
            (install onnxruntime-gpu for CUDA / TensorRT).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        artifacts: Artifacts,
        *,
        device: str = "cpu",
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        allow_spinning: bool = False,
        graphs: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        providers = ort_providers(device, providers)
        self._intra_op_threads = int(intra_op_threads) if intra_op_threads else physical_cores()
        self._allow_spinning = bool(allow_spinning)
        options = ort_session_options(self._intra_op_threads, allow_spinning=self._allow_spinning)
        names = list(graphs) if graphs is not None else list(artifacts.graphs)
        self._sessions = {}
        for name in names:
            spec = artifacts.graph(name)
            self._sessions[name] = ort.InferenceSession(str(spec.path), sess_options=options, providers=providers)
        self._inputs = {
            name: tuple(node.name for node in session.get_inputs()) for name, session in self._sessions.items()
        }
        self._input_dtypes = {
            name: {node.name: _ORT_DTYPES.get(node.type, np.float32) for node in session.get_inputs()}
            for name, session in self._sessions.items()
        }
        self._outputs = {
            name: tuple(node.name for node in session.get_outputs()) for name, session in self._sessions.items()
        }
        self._providers = list(next(iter(self._sessions.values())).get_providers()) if self._sessions else providers
        self._precision = graph_precisions(artifacts, names)

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def input_names(self, graph_name: str) -> tuple[str, ...]:
        return self._inputs[graph_name]

    def output_names(self, graph_name: str) -> tuple[str, ...]:
        return self._outputs[graph_name]

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtypes = self._input_dtypes[graph_name]
        feed = {name: np.ascontiguousarray(value, dtype=dtypes[name]) for name, value in inputs.items()}
        values = self._sessions[graph_name].run(None, feed)
        return dict(zip(self._outputs[graph_name], values, strict=True))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": self._providers, "intra_op_threads": self._intra_op_threads,
                "allow_spinning": self._allow_spinning, "precision": dict(self._precision)}


# OpenVINO's inference precision per graph: what a name asks for, and how a compiled model's hint reads back.
OPENVINO_PRECISIONS: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}
_OV_READBACK = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
OPENVINO_DEFAULT_PRECISION = "bf16"
# Graphs the OpenVINO engine leaves to ONNX Runtime by default: the SAM decoder ran 1.1 ms per call there
# and 2.8-3.8 ms in OpenVINO (its two mask resizes alone took 1.3 ms), bf16 or not (docs/architecture.md).
OPENVINO_ORT_GRAPHS = ("mask_decoder",)
# Batches are padded up to one of these sizes and run on a model compiled for that shape (see OpenVINOEngine).
OPENVINO_BATCH_BUCKETS = (1, 2, 4, 8, 16)
_MAX_STATIC_MODELS = 16  # per graph (other dynamic dimensions, e.g. prompt points, multiply the shapes)


def openvino_precisions(precision: str | Mapping[str, str], names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """{graph: "fp32" | "bf16"} for ``names``: one precision for every graph, or a per-graph mapping (graphs it
    leaves out run fp32).

    Raises:
        ValueError: an unknown precision (the message names it and the choices).
    """
    if isinstance(precision, str):
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"openvino precision {precision!r} is not one of {sorted(OPENVINO_PRECISIONS)} "
                             "(or a mapping graph -> one of them)")
        return {name: precision for name in names}
    bad = {graph: value for graph, value in precision.items() if value not in OPENVINO_PRECISIONS}
    if bad:
        raise ValueError(f"openvino precision {bad} is not one of {sorted(OPENVINO_PRECISIONS)}")
    return {name: precision.get(name, "fp32") for name in names}


def _port_name(port: Any, declared: tuple[str, ...]) -> str:
    """The manifest's name for an OpenVINO port (a port carries every tensor name an ONNX edge had)."""
    names = port.get_names()
    return next((name for name in declared if name in names), port.get_any_name())


def _batch_first(port: Any) -> bool:
    """Whether a graph input or output's first dimension is dynamic (the batch)."""
    shape = port.get_partial_shape()
    return bool(shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_dynamic)


def _pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
    """``value`` with zero rows appended along axis 0 up to ``rows``."""
    if value.shape[0] == rows:
        return value
    padded = np.zeros((rows, *value.shape[1:]), dtype=value.dtype)
    padded[: value.shape[0]] = value
    return padded


class OpenVINOEngine(Engine):
    """ONNX graphs compiled by OpenVINO for the CPU, each at fp32 or bf16 inference precision.

    bf16 runs on CPUs with AMX or AVX512-BF16; elsewhere OpenVINO runs fp32 whatever was asked, and
    :meth:`describe` reports the precision each compiled graph actually runs at. Weights and I/O stay
    float32. A batch runs on models compiled for the static shapes ``batch_buckets`` (static shapes ran
    the encoder 1.5-1.7x as fast as the dynamic model; a model per batch size 1-16 held 1 GiB more, five
    buckets 332 MiB): a batch that is not a bucket runs as bucket-sized chunks, largest first (9 rows as
    8 + 1: the encoder at 2.6 ms per image, against 4.9 padded to 16), and only where some input or output
    is not batched is a batch padded (zero rows) to the next bucket, or run on the dynamic model above the
    largest. The buckets are compiled when the engine is built. The graphs in ``onnxruntime_graphs`` run
    on ONNX Runtime fp32 (see ``OPENVINO_ORT_GRAPHS``). Each calling thread has its own infer requests, so
    threads run at once without a lock. Design and measured figures: docs/architecture.md, "inference".

    Args:
        artifacts: a loaded, verified artifact directory (its ONNX files are compiled, dynamic batch kept).
        precision: ``"fp32"`` or ``"bf16"`` for every OpenVINO graph, or ``{graph: "fp32" | "bf16"}``
            (graphs left out run fp32).
        intra_op_threads: threads inside one inference (default: physical cores), as for ONNX Runtime.
        onnxruntime_graphs: graphs run on ONNX Runtime instead (default ``OPENVINO_ORT_GRAPHS``).
        batch_buckets: batch sizes with a static-shape model, ascending (empty: the dynamic model only).
        graphs: restrict to these graph names (default: all in the manifest).
        precompile: compile every bucket now for the graphs whose inputs are fixed but for the batch
            (transunet, image_encoder), so no served request waits for a compile; False: on first use.

    Raises:
        inference.tensorrt_runtime.MissingDependencyError: openvino is not installed (names the extra).
        ValueError: an unknown precision (named), or batch buckets that are not ascending positive sizes.
    """

    backend = "openvino"

    def __init__(
        self,
        artifacts: Artifacts,
        *,
        precision: str | Mapping[str, str] = OPENVINO_DEFAULT_PRECISION,
        intra_op_threads: int | None = None,
        onnxruntime_graphs: list[str] | tuple[str, ...] = OPENVINO_ORT_GRAPHS,
        batch_buckets: tuple[int, ...] | list[int] = OPENVINO_BATCH_BUCKETS,
        graphs: list[str] | None = None,
        precompile: bool = True,
    ) -> None:
        from inference.tensorrt_runtime import MissingDependencyError

        names = list(graphs) if graphs is not None else list(artifacts.graphs)
        requested = openvino_precisions(precision, names)
        buckets = tuple(int(b) for b in batch_buckets)
        if any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"batch_buckets must be ascending positive batch sizes, got {list(batch_buckets)}")
        try:
            import openvino as ov
        except ImportError as exc:
            raise MissingDependencyError(OPENVINO_MISSING) from exc

        self._intra_op_threads = int(intra_op_threads) if intra_op_threads else physical_cores()
        self._buckets = buckets
        ort_names = [name for name in names if name in onnxruntime_graphs]
        self._ort = (OnnxRuntimeEngine(artifacts, device="cpu", intra_op_threads=self._intra_op_threads,
                                       graphs=ort_names) if ort_names else None)
        self._core = ov.Core()
        self._models: dict[str, Any] = {}
        self._config: dict[str, dict[str, Any]] = {}
        self._dynamic: dict[str, Any] = {}
        for name in names:
            if name in ort_names:
                continue
            self._config[name] = {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[requested[name]],
                "INFERENCE_NUM_THREADS": self._intra_op_threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                # the server shares its cores with the HTTP side; pinning would tie a thread to one core
                "ENABLE_CPU_PINNING": False,
            }
            self._models[name] = self._core.read_model(str(artifacts.graph(name).path))
            self._dynamic[name] = self._core.compile_model(self._models[name], "CPU", self._config[name])
        self._static: dict[str, dict[tuple[tuple[int, ...], ...], Any]] = {name: {} for name in self._dynamic}
        self._compile_lock = threading.Lock()
        self._inputs, self._outputs, self._input_dtypes = {}, {}, {}
        # inputs and outputs whose first dimension is the batch (dynamic in the graph; orig_im_size's is not)
        self._batched_in = {name: tuple(_batch_first(p) for p in c.inputs) for name, c in self._dynamic.items()}
        self._batched_out = {name: tuple(_batch_first(p) for p in c.outputs) for name, c in self._dynamic.items()}
        for name, compiled in self._dynamic.items():
            spec = artifacts.graph(name)
            self._inputs[name] = tuple(_port_name(port, spec.input_names) for port in compiled.inputs)
            self._outputs[name] = tuple(_port_name(port, spec.output_names) for port in compiled.outputs)
            self._input_dtypes[name] = {input_name: port.get_element_type().to_dtype()
                                        for input_name, port in zip(self._inputs[name], compiled.inputs, strict=True)}
        stored = graph_precisions(artifacts, names)
        self._precision: dict[str, str] = {}
        self._runtime: dict[str, str] = {}
        for name in names:
            if self._ort is not None and name in ort_names:
                self._precision[name] = self._ort.describe()["precision"][name]
                self._runtime[name] = "onnxruntime"
                continue
            hint = self._dynamic[name].get_property("INFERENCE_PRECISION_HINT").get_type_name()
            runs = _OV_READBACK.get(hint, hint)
            # a quantized graph keeps its int8 operators; the hint covers the rest
            self._precision[name] = runs if stored[name] == "fp32" else f"{stored[name]}+{runs}"
            self._runtime[name] = "openvino"
        self._version = ov.get_version()
        self._local = threading.local()
        if precompile:
            self._precompile()

    def _precompile(self) -> None:
        """Compile each bucket's model for the graphs whose inputs have a static shape but for the batch."""
        for name, compiled in self._dynamic.items():
            shapes = [port.get_partial_shape() for port in compiled.inputs]
            if not all(b and all(d.is_static for d in list(shape)[1:])
                       for shape, b in zip(shapes, self._batched_in[name], strict=True)):
                continue  # e.g. the decoder's point count: its shapes are known only per request
            for bucket in self._buckets:
                self._compiled_for(name, tuple((bucket, *(d.get_length() for d in list(shape)[1:]))
                                               for shape in shapes))

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self._runtime)

    def input_names(self, graph_name: str) -> tuple[str, ...]:
        if graph_name in self._dynamic:
            return self._inputs[graph_name]
        return self._ort.input_names(graph_name)  # type: ignore[union-attr]

    def output_names(self, graph_name: str) -> tuple[str, ...]:
        if graph_name in self._dynamic:
            return self._outputs[graph_name]
        return self._ort.output_names(graph_name)  # type: ignore[union-attr]

    def _compiled_for(self, graph_name: str, key: tuple[tuple[int, ...], ...]) -> Any:
        """The model compiled for input shapes ``key`` (compiled now if there is room), else (and for ``()``) the
        dynamic one."""
        models = self._static[graph_name]
        if not key:
            return self._dynamic[graph_name]
        compiled = models.get(key)
        if compiled is not None:
            return compiled
        if len(models) >= _MAX_STATIC_MODELS:
            return self._dynamic[graph_name]
        with self._compile_lock:
            if key not in models and len(models) < _MAX_STATIC_MODELS:
                model = self._models[graph_name].clone()
                model.reshape({port: list(shape) for port, shape in zip(model.inputs, key, strict=True)})
                models[key] = self._core.compile_model(model, "CPU", self._config[graph_name])
            return models.get(key, self._dynamic[graph_name])

    def _request(self, graph_name: str, key: tuple[tuple[int, ...], ...]) -> Any:
        """This thread's infer request for ``graph_name`` at input shapes ``key`` (created on first use)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get((graph_name, key))
        if request is not None:
            return request
        compiled = self._compiled_for(graph_name, key)
        if compiled is self._dynamic[graph_name]:  # one request of the dynamic model serves every other shape
            key = ()
            request = requests.get((graph_name, key))
        if request is None:
            request = requests[(graph_name, key)] = compiled.create_infer_request()
        return request

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph_name not in self._dynamic:
            return self._ort._run(graph_name, inputs)  # type: ignore[union-attr]
        dtypes = self._input_dtypes[graph_name]
        feed = [np.ascontiguousarray(inputs[name], dtype=dtypes[name]) for name in self._inputs[graph_name]]
        rows = next((value.shape[0] for value, b in zip(feed, self._batched_in[graph_name], strict=True) if b), 0)
        chunks = self._bucket_chunks(graph_name, rows)
        if len(chunks) == 1:
            return self._run_feed(graph_name, feed, rows)
        parts, start = [], 0
        for n in chunks:  # e.g. 9 rows as 8 + 1: a batch padded to 16 would cost 16 rows
            parts.append(self._run_feed(graph_name, [value[start:start + n] for value in feed], n))
            start += n
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _bucket_chunks(self, graph_name: str, rows: int) -> list[int]:
        """Row counts to run a batch of ``rows`` in: one, or bucket sizes summing to it (largest first) when it
        is not a bucket and every input and output of the graph is batched."""
        if not rows or rows in self._buckets or not self._buckets or not all(self._batched_in[graph_name]) \
                or not all(self._batched_out[graph_name]):
            return [rows]
        chunks = []
        while rows:
            bucket = max(b for b in self._buckets if b <= rows) if rows >= self._buckets[0] else rows
            chunks.append(bucket)
            rows -= bucket
        return chunks

    def _run_feed(self, graph_name: str, feed: list[np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Run ``feed`` (graph input order, ``rows`` in the batch) padded to the next bucket, or on the dynamic
        model above the largest."""
        batched = self._batched_in[graph_name]
        bucket = next((b for b in self._buckets if b >= rows), None) if rows else None
        if bucket is None:  # beyond the largest bucket: the dynamic model, as it comes
            key: tuple[tuple[int, ...], ...] = ()
        else:
            feed = [_pad_rows(value, bucket) if b else value for value, b in zip(feed, batched, strict=True)]
            key = tuple(value.shape for value in feed)
        # outputs are copied out of the request's buffers (share_outputs=False): the next call reuses them
        result = self._request(graph_name, key).infer(feed, share_inputs=True, share_outputs=False)
        return {name: result[index][:rows] if b and bucket is not None else result[index]
                for index, (name, b) in enumerate(zip(self._outputs[graph_name], self._batched_out[graph_name],
                                                      strict=True))}

    def preferred_batch_sizes(self) -> tuple[int, ...]:
        return self._buckets

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": "CPU", "openvino": self._version,
                "intra_op_threads": self._intra_op_threads, "precision": dict(self._precision),
                "runtime": dict(self._runtime), "batch_buckets": list(self._buckets)}


class WrappedEngine(Engine):
    """Runs ``inner``'s graphs under ``backend`` (default: inner's); a subclass overrides ``_run`` to watch or
    change the calls (``export.quantize`` records the feeds; tests record the batches)."""

    def __init__(self, inner: Engine, backend: str | None = None) -> None:
        self.inner = inner
        self.backend = backend if backend is not None else inner.backend

    @property
    def graph_names(self) -> tuple[str, ...]:
        return self.inner.graph_names

    def input_names(self, graph_name: str) -> tuple[str, ...]:
        return self.inner.input_names(graph_name)

    def output_names(self, graph_name: str) -> tuple[str, ...]:
        return self.inner.output_names(graph_name)

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.run(graph_name, inputs)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def max_batch(self, graph_name: str) -> int | None:
        return self.inner.max_batch(graph_name)

    def preferred_batch_sizes(self) -> tuple[int, ...]:
        return self.inner.preferred_batch_sizes()


class TorchEngine(Engine):
    """The source checkpoint run in torch behind the graph-level interface.

    The graphs are the export wrappers (``weights.graphs.served_graphs``: TransUNetGraph,
    ImageEncoderGraph, SamOnnxDecoder, GateGraph) around the model loaded from the run directory the
    manifest names (``source.run_dir``) or ``run_dir``, whose weights must be the exported ones; the
    numbers are those the ONNX graphs were checked against.

    Args:
        artifacts: the artifact directory (for the source run and the graph list).
        run_dir: override the source run directory.
        device: ``"cuda"`` when available else ``"cpu"`` by default.
    """

    backend = "torch"

    def __init__(self, artifacts: Artifacts, *, run_dir: str | Path | None = None, device: str | None = None) -> None:
        import torch

        from weights.checkpoints import build_model_from_run, load_run
        from weights.graphs import served_graphs

        source = run_dir if run_dir is not None else artifacts.source.get("run_dir")
        if not source:
            raise ValueError(f"{artifacts.root / 'manifest.json'}: source.run_dir is empty; pass run_dir=")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        info = load_run(source)
        if artifacts.source.get("weights_sha256") and info.weights_sha256 != artifacts.source["weights_sha256"]:
            raise ArtifactError(
                f"{info.run_dir}: weights sha256 {info.weights_sha256[:16]}... differ from the ones the artifacts "
                f"were exported from ({str(artifacts.source['weights_sha256'])[:16]}...)"
            )
        model = build_model_from_run(info)
        graphs = [graph for graph in served_graphs(model) if graph.name in artifacts.graphs]
        self._modules = {graph.name: graph.module.to(self._device).eval() for graph in graphs}
        self._inputs = {graph.name: graph.input_names for graph in graphs}
        self._outputs = {graph.name: graph.output_names for graph in graphs}
        self._torch = torch

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def input_names(self, graph_name: str) -> tuple[str, ...]:
        return self._inputs[graph_name]

    def output_names(self, graph_name: str) -> tuple[str, ...]:
        return self._outputs[graph_name]

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [
            torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self._device) for name in self._inputs[graph_name]
        ]
        with torch.inference_mode():
            values = self._modules[graph_name](*args)
        if isinstance(values, torch.Tensor):
            values = (values,)
        return {
            name: value.detach().float().cpu().numpy()
            for name, value in zip(self._outputs[graph_name], values, strict=True)
        }

    def describe(self) -> dict[str, Any]:
        # the source checkpoint's own modules, whatever precision the ONNX graphs were exported in
        return {"backend": self.backend, "device": str(self._device),
                "precision": {name: "fp32" for name in self._modules}}


class TensorRTEngine(Engine):
    """Serialized TensorRT engines written by ``python -m export tensorrt`` (``ART_DIR/trt/``).

    Before deserialising, checks the engine record (``trt/manifest.json``) against this GPU and
    TensorRT version (``inference.tensorrt_runtime.check_engine_compatible``), against the artifact version, and
    each engine file's sha256. Runs with torch CUDA tensors as I/O buffers; shape inputs
    (``orig_im_size``, int32 in the engine) live in host memory as TensorRT requires.

    Args:
        artifacts: the verified artifact directory the engines were built from.
        engines_dir: where the engines are (default ``ART_DIR/trt``).
        device: CUDA device index.

    Raises:
        inference.tensorrt_runtime.MissingDependencyError: tensorrt or a CUDA GPU is missing (with the install hint).
        inference.tensorrt_runtime.EngineCompatibilityError: engines built for another GPU / TensorRT version.
        ArtifactError: missing engine record or files, hash or artifact-version mismatch.
    """

    backend = "tensorrt"

    def __init__(self, artifacts: Artifacts, *, engines_dir: str | Path | None = None, device: int = 0) -> None:
        from inference.tensorrt_runtime import MissingDependencyError, profile_max_batch, query_gpu

        try:
            import tensorrt as trt
        except ImportError as exc:
            raise MissingDependencyError(TENSORRT_MISSING) from exc
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("TensorRTEngine needs a CUDA GPU; torch.cuda.is_available() is False")

        engines_dir = Path(engines_dir) if engines_dir is not None else artifacts.root / "trt"
        # The same check `python -m service` runs before start-up: record, artifact version, hashes, GPU.
        record = check_tensorrt_engines(artifacts, engines_dir, gpu=query_gpu(), tensorrt_version=trt.__version__)
        self._torch, self._trt = torch, trt
        self._device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._inputs: dict[str, tuple[str, ...]] = {}
        self._outputs: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        for name, entry in record["engines"].items():
            path = engines_dir / entry["file"]
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArtifactError(f"{path}: TensorRT could not deserialize the engine for graph {name!r}")
            self._engines[name] = engine
            self._contexts[name] = engine.create_execution_context()
            tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self._inputs[name] = tuple(t for t in tensors if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT)
            self._outputs[name] = tuple(t for t in tensors if engine.get_tensor_mode(t) == trt.TensorIOMode.OUTPUT)
        self._engines_dir = engines_dir
        self._precision = record.get("precision")
        self._max_batch = {name: profile_max_batch(record, name) for name in record["engines"]}

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self._engines)

    def input_names(self, graph_name: str) -> tuple[str, ...]:
        return self._inputs[graph_name]

    def output_names(self, graph_name: str) -> tuple[str, ...]:
        return self._outputs[graph_name]

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self._torch, self._trt
        engine = self._engines[graph_name]
        with self._lock:  # one execution context per graph
            context = self._contexts[graph_name]
            stream = torch.cuda.current_stream(self._device)
            keep_alive: list[Any] = []
            for name in self._inputs[graph_name]:
                np_dtype = trt.nptype(engine.get_tensor_dtype(name))
                host = np.ascontiguousarray(inputs[name], dtype=np_dtype)
                if engine.is_shape_inference_io(name):  # shape tensors are read from host memory
                    context.set_input_shape(name, host.shape)
                    context.set_tensor_address(name, host.ctypes.data)
                    keep_alive.append(host)
                    continue
                tensor = torch.from_numpy(host).to(self._device)
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
                keep_alive.append(tensor)
            outputs = {}
            for name in self._outputs[graph_name]:
                dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
                tensor = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self._device)
                context.set_tensor_address(name, tensor.data_ptr())
                outputs[name] = tensor
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of graph {graph_name!r} failed")
            stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": str(self._device),
            "gpu": self._torch.cuda.get_device_name(self._device),
            "tensorrt": self._trt.__version__,
            "precision": self._precision,
        }

    def max_batch(self, graph_name: str) -> int | None:
        return self._max_batch.get(graph_name)


ENGINE_REGISTRY: dict[str, Callable[..., Engine]] = {
    "onnxruntime": OnnxRuntimeEngine,
    "openvino": OpenVINOEngine,
    "torch": TorchEngine,
    "tensorrt": TensorRTEngine,
}


def build_engine(backend: str, artifacts_dir: str | Path | Artifacts, **opts: Any) -> Engine:
    """Build the engine registered as ``backend`` over an artifact directory (verified on load).

    Args:
        backend: one of ``ENGINE_REGISTRY`` ("onnxruntime", "openvino", "torch", "tensorrt").
        artifacts_dir: the artifact directory, or an already loaded :class:`Artifacts`.
        **opts: passed to the engine's constructor.

    Raises:
        ValueError: unknown backend (the message lists the choices).
        ArtifactError: the artifact directory does not verify.
    """
    if backend not in ENGINE_REGISTRY:
        raise ValueError(f"unknown engine backend {backend!r}; choose one of {sorted(ENGINE_REGISTRY)}")
    artifacts = artifacts_dir if isinstance(artifacts_dir, Artifacts) else load_artifacts(artifacts_dir)
    return ENGINE_REGISTRY[backend](artifacts, **opts)
