"""TabDiff's stochastic sampler and guided imputation (papers.md section 7), as functions of a
trained `TabDiff` model.

One reverse step from t to s < t: "churn" raises the noise a little (numbers get extra Gaussian
noise, categories get re-masked) to t_hat, the denoiser predicts at t_hat, numbers take an Euler
step to s with a Heun (second-order) correction, and each masked value is unmasked with
probability (m(t_hat) - m(s)) / m(t_hat), drawn from the predicted class distribution.

Imputation runs the same chain with the known columns re-imposed after every step (forward-noised
to the chain's current level, so the network sees the kind of rows it was trained on; exact at the
end) and with classifier-free guidance on the unknown columns: D = (1 + w) D(x) - w D(x without the
known columns), where "without" uses the dropped-column tokens the model was trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scaleyard.models.tabdiff import TabDiff


@dataclass
class SamplerConfig:
    steps: int = 50
    churn: float = 1.0  # EDM's S_churn: per-step noise increase gamma = min(churn / steps, sqrt(2) - 1)
    heun: bool = True
    guidance: float = 0.6  # imputation only: w of classifier-free guidance
    batch_size: int = 4096


@dataclass
class Imputation:
    numerical: torch.Tensor  # [B, n_num] in data units; known columns exactly as given
    categorical: torch.Tensor  # [B, n_cat] class indices
    probabilities: torch.Tensor  # [B, n_cat, K_max]: class distribution each imputed value was drawn from


@torch.no_grad()
def sample(model: TabDiff, rows: int, cfg: SamplerConfig | None = None,
           generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` new rows: numbers in data units (clipped to the training range) and class indices."""
    cfg = cfg or SamplerConfig()
    nums, cats = [], []
    for start in range(0, rows, cfg.batch_size):
        count = min(cfg.batch_size, rows - start)
        x_num, x_cat, _ = _chain(model, count, cfg, generator, torch.device(device), known=None)
        nums.append(model.transform.inverse(x_num).cpu())  # the quantile tables live on the model's device
        cats.append(x_cat.cpu())
    return torch.cat(nums), torch.cat(cats)


