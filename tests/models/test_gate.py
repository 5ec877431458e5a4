import json

import pytest
import torch

from models.gate import GATE_PRESETS, GateConfig, apply_gate, build_gate, uncertainty
from models.transunet import num_parameters


def _maps(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 1, 16, 20, generator=g)
    sam = torch.rand(2, 1, 16, 20, generator=g)
    image = torch.rand(2, 1, 16, 20, generator=g)
    return coarse, sam, image


def test_uncertainty_curve():
    c = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(uncertainty(c, 1.0), torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(uncertainty(c, 2.0), torch.tensor([0.0, 0.75, 1.0, 0.75, 0.0]), atol=1e-5, rtol=0)
    c = torch.full((3,), 0.5, requires_grad=True)
    uncertainty(c, 0.5).sum().backward()
    assert torch.isfinite(c.grad).all()


def test_uncertainty_gate_is_clamped():
    gate = build_gate(GateConfig(type="uncertainty", gate_gamma=1.0, gate_min=0.1, gate_max=0.6))
    c = torch.tensor([0.0, 0.25, 0.5, 0.9]).view(1, 1, 1, 4)
    out = gate(c, torch.zeros_like(c))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.1, 0.5, 0.6, 0.2]), atol=1e-5, rtol=0)
    assert num_parameters(gate) == 0


def test_none_gate_gives_plain_refinement():
    coarse, sam, _ = _maps()
    gate = build_gate("none")(coarse, sam)
    assert torch.equal(gate, torch.ones_like(coarse))
    torch.testing.assert_close(apply_gate(coarse, sam, gate), sam)
    torch.testing.assert_close(apply_gate(coarse, sam, torch.zeros_like(gate)), coarse)


@pytest.mark.parametrize("kind", ["learned", "hybrid"])
def test_learned_gates_range_size_and_gradients(kind):
    torch.manual_seed(0)
    cfg = GateConfig(type=kind, gate_min=0.1, gate_max=0.7)
    gate = build_gate(cfg)
    assert 1_000 < num_parameters(gate) < 5_000
    coarse, sam, image = _maps()
    out = gate(coarse, sam, image)
    # zero-initialised last layer: sigmoid = 0.5 everywhere at the start
    expected_raw = 0.5 if kind == "learned" else 0.5 * uncertainty(coarse, 1.0)
    torch.testing.assert_close(out, 0.1 + 0.6 * expected_raw * torch.ones_like(coarse))
    opt = torch.optim.SGD(gate.parameters(), lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        gate(coarse, sam, image).mean().backward()
        opt.step()
    out = gate(coarse, sam, image)
    assert out.min() >= 0.1 and out.max() <= 0.7
    assert not torch.allclose(out, 0.1 + 0.6 * expected_raw * torch.ones_like(coarse))
    with pytest.raises(ValueError, match="needs the image"):
        gate(coarse, sam)


def test_learned_gate_without_image():
    gate = build_gate({"type": "learned", "use_image": False})
    coarse, sam, _ = _maps()
    assert gate(coarse, sam).shape == coarse.shape


def test_config_round_trip_and_validation():
    for cfg in GATE_PRESETS.values():
        assert GateConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="gate_min"):
        GateConfig(gate_min=0.9, gate_max=0.5)
    with pytest.raises(ValueError, match="GateConfig.type"):
        GateConfig(type="soft")
    with pytest.raises(ValueError, match="gamma"):
        GateConfig(gate_gamma=0)
    with pytest.raises(ValueError, match="colour"):
        GateConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="unknown gate preset"):
        build_gate("strict")


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.3])
def test_inference_gate_in_place_equals_the_recorded_gradient_path(gamma):
    # without autograd the uncertainty gate and the blend run in place: the training path's values, bit for bit
    coarse, sam, _ = _maps(int(gamma * 10))
    coarse[0, 0, 0, :3] = torch.tensor([0.0, 0.5, 1.0])
    gate = build_gate(GateConfig(type="uncertainty", gate_gamma=gamma, gate_min=0.05, gate_max=0.8))
    recorded = coarse.clone().requires_grad_(True)
    expected = gate(recorded, sam)
    assert expected.requires_grad
    with torch.inference_mode():
        served = gate(coarse, sam)
        fast = uncertainty(coarse, gamma)
    assert torch.equal(fast, uncertainty(recorded, gamma).detach())
    assert torch.equal(served, expected.detach())
    assert torch.equal(served, torch.clamp(1.0 - ((2.0 * coarse - 1.0).square() + 1e-12).pow(gamma / 2.0), 0.05, 0.8))
    with torch.inference_mode():
        blended = apply_gate(coarse, sam, served)
    assert torch.equal(blended, apply_gate(recorded, sam, expected).detach())
