"""TabDiff: one diffusion model over mixed-type table rows (papers.md section 7).

Numerical columns diffuse with Gaussian noise (per-column power-mean schedules, EDM
preconditioning and loss); categorical columns diffuse by masking (per-column polynomial
schedules, MDLM absorbing-state ELBO). One t ~ U(0, 1) per row drives both. The denoiser is a
column tokenizer -> transformer -> MLP with a time embedding -> transformer -> per-column heads.

The model also owns the fitted numerical preprocessing (a quantile transform to N(0, 1), stored in
buffers), so a checkpoint alone maps generated values back to the data's units. Sampling and
imputation live in `tabdiff_sampling.py`. Single-device code: no distributed or job imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaleyard.models.meta import shapes_only
from scaleyard.models.tabdiff_schedules import CategoricalSchedule, NumericalSchedule
from scaleyard.models.transformer import Attention, TimestepEmbedding

SCHEDULES = ("learnable", "fixed")
NEG_INF = -1e9  # logit of classes a column does not have (finite: no NaN from inf - inf)


@dataclass
class TabDiffConfig:
    num_numerical: int = 0
    categories: tuple[int, ...] = ()  # number of classes of each categorical column (without [MASK])
    d_token: int = 4
    layers: int = 2  # transformer blocks before and after the MLP
    heads: int = 1
    ffn_factor: int = 32
    dim_t: int = 512  # width of the MLP and of the time embedding
    schedule: str = "learnable"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    eps_max: float = 1e-3
    eps_min: float = 1e-5
    column_dropout: float = 0.1  # share of rows whose columns are partly dropped: the guidance branch
    quantiles: int = 1000
    # Deviations from the reference denoiser (MinkaiXu/TabDiff UniModMLP), off by default (issue #17):
    mid_residual: bool = False  # tokens + MLP(...) around the middle MLP (reference: MLP output alone)
    extra_norms: bool = False  # LayerNorm before the first block's attention and before the heads
    mid_input_silu: bool = False  # SiLU on proj(x) + time before the MLP's first linear layer

    def __post_init__(self) -> None:
        self.categories = tuple(int(k) for k in self.categories)
        if self.num_numerical < 0 or any(k < 1 for k in self.categories):
            raise ValueError(f"bad table shape: {self.num_numerical} numerical columns, categories {self.categories}")
        if self.num_numerical + len(self.categories) == 0:
            raise ValueError("a table needs at least one numerical or categorical column")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.d_token % self.heads:
            raise ValueError(f"d_token {self.d_token} is not divisible by heads {self.heads}")

    @property
    def columns(self) -> int:
        return self.num_numerical + len(self.categories)


class QuantileTransform(nn.Module):
    """Per-column quantile transform to a standard normal (as scikit-learn's, output_distribution
    'normal'), fitted once on the training split. Its inverse clips to the training range and
    rounds columns that only held integers."""

    BOUND = 1e-7  # u is kept in [BOUND, 1 - BOUND]: the normal quantile stays within +-5.2

    def __init__(self, columns: int, quantiles: int):
        super().__init__()
        self.columns = columns
        self.register_buffer("quantiles", torch.zeros(columns, quantiles, dtype=torch.float64))
        self.register_buffer("references", torch.linspace(0, 1, quantiles, dtype=torch.float64))
        self.register_buffer("integer", torch.zeros(columns, dtype=torch.bool))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, values: np.ndarray | torch.Tensor) -> None:
        self.fitted.fill_(True)
        if self.columns == 0:
            return
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.columns or len(values) == 0:
            raise ValueError(f"expected training values of shape [rows, {self.columns}], got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("the training split's numerical columns hold NaN or inf values")
        # always the configured number of quantiles (interpolated on small tables), so a fresh model
        # built from the config loads any checkpoint's buffers
        table = np.quantile(values, self.references.numpy(), axis=0).T
        table = np.maximum.accumulate(table, axis=1)  # exact monotonicity despite rounding
        self.quantiles.copy_(torch.from_numpy(np.ascontiguousarray(table)))
        self.integer.copy_(torch.from_numpy(np.all(values == np.round(values), axis=0)))

    def _check(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("QuantileTransform used before fit(): call model.fit_preprocessing(train_values)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw values [B, C] -> N(0, 1) scores [B, C] (float32)."""
        self._check()
        if x.shape[1] == 0:
            return x.float()
        q, refs = self.quantiles, self.references.expand_as(self.quantiles)
        values = x.double().T.contiguous()
        # Averaging the left- and right-continuous interpolation maps a value that fills many
        # quantiles (capital-gain = 0) to the middle of its block instead of one end.
        u = 0.5 * (_interp(values, q, refs, right=True) + _interp(values, q, refs, right=False))
        u = u.clamp(self.BOUND, 1 - self.BOUND)
        return torch.special.ndtri(u).T.float()

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        self._check()
        if z.shape[1] == 0:
            return z.double()
        q, refs = self.quantiles, self.references.expand_as(self.quantiles).contiguous()
        u = torch.special.ndtr(z.double().T.contiguous())
        # scores at the clip bounds (the training min and max, and anything beyond) map back to
        # the ends exactly, not to a hair inside them
        u = torch.where(u < 2 * self.BOUND, 0.0, torch.where(u > 1 - 2 * self.BOUND, 1.0, u))
        x = _interp(u, refs, q, right=True).T
        x = torch.minimum(torch.maximum(x, q[:, 0]), q[:, -1])  # the training range
        return torch.where(self.integer, torch.round(x), x)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, right: bool) -> torch.Tensor:
    """Row-wise piecewise-linear interpolation: x [C, B], xp/fp [C, Q] with xp non-decreasing.
    Outside xp the ends are held; in a flat run of xp, `right` picks its last (else first) fp."""
    count = xp.shape[1]
    idx = torch.searchsorted(xp, x, right=right).clamp(1, count - 1)
    x0, x1 = xp.gather(1, idx - 1), xp.gather(1, idx)
    f0, f1 = fp.gather(1, idx - 1), fp.gather(1, idx)
    gap = x1 - x0
    w = torch.where(gap > 0, (x - x0) / torch.where(gap > 0, gap, 1.0), torch.ones_like(x) * float(not right))
    w = w.clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


