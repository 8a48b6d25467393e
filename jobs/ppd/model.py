"""The PPD network as one trainable module: the base t2i model (text encoder + denoiser) with
decoupled user attention in every block (models/user_conditioning.py) and the user encoder.

One forward returns the per-sample flow-matching errors of a batch, so DDP and ZeRO see every
trainable call. By default only the added weights train (the user encoder and each block's
W'_k, W'_v); `lora_rank > 0` adds LoRA adapters (peft, zero-initialised) to the base denoiser's
attention and MLP projections, and `train_base` trains all base weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaleyard.jobs.t2i.job import TextToImage
from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import DiffusionTransformerConfig
from scaleyard.models.text_encoder import TextEncoderConfig
from scaleyard.models.user_conditioning import UserConditionedDenoiser, UserEncoder, UserEncoderConfig


@dataclass(frozen=True)
class PPDShape:
    """Everything needed to rebuild the network without the base run (saved in the job state)."""

    denoiser: DiffusionTransformerConfig
    text: TextEncoderConfig
    encoder: UserEncoderConfig
    process: str


class PersonalizedT2I(nn.Module):
    def __init__(self, shape: PPDShape, base: TextToImage | None = None, train_base: bool = False,
                 lora_rank: int = 0, lora_alpha: float = 16.0):
        super().__init__()
        self.shape = shape
        base = base if base is not None else TextToImage(shape.denoiser, shape.text)
        self.text_cfg = shape.text
        self.text = base.text
        self.denoiser = UserConditionedDenoiser(base.denoiser)
        self.user_encoder = UserEncoder(shape.encoder)
        if lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            # the base's own projections (qkv, attention output, MLP), not the added W'_k / W'_v
            targets = r".*(attn\.base\.(qkv|proj)|mlp\.fc1|mlp\.fc2)"
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                               target_modules=targets), self.denoiser)
        # set after peft, which marks everything but its own adapters as frozen
        self.text.requires_grad_(train_base)
        for name, param in self.denoiser.named_parameters():
            param.requires_grad_(train_base or "lora_" in name or ".to_k." in name or ".to_v." in name)

    def encode(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        from scaleyard.models.text_encoder import tokenize

        ids, mask = tokenize(captions, self.text_cfg)
        ids, mask = ids.to(device), mask.to(device)
        return self.text(ids, mask), mask

    def forward(self, images: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor,
                features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Per-sample errors [B] of images [B] whose users' pairs have `features` [B', N, 2, F];
        B = r * B' (preferred and dispreferred of one example share its user)."""
        user = self.user_encoder(features)
        repeats = images.shape[0] // user.shape[0]
        user, keep = user.repeat(repeats, 1, 1), keep.repeat(repeats)
        tokens, mask = self.encode(captions, images.device)
        self.denoiser.set_user(user, keep)
        try:
            return flow.training_loss(self.denoiser, images, tokens, mask, t, noise, self.shape.process)
        finally:
            self.denoiser.set_user(None)
