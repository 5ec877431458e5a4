"""The seams' Protocols match what implements them: same method parameters, every member present."""

from __future__ import annotations

import inspect

import pytest
import torch

from inference.generation import Pix2PixPipeline, Text2ImagePipeline
from inference.generator_artifacts import OnnxDenoiser, OnnxPix2Pix, OnnxScorer, OnnxTextEncoder
from inference.pipeline import SegmentationPipeline
from inference.protocols import Denoiser, ImageScorer, MaskToImage, Segmenter, TextEncoder
from models.pix2pix import Pix2PixGenerator
from models.reward import RewardModel
from models.selector import Selector
from models.text2image import Text2ImageModel
from service.errors import QueueFullError
from service.protocols import FrontEndRuntime
from service.runtime import ServiceRuntime
from tests.support.runtime_doubles import FailingRuntime


def _members(protocol: type) -> set[str]:
    names = {n for n in vars(protocol) if not n.startswith("_") or n == "__call__"}
    names |= set(getattr(protocol, "__annotations__", {}))
    return names - {"__annotations__"}


def _parameters(function) -> list[tuple[str, inspect._ParameterKind, bool]]:
    return [(p.name, p.kind, p.default is inspect.Parameter.empty)
            for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize(("protocol", "implementation"), [
    (Segmenter, SegmentationPipeline),
    (FrontEndRuntime, ServiceRuntime),
    (Denoiser, Text2ImageModel),
    (Denoiser, OnnxDenoiser),
    (MaskToImage, OnnxPix2Pix),
    (MaskToImage, Pix2PixGenerator),
    (ImageScorer, Selector),
    (ImageScorer, OnnxScorer),
    (ImageScorer, RewardModel),
    (TextEncoder, OnnxTextEncoder),
])
def test_methods_take_the_protocols_parameters(protocol, implementation):
    for name in _members(protocol):
        declared = inspect.getattr_static(protocol, name, None)
        if not inspect.isfunction(declared):
            continue
        if name == "__call__" and issubclass(implementation, torch.nn.Module):
            name = "forward"  # Module.__call__(*args) runs forward
        assert _parameters(getattr(implementation, name)) == _parameters(declared), f"{implementation.__name__}.{name}"


def test_the_runtime_double_satisfies_the_protocol():
    double = FailingRuntime(QueueFullError(retry_after=1.0))
    assert isinstance(double, FrontEndRuntime)
    assert _members(FrontEndRuntime) <= set(dir(double))


def test_pipelines_name_their_parts_by_protocol():
    hints = inspect.get_annotations(Text2ImagePipeline.__init__, eval_str=True)
    assert (hints["model"], hints["text_encoder"]) == (Denoiser, TextEncoder)
    assert inspect.get_annotations(Pix2PixPipeline.__init__, eval_str=True)["generator"] is MaskToImage