@torch.no_grad()
def impute(model: TabDiff, numerical: torch.Tensor, categorical: torch.Tensor, known_num: torch.Tensor,
           known_cat: torch.Tensor, cfg: SamplerConfig | None = None, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> Imputation:
    """Fill the columns where `known_num` [n_num] / `known_cat` [n_cat] are False. `numerical`
    holds data units (anything finite in unknown columns); `categorical` class indices (anything
    valid in unknown columns)."""
    cfg = cfg or SamplerConfig()
    device = torch.device(device)
    known_num, known_cat = known_num.bool().to(device), known_cat.bool().to(device)
    nums, cats, probs = [], [], []
    for start in range(0, len(categorical), cfg.batch_size):
        stop = start + cfg.batch_size
        x_num0 = model.transform(numerical[start:stop].to(device))
        x_cat0 = categorical[start:stop].to(device)
        known = (x_num0, x_cat0, known_num, known_cat)
        x_num, x_cat, p = _chain(model, len(x_cat0), cfg, generator, device, known=known)
        values = model.transform.inverse(x_num).cpu()
        # known numbers come back exactly as given (the transform round trip is not bit-exact)
        values = torch.where(known_num.cpu(), numerical[start:stop].double(), values)
        nums.append(values)
        cats.append(x_cat.cpu())
        probs.append(p.cpu())
    return Imputation(torch.cat(nums), torch.cat(cats), torch.cat(probs))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _levels(model: TabDiff, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma [n_num], move chance [n_cat]) at scalar time t; a time < 0 stands for clean data."""
    t = t.reshape(1, 1)
    clean = bool(t < 0)
    sigma = t.new_zeros(model.num_numerical)
    move = t.new_zeros(model.n_cat)
    if model.num_numerical and not clean:
        sigma = model.num_schedule.sigma(t)[0]
    if model.n_cat and not clean:
        move = model.cat_schedule.move_chance(t)[0]
    return sigma, move


def _chain(model: TabDiff, rows: int, cfg: SamplerConfig, generator: torch.Generator | None,
           device: torch.device, known: tuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_num, n_cat = model.num_numerical, model.n_cat
    mask_index = torch.tensor(model.cfg.categories, dtype=torch.long, device=device)
    k_max = max(model.cfg.categories, default=1)
    times = torch.linspace(1.0, 0.0, cfg.steps, device=device)
    times = torch.cat([times, times.new_full((1,), -1.0)])  # the last step lands on clean data
    gamma = min(cfg.churn / cfg.steps, math.sqrt(2) - 1) if n_num else 0.0

    sigma_top, _ = _levels(model, times[0])
    x_num = _randn((rows, n_num), generator, device) * sigma_top
    x_cat = mask_index.expand(rows, n_cat).clone()
    probs = torch.zeros(rows, n_cat, k_max, device=device)
    dropped = None
    if known is not None:
        x_num0, x_cat0, known_num, known_cat = known
        x_num = torch.where(known_num, x_num0 + x_num, x_num)
        dropped = torch.cat([known_num, known_cat]).expand(rows, n_num + n_cat)

    for i in range(cfg.steps):
        t_cur, t_next = times[i], times[i + 1]
        sigma_cur, move_cur = _levels(model, t_cur)
        sigma_next, move_next = _levels(model, t_next)
        t_hat = t_cur
        if gamma > 0 and float(t_cur) > 0:
            # the largest t whose noise stays within every column's sigma * (1 + gamma)
            t_hat = model.num_schedule.time_of((sigma_cur * (1 + gamma))[None])[0].min().clamp(max=1.0)
            t_hat = torch.maximum(t_hat, t_cur)
        sigma_hat, move_hat = _levels(model, t_hat)

        x_num_hat = x_num + (sigma_hat**2 - sigma_cur**2).clamp_min(0).sqrt() * _randn(x_num.shape, generator, device)
        x_cat_hat = x_cat
        if n_cat:
            remask = (move_hat - move_cur).clamp_min(0) / (1 - move_cur)
            hit = (_rand(x_cat.shape, generator, device) < remask) & (x_cat != mask_index)
            x_cat_hat = torch.where(hit, mask_index.expand_as(x_cat), x_cat)

        denoised, logits = _guided(model, x_num_hat, x_cat_hat, t_hat, sigma_hat, dropped, cfg.guidance)
        slope = (x_num_hat - denoised) / sigma_hat.clamp_min(1e-12)
        x_num_next = x_num_hat + (sigma_next - sigma_hat) * slope

        x_cat_next = x_cat_hat
        if n_cat:
            p = torch.softmax(logits, dim=-1)
            still_masked = x_cat_hat == mask_index
            unmask = _rand(x_cat.shape, generator, device) < (move_hat - move_next) / move_hat
            draw = _categorical(p, generator)
            newly = still_masked & unmask
            x_cat_next = torch.where(newly, draw, x_cat_hat)
            recorded = newly if known is None else newly & ~known_cat
            probs = torch.where(recorded[..., None], p, probs)

        if cfg.heun and n_num and float(t_next) >= 0:
            # the correction re-evaluates at s with the categories as they now stand at s
            denoised2, _ = _guided(model, x_num_next, x_cat_next, t_next, sigma_next, dropped, cfg.guidance)
            slope2 = (x_num_next - denoised2) / sigma_next.clamp_min(1e-12)
            x_num_next = x_num_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope2)

        x_num, x_cat = x_num_next, x_cat_next
        if known is not None:
            x_num = torch.where(known_num, x_num0 + sigma_next * _randn(x_num.shape, generator, device), x_num)
            hide = _rand(x_cat.shape, generator, device) < move_next
            x_cat = torch.where(known_cat, torch.where(hide, mask_index.expand_as(x_cat0), x_cat0), x_cat)

    if n_cat and bool((x_cat == mask_index).any()):
        raise RuntimeError("sampler ended with masked values: the final step must unmask everything")
    return x_num, x_cat, probs


def _guided(model: TabDiff, x_num: torch.Tensor, x_cat: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor,
            dropped: torch.Tensor | None, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x_cat.shape[0]
    t_rows = t.reshape(1).expand(rows)
    sigma_rows = sigma[None].expand(rows, -1)
    denoised, _, logits = model.denoise(x_num, x_cat, t_rows, sigma_rows)
    if dropped is None or guidance == 0:
        return denoised, logits
    free_denoised, _, free_logits = model.denoise(x_num, x_cat, t_rows, sigma_rows, dropped=dropped)
    # only the unknown columns are guided (known ones are overwritten after the step anyway)
    unknown = ~dropped[0]
    n_num = model.num_numerical
    denoised = torch.where(unknown[:n_num], (1 + guidance) * denoised - guidance * free_denoised, denoised)
    guided_logits = (1 + guidance) * logits - guidance * free_logits
    logits = torch.where(unknown[n_num:, None], guided_logits, logits)
    return denoised, logits


def _categorical(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One class per [..., K] distribution (inverse-CDF sampling: one uniform per value)."""
    u = _rand(p.shape[:-1], generator, p.device)[..., None]
    cdf = p.cumsum(-1)
    # `<=` skips classes of probability 0 even when u is exactly 0
    return (cdf <= u * cdf[..., -1:]).sum(-1).clamp(max=p.shape[-1] - 1)