class ColumnTokenizer(nn.Module):
    """One d_token vector per column: numerical values scale a learned direction (plus bias);
    categorical values index an embedding table with one extra [MASK] row per column. A learned
    per-column "dropped" token replaces a column entirely (the unconditional branch of guidance).
    Token order: numerical columns, then categorical columns."""

    def __init__(self, num_numerical: int, categories: tuple[int, ...], d_token: int):
        super().__init__()
        self.num_numerical, self.n_cat = num_numerical, len(categories)
        bound = 1 / math.sqrt(d_token)
        if num_numerical:
            self.num_weight = nn.Parameter(torch.empty(num_numerical, d_token).uniform_(-bound, bound))
            self.num_bias = nn.Parameter(torch.empty(num_numerical, d_token).uniform_(-bound, bound))
        if categories:
            with_mask = [k + 1 for k in categories]
            offsets = torch.tensor([0, *np.cumsum(with_mask)[:-1].tolist()], dtype=torch.long)
            self.register_buffer("offsets", offsets, persistent=False)
            self.register_buffer("mask_index", torch.tensor(categories, dtype=torch.long), persistent=False)
            self.cat_embedding = nn.Parameter(torch.empty(sum(with_mask), d_token).uniform_(-bound, bound))
            self.cat_bias = nn.Parameter(torch.empty(self.n_cat, d_token).uniform_(-bound, bound))
        self.dropped_token = nn.Parameter(torch.empty(num_numerical + self.n_cat, d_token).uniform_(-bound, bound))

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor, mask_weight: torch.Tensor | None = None,
                dropped: torch.Tensor | None = None) -> torch.Tensor:
        """x_num [B, n_num] (already scaled); x_cat [B, n_cat] class or [MASK] indices. With
        `mask_weight` [B, n_cat] (training), x_cat holds clean classes and each token is the blend
        (1 - m) e(class) + m e([MASK]): m is 0/1 in value but carries the masking probability's
        gradient (straight-through), which is how a learnable masking schedule gets its signal."""
        tokens = []
        if self.num_numerical:
            tokens.append(x_num[..., None] * self.num_weight + self.num_bias)
        if self.n_cat:
            emb = F.embedding(x_cat + self.offsets, self.cat_embedding)
            if mask_weight is not None:
                masked = self.cat_embedding[self.mask_index + self.offsets]
                emb = emb + mask_weight[..., None] * (masked - emb)
            tokens.append(emb + self.cat_bias)
        x = torch.cat(tokens, dim=1)
        if dropped is not None:
            x = torch.where(dropped[..., None], self.dropped_token.to(x.dtype), x)
        return x


