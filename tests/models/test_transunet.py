import json

import pytest
import torch
import torch.nn.functional as F

from models.transunet import TRANSUNET_PRESETS, TransUNetConfig, build_transunet, num_parameters


def _disk_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) * size * 0.5 + size * 0.25).tolist()
        r = float(torch.rand(1, generator=g) * size * 0.1 + size * 0.1)
        mask = (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()
        image = 0.3 + 0.4 * mask + 0.05 * torch.randn(size, size, generator=g)
        images.append(image.clamp(0, 1))
        masks.append(mask)
    return torch.stack(images)[:, None], torch.stack(masks)[:, None]


def test_default_shapes_and_size():
    torch.manual_seed(0)
    model = build_transunet("default")
    n = num_parameters(model)
    assert 300_000 < n < 2_000_000, n
    x = torch.rand(2, 1, 128, 128)
    y = model(x)
    assert y.shape == (2, 1, 128, 128)
    assert torch.isfinite(y).all()


def test_default_trains_on_synthetic_disks():
    torch.manual_seed(0)
    model = build_transunet("default")
    images, masks = _disk_batch(4, 128, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(images), masks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_r50_vit_b16_matches_official_layout():
    torch.manual_seed(0)
    model = build_transunet("r50-vit-b16")
    # official TransUNet R50-ViT-B/16 has 105.28 M parameters (its 2-class head has 145 more than our 1-class head)
    assert num_parameters(model) == 105_275_921
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "transformer.embeddings.hybrid_model.root.conv.weight": (64, 3, 7, 7),
        "transformer.embeddings.hybrid_model.body.block1.unit1.downsample.weight": (256, 64, 1, 1),
        "transformer.embeddings.hybrid_model.body.block1.unit1.gn_proj.weight": (256,),
        "transformer.embeddings.hybrid_model.body.block3.unit9.conv3.weight": (1024, 256, 1, 1),
        "transformer.embeddings.patch_embeddings.weight": (768, 1024, 1, 1),
        "transformer.embeddings.position_embeddings": (1, 196, 768),
        "transformer.encoder.layer.11.attn.query.weight": (768, 768),
        "transformer.encoder.layer.0.ffn.fc1.weight": (3072, 768),
        "transformer.encoder.layer.0.attention_norm.weight": (768,),
        "transformer.encoder.encoder_norm.bias": (768,),
        "decoder.conv_more.0.weight": (512, 768, 3, 3),
        "decoder.conv_more.1.running_var": (512,),
        "decoder.blocks.0.conv1.0.weight": (256, 1024, 3, 3),
        "decoder.blocks.2.conv1.0.weight": (64, 192, 3, 3),
        "decoder.blocks.3.conv2.1.weight": (16,),
        "segmentation_head.0.weight": (1, 16, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, (key, shapes.get(key))
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 224, 224))
    assert y.shape == (1, 1, 224, 224)
    assert torch.isfinite(y).all()


def test_rejects_wrong_input():
    model = build_transunet("default")
    with pytest.raises(ValueError, match=r"\(B, 1, 128, 128\)"):
        model(torch.rand(1, 1, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, 1, 128, 128\)"):
        model(torch.rand(1, 3, 128, 128))


def test_config_round_trip_and_validation():
    for config in TRANSUNET_PRESETS.values():
        data = json.loads(json.dumps(config.to_dict()))
        assert TransUNetConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="img_size"):
        TransUNetConfig(img_size=100)
    with pytest.raises(ValueError, match="num_heads"):
        TransUNetConfig(hidden_size=130, num_heads=4)
    with pytest.raises(ValueError, match="bogus"):
        TransUNetConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="decoder_channels"):
        TransUNetConfig.from_dict({"decoder_channels": 16})
    with pytest.raises(ValueError, match="unknown TransUNet preset"):
        build_transunet("r101")
