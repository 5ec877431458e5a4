"""Latent autoencoder for the text-to-image model: diffusers' ``AutoencoderKL`` on gray images, with the
latent scale (1 / std of the training latents, as Stable Diffusion's ``scaling_factor``) kept as a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import nn

from core.config import ConfigMixin


@dataclass(frozen=True)
class AutoencoderConfig(ConfigMixin):
    """``AutoencoderKL`` hyper-parameters; the image side comes from the generator's ``image_size``.

    Attributes:
        block_out_channels: widths per resolution; ``len - 1`` downsamplings (4 levels: 128 px -> 16 px).
        layers_per_block: ResNet layers per encoder block (the decoder has one more, as in diffusers).
        latent_channels: channels C of the latent.
        norm_num_groups: GroupNorm groups (must divide every width).
        mid_attention: self-attention in the middle blocks.
        kl_weight: weight of the KL term in :func:`autoencoder_loss`.
    """

    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_attention: bool = False
    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        value = self.block_out_channels
        if not isinstance(value, (list, tuple)) or len(value) < 1:
            raise ValueError(f"AutoencoderConfig.block_out_channels must be a non-empty list, got {value!r}")
        object.__setattr__(self, "block_out_channels", tuple(value))
        for name in ("layers_per_block", "latent_channels", "norm_num_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be a positive int, got {v!r}")
        for width in self.block_out_channels:
            if not isinstance(width, int) or width < 1 or width % self.norm_num_groups:
                raise ValueError(f"AutoencoderConfig.block_out_channels entry {width!r} must be a positive int "
                                 f"divisible by norm_num_groups ({self.norm_num_groups})")
        if not self.kl_weight >= 0:
            raise ValueError(f"AutoencoderConfig.kl_weight must be >= 0, got {self.kl_weight!r}")

    @property
    def downsample(self) -> int:
        """Image side / latent side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)


class LatentAutoencoder(nn.Module):
    """Gray images in [0, 1] <-> scaled latents.

    ``encode(images (B, 1, S, S) in [0, 1]) -> latents (B, C, S/f, S/f)`` (posterior mean x ``latent_scale``,
    ~unit variance once :meth:`set_scale` ran); ``decode(latents) -> images (B, 1, S, S)`` in [0, 1].
    """

    def __init__(self, config: AutoencoderConfig, image_size: int) -> None:
        super().__init__()
        if image_size % config.downsample:
            raise ValueError(f"image_size {image_size} must be divisible by the autoencoder's downsampling "
                             f"{config.downsample}")
        self.config, self.image_size = config, int(image_size)
        levels = len(config.block_out_channels)
        self.vae = AutoencoderKL(
            in_channels=1, out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
            sample_size=image_size, mid_block_add_attention=config.mid_attention,
        )
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.config.downsample
        return (self.config.latent_channels, side, side)

    def posterior(self, images: torch.Tensor):  # noqa: ANN201 (diffusers' DiagonalGaussianDistribution)
        return self.vae.encode(images * 2.0 - 1.0).latent_dist

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.posterior(images).mean * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(latents / self.latent_scale).sample
        return ((out + 1.0) * 0.5).clamp(0.0, 1.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder (what the service runs): scaled latents -> images in [0, 1]."""
        return self.decode(latents)

    @torch.no_grad()
    def set_scale(self, images: torch.Tensor, batch: int = 64) -> float:
        """Set ``latent_scale`` to 1 / std of the unscaled posterior means of ``images``; returns it."""
        means = torch.cat([self.posterior(images[i:i + batch]).mean for i in range(0, len(images), batch)])
        self.latent_scale.fill_(1.0 / float(means.std().clamp_min(1e-6)))
        return float(self.latent_scale)


def autoencoder_loss(model: LatentAutoencoder, images: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + MSE reconstruction of a posterior sample plus ``kl_weight`` x KL; ``images (B, 1, S, S)`` in [0, 1].

    Returns ``(loss, {"l1", "mse", "kl"})``.
    """
    posterior = model.posterior(images)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = (model.vae.decode(z).sample + 1.0) * 0.5
    l1 = (recon - images).abs().mean()
    mse = ((recon - images) ** 2).mean()
    kl = posterior.kl().mean()  # summed over the latent's elements, as diffusers' DiagonalGaussianDistribution
    loss = l1 + mse + model.config.kl_weight * kl
    return loss, {"l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}


__all__ = ["AutoencoderConfig", "LatentAutoencoder", "autoencoder_loss"]