class Block(nn.Module):
    """Pre-norm transformer block over the column tokens. Without `attn_norm` the attention sees
    its input as is (the reference's first block: its tokens come straight from the tokenizer)."""

    def __init__(self, dim: int, heads: int, ffn_factor: int, attn_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if attn_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=False)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * ffn_factor), nn.ReLU(), nn.Linear(dim * ffn_factor, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Denoiser(nn.Module):
    """(scaled noisy numbers, partly masked categories, t) -> (F for the numerical columns,
    logits [B, n_cat, K_max] for the categorical columns; classes a column lacks get NEG_INF)."""

    def __init__(self, cfg: TabDiffConfig):
        super().__init__()
        d, width, n = cfg.d_token, cfg.dim_t, cfg.columns
        self.num_numerical, self.categories = cfg.num_numerical, cfg.categories
        self.tokenizer = ColumnTokenizer(cfg.num_numerical, cfg.categories, d)
        # the reference's Transformer has no norm0 in its first layer (in encoder and decoder alike)
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cfg.ffn_factor, attn_norm=i > 0 or cfg.extra_norms)
                                     for i in range(cfg.layers))
        self.proj = nn.Linear(n * d, width)
        self.time = TimestepEmbedding(width)
        self.mid_residual = cfg.mid_residual
        self.mlp = nn.Sequential(
            nn.SiLU() if cfg.mid_input_silu else nn.Identity(), nn.Linear(width, 2 * width), nn.SiLU(),
            nn.Linear(2 * width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, n * d),
        )  # fmt: skip
        self.decoder = nn.ModuleList(Block(d, cfg.heads, cfg.ffn_factor, attn_norm=i > 0 or cfg.extra_norms)
                                     for i in range(cfg.layers))
        self.norm = nn.LayerNorm(d) if cfg.extra_norms else nn.Identity()
        bound = 1 / math.sqrt(d)
        if cfg.num_numerical:
            self.num_head = nn.Parameter(torch.empty(cfg.num_numerical, d).uniform_(-bound, bound))
            self.num_head_bias = nn.Parameter(torch.zeros(cfg.num_numerical))
        if cfg.categories:
            k_max = max(cfg.categories)
            self.cat_head = nn.Parameter(torch.empty(len(cfg.categories), d, k_max).uniform_(-bound, bound))
            self.cat_head_bias = nn.Parameter(torch.zeros(len(cfg.categories), k_max))
            valid = torch.arange(k_max)[None] < torch.tensor(cfg.categories)[:, None]
            self.register_buffer("valid", valid, persistent=False)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor, t: torch.Tensor,
                mask_weight: torch.Tensor | None = None,
                dropped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tokenizer(x_num, x_cat, mask_weight, dropped)
        for block in self.encoder:
            h = block(h)
        z = self.proj(h.flatten(1)) + self.time(t)
        # with mid_residual the skip keeps each column's token in reach of its head
        h = h + self.mlp(z).view_as(h) if self.mid_residual else self.mlp(z).view_as(h)
        for block in self.decoder:
            h = block(h)
        h = self.norm(h)
        batch = h.shape[0]
        f_num = h.new_zeros(batch, 0)
        logits = h.new_zeros(batch, 0, 1)
        if self.num_numerical:
            f_num = (h[:, : self.num_numerical] * self.num_head).sum(-1) + self.num_head_bias
        if self.categories:
            logits = torch.einsum("bcd,cdk->bck", h[:, self.num_numerical:], self.cat_head) + self.cat_head_bias
            logits = logits.masked_fill(~self.valid, NEG_INF)
        return f_num, logits


