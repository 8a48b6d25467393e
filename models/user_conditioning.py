"""User conditioning for a trained diffusion transformer (PPD, Dang et al. 2025).

- `UserEncoder`: N preference pairs of one user, as frozen image features (preferred,
  dispreferred), -> a few user tokens. Pairs are encoded one by one and averaged, so the
  embedding does not depend on their order; the tokens come out of a LayerNorm so their scale is
  the same for every user (interpolating two users stays in range).
- `DecoupledAttention`: replaces a block's self-attention `attn` with
  `proj(Attn(Q, K, V) + Attn(Q, u W'_k, u W'_v))` (IP-Adapter's decoupled cross-attention): the
  query is the block's own, the user's keys and values are new. W'_v starts at zero, so the added
  term is exactly zero and the model is bitwise the base model at step 0; W'_k gets its gradient
  once W'_v has moved. (Zeroing both W'_v and an extra output projection would give both zero
  gradients for ever.)
- `UserConditionedDenoiser`: the base denoiser with every block's `attn` so replaced; a per-sample
  `keep` mask drops the user term (dropout of u, and the unconditioned model).

The base model's modules are not changed: only the block attributes are swapped, in this wrapper's
copy, and t2i never builds one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaleyard.models.transformer import Attention


@dataclass(frozen=True)
class UserEncoderConfig:
    feature_dim: int  # width of one image's frozen features
    width: int  # the denoiser's width: user tokens enter its attention directly
    tokens: int = 4
    hidden: int = 128


class UserEncoder(nn.Module):
    """features [B, N, 2, F] (preferred, dispreferred per pair) -> user tokens [B, tokens, width]."""

    def __init__(self, cfg: UserEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # a pair is (preferred, dispreferred, their difference): the difference is what says which way the user leans
        self.pair = nn.Sequential(nn.Linear(3 * cfg.feature_dim, cfg.hidden), nn.GELU(),
                                  nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.out = nn.Linear(cfg.hidden, cfg.tokens * cfg.width)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        win, lose = features[:, :, 0], features[:, :, 1]
        pairs = self.pair(torch.cat([win, lose, win - lose], dim=-1))
        tokens = self.out(pairs.mean(1)).unflatten(-1, (self.cfg.tokens, self.cfg.width))
        return self.norm(tokens)


class UserContext:
    """What the decoupled attentions read during one forward: the user tokens [B, T, d] and the
    per-sample keep mask [B]. Set by `UserConditionedDenoiser.forward` around the base call."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None


class DecoupledAttention(nn.Module):
    def __init__(self, base: Attention, context: UserContext):
        super().__init__()
        if base.cross:
            raise ValueError("DecoupledAttention wraps a self-attention")
        self.base = base
        dim = base.proj.in_features
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.to_v.weight)  # the added term is exactly 0 at step 0
        object.__setattr__(self, "context", context)  # shared, not a submodule

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base
        # the base attention's own computation, step by step as models/transformer.py does it, so
        # that without a user term the output is bitwise the base model's
        q, k, v = base.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (base.heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k = base.q_norm(q), base.k_norm(k)
        mask = context_mask[:, None, None, :] if context_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        user, keep = self.context.tokens, self.context.keep
        if user is not None:
            if user.shape[0] != x.shape[0]:  # classifier-free guidance batches [conditional, unconditional]
                repeats = x.shape[0] // user.shape[0]
                user, keep = user.repeat(repeats, 1, 1), keep.repeat(repeats)
            uk = self.to_k(user).unflatten(-1, (base.heads, -1)).transpose(1, 2)
            uv = self.to_v(user).unflatten(-1, (base.heads, -1)).transpose(1, 2)
            added = F.scaled_dot_product_attention(q, base.k_norm(uk), uv)
            out = out + added * keep.to(added.dtype)[:, None, None, None]
        return base.proj(out.transpose(1, 2).flatten(2))


def attention_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """Every transformer block of a DiT or U-ViT (the modules holding a self-attention `attn`)."""
    return [m for m in denoiser.modules() if isinstance(getattr(m, "attn", None), Attention)]


class UserConditionedDenoiser(nn.Module):
    """`denoiser(x_t, t, text, text_mask)` of models/diffusion/transformer.py, plus user tokens.

    Call `set_user(tokens, keep)` before the denoiser is run (e.g. by a sampler that only knows the
    four-argument signature) and `set_user(None)` after; `forward` takes them directly."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.context = UserContext()
        blocks = attention_blocks(denoiser)
        if not blocks:
            raise ValueError(f"{type(denoiser).__name__} has no blocks with a self-attention `attn` to condition")
        for block in blocks:
            block.attn = DecoupledAttention(block.attn, self.context)
        self.denoiser = denoiser

    def adapters(self) -> list[DecoupledAttention]:
        return [m for m in self.denoiser.modules() if isinstance(m, DecoupledAttention)]

    def set_user(self, tokens: torch.Tensor | None, keep: torch.Tensor | None = None) -> None:
        if tokens is not None and keep is None:
            keep = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        self.context.tokens, self.context.keep = tokens, keep

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                user: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        if user is None:
            return self.denoiser(x, t, text, text_mask)
        self.set_user(user, keep)
        try:
            return self.denoiser(x, t, text, text_mask)
        finally:
            self.set_user(None)


def base_state_dict_keys(wrapped_key: str) -> str:
    """The base model's name of a wrapped denoiser's parameter (`blocks.0.attn.base.qkv.weight` ->
    `blocks.0.attn.qkv.weight`); keys of the added weights come back unchanged."""
    return wrapped_key.replace(".attn.base.", ".attn.")
