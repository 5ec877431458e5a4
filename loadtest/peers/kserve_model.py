"""KServe's Python model server over our pipeline: a ``kserve.Model`` served by ``kserve.ModelServer``."""

from __future__ import annotations

import argparse
import uuid

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.errors import InvalidInput

from loadtest.peers.common import load_pipeline, segment_masks, to_unit

INPUT, OUTPUT = "IMAGE", "MASK"


class SegmentModel(Model):
    """``IMAGE`` UINT8 ``[H, W]`` -> ``MASK`` UINT8 ``[H, W]`` through the pipeline over ``artifacts``."""

    def __init__(self, name: str, artifacts: str, *, threads: int = 1) -> None:
        super().__init__(name)
        self.artifacts = artifacts
        self.threads = threads
        self.pipeline = None
        self.load()

    def load(self) -> bool:
        self.pipeline = load_pipeline(self.artifacts, threads=self.threads)
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:
        tensor = next((t for t in payload.inputs if t.name == INPUT), None)
        if tensor is None:
            raise InvalidInput(f"input {INPUT!r} (UINT8 [H, W]) is required; got {[t.name for t in payload.inputs]}")
        if tensor.datatype != "UINT8" or len(tensor.shape) != 2:
            raise InvalidInput(f"input {INPUT!r} must be UINT8 [H, W], got {tensor.datatype} {list(tensor.shape)}")
        try:
            mask = segment_masks(self.pipeline, [to_unit(tensor.as_numpy())])[0]
        except ValueError as exc:  # the pipeline's InputError names what is wrong with the image
            raise InvalidInput(f"input {INPUT!r}: {exc}") from None
        output = InferOutput(name=OUTPUT, shape=list(mask.shape), datatype="UINT8")
        output.set_data_from_numpy(mask)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             infer_outputs=[output], use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--artifacts", required=True, help="artifact directory (python -m export onnx)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch threads")
    args, _ = parser.parse_known_args()
    ModelServer().start([SegmentModel(args.model_name, args.artifacts, threads=args.threads)])


if __name__ == "__main__":
    main()
