"""Scaling-law fits for sweeps: loss vs compute, IsoFLOP parabolas, Chinchilla's L(N, D).

Written here rather than taken from a package because none on PyPI fits these three forms the
way the literature does (Chinchilla Approach 2 and 3, Epoch AI's replication); the numerics are
scipy's (least_squares, L-BFGS-B).

- `fit_power_law`: L(C) = E + A * C^-alpha, least squares on log L.
- `fit_isoflop`: per compute budget a parabola in log N; its vertex is the compute-optimal N*
  (needs >= 3 sizes, and is biased when the sampled sizes are off-centre: report it next to the
  parametric fit); then N* = k * C^a across budgets.
- `fit_chinchilla`: L(N, D) = E + A/N^alpha + B/D^beta, Huber loss (delta 1e-3) on
  log L - logsumexp(log A - alpha log N, log B - beta log D, log E), L-BFGS-B from a grid of
  starting points (Hoffmann et al. 2022, Approach 3; Besiroglu et al. 2024).
Bootstrap confidence intervals resample runs with replacement and refit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize
from scipy.special import logsumexp, softmax


@dataclass
class Runs:
    params: np.ndarray  # N
    tokens: np.ndarray  # D (tokens or samples seen)
    compute: np.ndarray  # C in FLOPs
    loss: np.ndarray

    def __post_init__(self) -> None:
        for name in ("params", "tokens", "compute", "loss"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if not (len(self.params) == len(self.tokens) == len(self.compute) == len(self.loss)):
            raise ValueError("params, tokens, compute and loss must have one entry per run")
        if len(self.loss) == 0:
            raise ValueError("no runs to fit")
        if (self.params <= 0).any() or (self.tokens <= 0).any() or (self.compute <= 0).any() or (self.loss <= 0).any():
            raise ValueError("params, tokens, compute and loss must all be positive")

    def subset(self, index: np.ndarray) -> Runs:
        return Runs(self.params[index], self.tokens[index], self.compute[index], self.loss[index])

    def __len__(self) -> int:
        return len(self.loss)


@dataclass
class Fit:
    values: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap


# --- loss vs compute ------------------------------------------------------------------------
def _power_law(runs: Runs) -> dict[str, float]:
    scale = np.median(runs.compute)
    x, y = runs.compute / scale, np.log(runs.loss)

    def residual(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, e = theta
        return np.log(e + np.exp(log_a) * x**-alpha) - y

    start = [np.log(max(runs.loss.max() - runs.loss.min(), 1e-3)), 0.3, max(runs.loss.min() * 0.5, 1e-6)]
    result = optimize.least_squares(residual, start, bounds=([-50, 0, 0], [50, 5, runs.loss.min()]))
    log_a, alpha, e = result.x
    return {"E": float(e), "A": float(np.exp(log_a) * scale**alpha), "alpha": float(alpha)}


def fit_power_law(runs: Runs, bootstrap: int = 0, seed: int = 0) -> Fit:
    """L(C) = E + A C^-alpha over the compute frontier (the lowest loss at each budget)."""
    frontier = _frontier(runs)
    return _with_intervals(frontier, _power_law, bootstrap, seed)


def _frontier(runs: Runs) -> Runs:
    """The best run of each budget (budgets within 5% are one: whole steps round compute down)."""
    groups = isoflop_groups(runs)
    if len(groups) < 3:
        return runs  # too few budgets for a frontier: fit all runs
    return runs.subset(np.array([g[np.argmin(runs.loss[g])] for g in groups]))


# --- IsoFLOP parabolas ----------------------------------------------------------------------
def isoflop_groups(runs: Runs, rel_tol: float = 0.05) -> list[np.ndarray]:
    """Runs grouped by compute budget (budgets within `rel_tol` of each other are one group)."""
    order = np.argsort(runs.compute)
    groups: list[list[int]] = []
    for i in order:
        if groups and runs.compute[i] <= runs.compute[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def _isoflop(runs: Runs) -> dict[str, float]:
    optima_c, optima_n = [], []
    for group in isoflop_groups(runs):
        if len(np.unique(runs.params[group])) < 3:
            continue
        a, b, _ = np.polyfit(np.log10(runs.params[group]), runs.loss[group], 2)
        if a <= 0:
            continue  # no minimum inside: this budget's sizes do not bracket the optimum
        optima_c.append(float(np.mean(runs.compute[group])))
        optima_n.append(float(10 ** (-b / (2 * a))))
    if len(optima_c) < 2:
        raise ValueError("IsoFLOP fit needs >= 2 budgets with >= 3 model sizes that bracket a minimum")
    slope, intercept = np.polyfit(np.log10(optima_c), np.log10(optima_n), 1)
    return {"a": float(slope), "k": float(10**intercept), "budgets": float(len(optima_c))}


def fit_isoflop(runs: Runs, bootstrap: int = 0, seed: int = 0) -> tuple[Fit, list[dict[str, float]]]:
    """Exponent a and prefactor k of N* = k C^a, plus the per-budget optima."""
    per_budget = []
    for group in isoflop_groups(runs):
        if len(np.unique(runs.params[group])) >= 3:
            a, b, c = np.polyfit(np.log10(runs.params[group]), runs.loss[group], 2)
            if a > 0:
                log_n = -b / (2 * a)
                sizes = runs.params[group]
                per_budget.append({"compute": float(np.mean(runs.compute[group])), "optimal_params": float(10**log_n),
                                   "optimal_loss": float(c - b * b / (4 * a)),
                                   # a vertex outside the sampled sizes is an extrapolation: widen the ladder
                                   "inside_sampled_sizes": bool(sizes.min() <= 10**log_n <= sizes.max())})
    return _with_intervals(runs, _isoflop, bootstrap, seed, stratify=True), per_budget


# --- Chinchilla parametric fit --------------------------------------------------------------
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.5, 0.5), "beta": np.arange(0.0, 2.5, 0.5), "e": np.arange(-1.0, 1.5, 0.5),
    "a": np.arange(0.0, 30.0, 5.0), "b": np.arange(0.0, 30.0, 5.0),
}


def _chinchilla_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                          delta: float) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = logsumexp(terms, axis=0)
    r = predicted - log_l
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    d_r = np.where(small, r, delta * np.sign(r))
    weights = softmax(terms, axis=0)  # d logsumexp / d term
    grad = np.array([
        (d_r * weights[0]).sum(), (d_r * weights[1]).sum(), (d_r * weights[2]).sum(),
        -(d_r * weights[0] * log_n).sum(), -(d_r * weights[1] * log_d).sum(),
    ])  # fmt: skip
    return float(value), grad


def _chinchilla_from(runs: Runs, starts: list[np.ndarray], delta: float, keep: int = 0) -> dict[str, float]:
    """Best L-BFGS-B optimum over `starts`; with `keep`, only from the `keep` starts whose
    objective is lowest (evaluating a grid point costs microseconds, optimising from it ~10 ms)."""
    log_n, log_d, log_l = np.log(runs.params), np.log(runs.tokens), np.log(runs.loss)
    if keep and len(starts) > keep:
        scores = [_chinchilla_objective(s, log_n, log_d, log_l, delta)[0] for s in starts]
        starts = [starts[i] for i in np.argsort(scores)[:keep]]
    best = None
    for start in starts:
        # tight tolerances: the Huber objective is ~1e-3 at the optimum, and the default ones
        # stop a resample's fit where it started (bootstrap intervals would collapse)
        result = optimize.minimize(_chinchilla_objective, start, args=(log_n, log_d, log_l, delta), jac=True,
                                   method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000})
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta), "objective": float(best.fun)}


def fit_chinchilla(runs: Runs, bootstrap: int = 0, seed: int = 0, delta: float = 1e-3,
                   grid: dict[str, np.ndarray] | None = None, keep_starts: int = 64) -> Fit:
    grid = grid or CHINCHILLA_GRID
    starts = [np.array([a, b, e, alpha, beta]) for alpha, beta, e, a, b in
              itertools.product(grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"])]
    values = _chinchilla_from(runs, starts, delta, keep=keep_starts)
    fit = Fit(values)
    if bootstrap:
        floor = 1e-12  # a fitted E (or A, B) of ~0 would start the resamples at log(0)
        best_start = [np.array([np.log(max(values["A"], floor)), np.log(max(values["B"], floor)),
                                np.log(max(values["E"], floor)), values["alpha"], values["beta"]])]
        # each resample starts from the full-data optimum: the grid search is what makes fits
        # expensive, and the resampled optimum lies close to it
        fit.intervals = _bootstrap(runs, lambda r: _chinchilla_from(r, best_start, delta), bootstrap, seed)
    return fit


def compute_optimal(fit: dict[str, float], compute: float) -> dict[str, float]:
    """N*, D* minimising L(N, D) under C = 6 N D (closed form of the Chinchilla paper)."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    n = g * (compute / 6) ** (beta / (alpha + beta))
    return {"params": float(n), "tokens": float(compute / (6 * n))}


# --- bootstrap ------------------------------------------------------------------------------
def _bootstrap(runs: Runs, fitter, samples: int, seed: int, stratify: bool = False) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    groups = isoflop_groups(runs) if stratify else [np.arange(len(runs))]
    for _ in range(samples):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        try:
            values = fitter(runs.subset(index))
        except (ValueError, np.linalg.LinAlgError):
            continue  # a resample without a usable minimum: left out, as in the literature
        for key, value in values.items():
            draws.setdefault(key, []).append(value)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def _with_intervals(runs: Runs, fitter, bootstrap: int, seed: int, stratify: bool = False) -> Fit:
    fit = Fit(fitter(runs))
    if bootstrap:
        fit.intervals = _bootstrap(runs, fitter, bootstrap, seed, stratify)
    return fit
