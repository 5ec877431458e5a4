"""Text + modality conditioned diffusion model (MINIM-style): diffusers' ``UNet2DConditionModel`` denoising gray
images, or the latents of ``models.autoencoder`` (latent diffusion), conditioned on fused text + modality tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn

from core.config import ConfigMixin, resolve_preset
from models.autoencoder import AutoencoderConfig, LatentAutoencoder
from models.text_encoder import ConditionFusion

DEFAULT_MODALITIES = ("oct", "fundus", "chest_xray", "chest_ct", "brain_mri")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Text2ImageConfig(ConfigMixin):
    """Generator hyper-parameters. Field defaults are the pixel-space 32 x 32 model (the ``"pixel32"`` preset);
    the ``"default"`` preset is latent diffusion at 128 x 128.

    Attributes:
        image_size: square side S of generated images (divisible by the latent downsampling f times
            ``patch_size * 2 ** (levels - 1)``).
        patch_size: space-to-depth factor p of the UNet's input (1: plain pixels or latents).
        latent: None = diffusion on pixels; an ``AutoencoderConfig`` = diffusion on its latents
            ``(C, S/f, S/f)``, decoded to images by the autoencoder (held by the model).
        block_out_channels: UNet widths per resolution; the first level is a plain ``DownBlock2D``, the others
            ``CrossAttnDownBlock2D`` (mirrored on the way up).
        layers_per_block: ResNet layers per UNet block.
        attention_head_dim: width per attention head.
        norm_num_groups: GroupNorm groups (must divide every width).
        cross_attention_dim: width C of the fused text + modality context.
        text_dim: width of the text encoder's token features (384 for MiniLM-L6).
        max_text_tokens: text tokens per prompt (padded; longer prompts are rejected by the pipeline).
        modalities: the modality names, in embedding order.
        num_train_timesteps / beta_schedule: the diffusion noise schedule.
        prediction_type: what the UNet predicts (``PREDICTION_TYPES``).
    """

    image_size: int = 32
    patch_size: int = 2
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 64
    text_dim: int = 384
    max_text_tokens: int = 24
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    latent: AutoencoderConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.latent, dict):
            object.__setattr__(self, "latent", AutoencoderConfig.from_dict(self.latent))
        if self.latent is not None and not isinstance(self.latent, AutoencoderConfig):
            raise ValueError(f"Text2ImageConfig.latent must be None or an AutoencoderConfig, got {self.latent!r}")
        for name in ("block_out_channels", "modalities"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"Text2ImageConfig.{name} must be a non-empty list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("image_size", "patch_size", "layers_per_block", "attention_head_dim", "norm_num_groups",
                     "cross_attention_dim", "text_dim", "max_text_tokens", "num_train_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Text2ImageConfig.{name} must be a positive int, got {value!r}")
        if len(self.block_out_channels) < 2:
            raise ValueError(f"Text2ImageConfig.block_out_channels needs >= 2 levels, got {self.block_out_channels}")
        for width in self.block_out_channels:
            if width % self.norm_num_groups or width % self.attention_head_dim:
                raise ValueError(f"Text2ImageConfig.block_out_channels entry {width} must be divisible by "
                                 f"norm_num_groups ({self.norm_num_groups}) and attention_head_dim "
                                 f"({self.attention_head_dim})")
        factor = self.patch_size * 2 ** (len(self.block_out_channels) - 1)
        factor *= self.latent.downsample if self.latent is not None else 1
        if self.image_size % factor:
            raise ValueError(f"Text2ImageConfig.image_size ({self.image_size}) must be divisible by {factor}")
        if len(set(self.modalities)) != len(self.modalities) or not all(
            isinstance(m, str) and m for m in self.modalities
        ):
            raise ValueError(f"Text2ImageConfig.modalities must be distinct non-empty strings, got {self.modalities}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"Text2ImageConfig.beta_schedule = {self.beta_schedule!r}; expected one of "
                             f"{BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Text2ImageConfig.prediction_type = {self.prediction_type!r}; expected one of "
                             f"{PREDICTION_TYPES}")

    @property
    def null_modality(self) -> int:
        """Index of the learned "no modality" embedding row (classifier-free guidance): ``len(modalities)``."""
        return len(self.modalities)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the space the UNet denoises: ``(1, S, S)`` pixels or ``(C, S/f, S/f)`` latents."""
        if self.latent is None:
            return (1, self.image_size, self.image_size)
        side = self.image_size // self.latent.downsample
        return (self.latent.latent_channels, side, side)


TEXT2IMAGE_PRESETS: dict[str, Text2ImageConfig] = {
    # 128 x 128 latent diffusion: the UNet on 16 x 16 x 4 latents (about the cost of pixel32's 2 x 2 patches).
    "default": Text2ImageConfig(image_size=128, patch_size=1, latent=AutoencoderConfig()),
    # the earlier default: 32 x 32 pixels on 2 x 2 patches.
    "pixel32": Text2ImageConfig(),
    # diffusers-test-sized components: for unit tests only.
    "tiny": Text2ImageConfig(image_size=16, patch_size=1, block_out_channels=(4, 8), attention_head_dim=4,
                             norm_num_groups=2, cross_attention_dim=8, max_text_tokens=16),
    "tiny_latent": Text2ImageConfig(image_size=32, patch_size=1, block_out_channels=(4, 8), attention_head_dim=4,
                                    norm_num_groups=2, cross_attention_dim=8, max_text_tokens=16,
                                    latent=AutoencoderConfig(block_out_channels=(4, 8), latent_channels=2,
                                                             norm_num_groups=2)),
    # 64 x 64, wider, on 2 x 2 patches.
    "base64": Text2ImageConfig(image_size=64, block_out_channels=(64, 128, 128), attention_head_dim=16,
                               norm_num_groups=16, cross_attention_dim=128),
}