class TabDiff(nn.Module):
    """Denoiser + noise schedules + fitted preprocessing. `forward` is the training loss."""

    def __init__(self, cfg: TabDiffConfig):
        super().__init__()
        self.cfg = cfg
        learnable = cfg.schedule == "learnable"
        self.denoiser = Denoiser(cfg)
        self.num_schedule = (NumericalSchedule(cfg.num_numerical, learnable, cfg.sigma_min, cfg.sigma_max)
                             if cfg.num_numerical else None)
        self.cat_schedule = (CategoricalSchedule(len(cfg.categories), learnable, cfg.eps_max, cfg.eps_min)
                             if cfg.categories else None)
        self.transform = QuantileTransform(cfg.num_numerical, cfg.quantiles)

    @property
    def num_numerical(self) -> int:
        return self.cfg.num_numerical

    @property
    def n_cat(self) -> int:
        return len(self.cfg.categories)

    def fit_preprocessing(self, numerical: np.ndarray | torch.Tensor,
                          categorical: np.ndarray | torch.Tensor | None = None) -> None:
        """Fit the numerical transform on the training rows and, given the training classes, start
        each categorical head at the log class frequencies: the all-masked prediction is then the
        marginal from step 0 instead of after the thousands of Adam steps (~lr each) that biases
        need to reach logits of +-10."""
        self.transform.fit(numerical)
        if categorical is None or not self.n_cat:
            return
        classes = torch.as_tensor(np.asarray(categorical), dtype=torch.long)
        with torch.no_grad():
            for j, count in enumerate(self.cfg.categories):
                freq = torch.bincount(classes[:, j], minlength=count).double() / max(len(classes), 1)
                self.denoiser.cat_head_bias[j, :count] = freq.clamp_min(1e-6).log().float()

    def denoise(self, x_num: torch.Tensor, x_cat: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor,
                mask_weight: torch.Tensor | None = None,
                dropped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EDM-preconditioned call (sigma_data = 1): returns (D(x) the denoised numbers, the raw
        network output F, category logits). t [B]; sigma [B, n_num]."""
        c_in = torch.rsqrt(sigma**2 + 1)
        f_num, logits = self.denoiser(x_num * c_in, x_cat, t, mask_weight, dropped)
        f_num = f_num.float()
        denoised = x_num / (sigma**2 + 1) + sigma * c_in * f_num  # c_skip x + c_out F
        return denoised, f_num, logits.float()

    def forward(self, x_num_raw: torch.Tensor, x_cat: torch.Tensor,
                num_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of a batch of raw rows: numbers in data units [B, n_num], class indices
        [B, n_cat]. Randomness comes from the global torch RNG (saved in checkpoints)."""
        batch, device = x_num_raw.shape[0], x_num_raw.device
        x_num = self.transform(x_num_raw).to(device)
        # stratified t: one uniform offset, rows spread evenly over [0, 1) (lower-variance ELBO, as MDLM)
        t = (torch.rand(1, device=device) + torch.arange(batch, device=device) / batch) % 1.0
        t = t[:, None]
        dropped = self._dropped_columns(batch, device)
        keep = (~dropped).float()

        sigma = x_num.new_zeros(batch, 0)
        eps = torch.randn_like(x_num)
        x_num_t = x_num
        if self.num_numerical:
            sigma = self.num_schedule.sigma(t)
            x_num_t = x_num + sigma * eps
        mask_weight, masked = None, None
        if self.n_cat:
            move = self.cat_schedule.move_chance(t).expand(batch, self.n_cat)
            masked = (torch.rand(batch, self.n_cat, device=device) < move).float()
            mask_weight = masked + move - move.detach() if self.cat_schedule.learnable else masked

        _, f_num, logits = self.denoise(x_num_t, x_cat, t[:, 0], sigma, mask_weight, dropped)

        metrics: dict[str, torch.Tensor] = {}
        loss = x_num.new_zeros(())
        if self.num_numerical:
            # EDM loss (sigma^2 + 1)/sigma^2 |D - x0|^2 written in F-space, where it equals
            # |F - (sigma x0 - eps)/sqrt(sigma^2 + 1)|^2 exactly: no 1/sigma^2 factor to overflow.
            target = (sigma * x_num - eps) * torch.rsqrt(sigma**2 + 1)
            num_loss = ((f_num - target) ** 2 * keep[:, : self.num_numerical]).mean()
            loss = loss + num_weight * num_loss
            metrics["loss_num"] = num_loss.detach()
        if self.n_cat:
            log_p = F.log_softmax(logits, dim=-1).gather(-1, x_cat[..., None])[..., 0]
            weight = self.cat_schedule.elbo_weight(t)
            # Only masked values carry loss: unmasked ones are copied through (MDLM's SUBS).
            cat_loss = (-weight * log_p * masked * keep[:, self.num_numerical:]).mean()
            loss = loss + cat_loss
            metrics["loss_cat"] = cat_loss.detach()
        return loss, metrics

    def _dropped_columns(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training rows whose columns are partly replaced by the dropped token (each column with a
        per-row probability q ~ U(0, 1)), so that any subset of known columns can be dropped at
        imputation time for classifier-free guidance."""
        columns = self.cfg.columns
        rows = torch.rand(batch, 1, device=device) < self.cfg.column_dropout
        share = torch.rand(batch, 1, device=device)
        return rows & (torch.rand(batch, columns, device=device) < share)


def count_parameters(cfg: TabDiffConfig) -> int:
    with shapes_only():
        model = TabDiff(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(cfg: TabDiffConfig) -> float:
    """Model FLOPs of one training row (forward + backward = 3 x forward, 2 FLOPs per MAC)."""
    n, d, width = cfg.columns, cfg.d_token, cfg.dim_t
    # per token and block: qkv + output projection, the two FFN matmuls, attention scores and values
    block = 4 * d * d + 2 * d * d * cfg.ffn_factor + 2 * n * d
    blocks = 2 * cfg.layers * n * block
    mlp = n * d * width + 8 * width * width + width * n * d
    time = 256 * width + width * width
    heads = cfg.num_numerical * d + len(cfg.categories) * d * max(cfg.categories, default=0)
    return 3.0 * 2.0 * (blocks + mlp + time + heads)
