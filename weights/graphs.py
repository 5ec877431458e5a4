"""The served graphs as torch modules: the wrappers ``export`` traces to ONNX and the torch engine runs.

Graph names, inputs and outputs are the artifact directory's (docs/architecture.md, "Artifact directory").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.gate import Gate
from models.sam import Sam
from models.transunet import TransUNet
from models.ultrarefiner import UltraRefiner
from weights.sam_onnx import INPUT_NAMES as DECODER_INPUTS
from weights.sam_onnx import OUTPUT_NAMES as DECODER_OUTPUTS
from weights.sam_onnx import SamOnnxDecoder


class TransUNetGraph(nn.Module):
    """``image`` (B, C, S, S) in [0, 1] -> ``probability`` (B, 1, S, S) = sigmoid(TransUNet logits)."""

    def __init__(self, transunet: nn.Module) -> None:
        super().__init__()
        self.transunet = transunet

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.transunet(image))


class ImageEncoderGraph(nn.Module):
    """``image`` (B, 3, R, R) in [0, 255] -> ``image_embeddings`` (B, D, R/16, R/16).

    R is the refiner's input size S, so SAM's resize and pad are identities; the normalisation
    (``Sam.preprocess``: mean/std for "sam", per-image min-max for "medsam") runs inside the graph.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.sam.encode(self.sam.preprocess(image))


class GateGraph(nn.Module):
    """``coarse``, ``sam`` (B, 1, H, W) [, ``image``] -> ``gate`` (B, 1, H, W) of a learned/hybrid gate."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, coarse: torch.Tensor, sam: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return self.gate(coarse, sam, image)


@dataclass(frozen=True)
class ServedGraph:
    """One graph: its wrapper module (eval mode) and the names of its inputs (in call order) and outputs."""

    name: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def model_parts(model: UltraRefiner | TransUNet) -> tuple[TransUNet, Sam | None, Gate | None]:
    """(transunet, sam, gate) of an UltraRefiner, or (transunet, None, None) for a TransUNet run."""
    if isinstance(model, UltraRefiner):
        return model.transunet, model.refiner, model.gate
    return model, None, None


def gate_input_names(gate: nn.Module) -> tuple[str, ...]:
    return ("coarse", "sam", "image") if gate.config.use_image else ("coarse", "sam")


def served_graphs(model: nn.Module) -> list[ServedGraph]:
    """Every graph the service runs for this model: transunet, image_encoder + mask_decoder (refiner runs),
    gate (learned / hybrid gates only)."""
    transunet, sam, gate = model_parts(model)
    graphs: list[ServedGraph] = []
    if transunet is not None:
        graphs.append(ServedGraph("transunet", TransUNetGraph(transunet).eval(), ("image",), ("probability",)))
    if sam is not None:
        graphs.append(ServedGraph("image_encoder", ImageEncoderGraph(sam).eval(), ("image",), ("image_embeddings",)))
        graphs.append(ServedGraph("mask_decoder", SamOnnxDecoder(sam, return_single_mask=True).eval(),
                                  tuple(DECODER_INPUTS), tuple(DECODER_OUTPUTS)))
    if gate is not None and gate.config.type in ("learned", "hybrid"):
        graphs.append(ServedGraph("gate", GateGraph(gate).eval(), gate_input_names(gate), ("gate",)))
    return graphs