def modality_ids(config: Text2ImageConfig, modalities: list[str]) -> torch.Tensor:
    """Modality names -> ``(B,) int64`` indices into ``config.modalities`` (the model's embedding rows).

    Shared by :class:`Text2ImageModel` and the ONNX-backed denoiser of the service.

    Raises:
        ValueError: an unknown modality (named, with the known ones).
    """
    index = {m: i for i, m in enumerate(config.modalities)}
    unknown = [m for m in modalities if m not in index]
    if unknown:
        raise ValueError(f"modalities: unknown modality {unknown[0]!r}; expected one of {list(config.modalities)}")
    return torch.tensor([index[m] for m in modalities], dtype=torch.long)


class Text2ImageModel(nn.Module):
    """Denoiser ``f(x_t, t | text, modality)`` predicting ``config.prediction_type``.

    ``forward(noisy (B, *sample_shape) in model space, timesteps (B,) int64, text_hidden (B, T, D),
    text_mask (B, T), modality_ids (B,) int64 in [0, M], M = null) -> prediction (B, *sample_shape)``;
    model space is pixels ``2 x - 1`` in [-1, 1] or the autoencoder's scaled latents (:meth:`encode`,
    :meth:`decode`).
    """

    def __init__(self, config: Text2ImageConfig) -> None:
        super().__init__()
        self.config = config
        levels = len(config.block_out_channels)
        self.fusion = ConditionFusion(config.text_dim, config.cross_attention_dim, len(config.modalities))
        channels = config.sample_shape[0] * config.patch_size**2
        self.autoencoder = LatentAutoencoder(config.latent, config.image_size) if config.latent else None
        self.unet = UNet2DConditionModel(
            sample_size=config.sample_shape[-1] // config.patch_size,
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
            cross_attention_dim=config.cross_attention_dim,
            num_class_embeds=len(config.modalities) + 1,  # modality (+ null) added to the time embedding
        )

    @property
    def null_modality(self) -> int:
        return self.fusion.null_modality

    def modality_ids(self, modalities: list[str]) -> torch.Tensor:
        """Names -> ``(B,) int64`` indices. Raises ``ValueError`` naming the unknown modality and the known ones."""
        return modality_ids(self.config, modalities)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.config.sample_shape

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, S, S)`` in [0, 1] -> model space ``(B, *sample_shape)`` (pixels: ``2 x - 1``)."""
        if self.autoencoder is None:
            return images * 2.0 - 1.0
        return self.autoencoder.encode(images)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Model space ``(B, *sample_shape)`` -> ``images (B, 1, S, S)`` in [0, 1]."""
        if self.autoencoder is None:
            return ((samples + 1.0) * 0.5).clamp(0.0, 1.0)
        return self.autoencoder.decode(samples)

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        modality_ids: torch.Tensor,
    ) -> torch.Tensor:
        context, context_mask = self.fusion(text_hidden, text_mask, modality_ids)
        p = self.config.patch_size
        x = F.pixel_unshuffle(noisy, p) if p > 1 else noisy  # (B, p^2, S/p, S/p)
        eps = self.unet(x, timesteps, encoder_hidden_states=context, class_labels=modality_ids,
                        encoder_attention_mask=context_mask).sample
        return F.pixel_shuffle(eps, p) if p > 1 else eps


def build_text2image(name_or_config: str | Text2ImageConfig | dict[str, Any] = "default") -> Text2ImageModel:
    """Build from a preset name (``TEXT2IMAGE_PRESETS``), a config or a config dict."""
    config = resolve_preset(name_or_config, TEXT2IMAGE_PRESETS, Text2ImageConfig,
                            family="text2image", builder="build_text2image")
    return Text2ImageModel(config)


def _scheduler_kwargs(config: Text2ImageConfig) -> dict[str, Any]:
    # Pixels live in [-1, 1]; unit-variance latents are not bounded, so the sampler clips them only loosely.
    clip = 1.0 if config.latent is None else 4.0
    return {"num_train_timesteps": config.num_train_timesteps, "beta_schedule": config.beta_schedule,
            "prediction_type": config.prediction_type, "clip_sample": True, "clip_sample_range": clip}


def build_train_scheduler(config: Text2ImageConfig) -> DDPMScheduler:
    """The forward-noising schedule used in training (``add_noise``)."""
    return DDPMScheduler(**_scheduler_kwargs(config))


def build_sampler(config: Text2ImageConfig) -> DDIMScheduler:
    """A fresh DDIM sampler with the training betas (it holds per-call state: build one per generation)."""
    return DDIMScheduler(**_scheduler_kwargs(config), set_alpha_to_one=True)


__all__ = [
    "DEFAULT_MODALITIES",
    "TEXT2IMAGE_PRESETS",
    "Text2ImageConfig",
    "Text2ImageModel",
    "build_sampler",
    "build_text2image",
    "build_train_scheduler",
    "modality_ids",
]
