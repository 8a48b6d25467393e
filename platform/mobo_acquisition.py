"""Which runs a multi-objective BO sweep proposes next: BoTorch models and acquisition functions,
in the unit cube, for objectives to MAXIMIZE (the sweep negates the ones to minimize).

The model is what the non-myopic MOBO paper uses (DESIGN.md seeds; ../shared/research/papers.md
section 8): one independent GP per objective (BoTorch `SingleTaskGP` in a `ModelListGP`, outcomes
standardized), and the current front is the box decomposition of the posterior MEAN at the
evaluated points (not of the noisy observations), which both EHVI terms below are measured from.

Acquisitions (`propose`):
- `random`: scrambled Sobol points (the baseline every other one must beat).
- `qlognehvi`: BoTorch's qLogNEHVI, myopic (the strongest stock baseline; q = the batch).
- `binom`, `joint`, `nested`: the paper's non-myopic acquisitions with horizon H (below).
BoTorch has no Joint/Nested/BINOM, so those three wrappers are written here, from the method as
the paper states it; everything under them (GPs, box decompositions, analytic EHVI, qEHVI's
inclusion-exclusion, fantasy conditioning, optimize_acqf) is BoTorch's.

The lookahead reward of H evaluations is their joint hypervolume improvement, which telescopes:
HVI({y1..yH} | P) = HVI(y1 | P) + HVI({y2..yH} | P + y1). The Bellman value of choosing x1 is
    V(x1) = EHVI(x1 | P) + E_{y1}[ max_{x2..xH} E[HVI({y2..yH} | P + y1) | D + (x1, y1)] ]
(for H > 2 the paper lower-bounds the inner adaptive policy by a batch of H-1 points, as here).
- Nested computes that lower bound as written: for each candidate x1 and each fantasy y1, an inner
  optimization over x2..xH of qEHVI under the model conditioned on (x1, y1), measured from the
  front P + y1; the best x1 is run.
- Joint swaps the max and the expectation (max_{x2..xH} E[...] <= E[max ...]: a lower bound on
  Nested) so that all H points are optimized together by one gradient-based search over
  (x1, ..., xH); x1 is run, x2..xH were only there to value it.
- BINOM optimizes myopic qEHVI with q = H and runs the one of the H points with the largest
  analytic EHVI: fast, approximate.
With H = 1 Joint and Nested are exactly analytic EHVI, and BINOM its maximizer found through qEHVI.
Fantasies: `fantasies=1` (default) conditions on the posterior mean at x1 (the deterministic
variant of the paper's experiments); `fantasies=F>1` averages over F quasi-random draws of y1.

A batch of n > 1 proposals (one round of the sweep) is built greedily for the non-myopic ones:
each chosen point is added to the model at its posterior mean ("Kriging believer"), which both
lowers the value of points near it and moves the front, and the next point is chosen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.acquisition.multi_objective.analytic import ExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.monte_carlo import qExpectedHypervolumeImprovement
from botorch.exceptions.warnings import BotorchWarning, NumericsWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf
from botorch.sampling.normal import SobolQMCNormalSampler
from botorch.sampling.qmc import NormalQMCEngine
from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning
from gpytorch.mlls import SumMarginalLogLikelihood
from torch import Tensor

ACQUISITIONS = ("random", "qlognehvi", "binom", "joint", "nested")
DTYPE = torch.double


@dataclass(frozen=True)
class Effort:
    """How hard each proposal searches. The defaults keep one proposal at a few seconds on a
    laptop core; the benchmark's --effort raises them."""

    restarts: int = 4  # multi-start L-BFGS runs of optimize_acqf
    raw_samples: int = 128  # random points the starts are picked from
    mc_samples: int = 32  # quasi-MC samples of the (q)EHVI terms
    maxiter: int = 40  # L-BFGS iterations (all starts are optimized together, as one batch)
    fantasies: int = 1  # 1: the posterior mean at x1 (deterministic); F > 1: F quasi-random draws
    nested_candidates: int = 4  # x1 values the nested inner optimization runs for

    def options(self) -> dict[str, int]:
        # the raw samples are valued in one batch: in chunks of `restarts` they took seconds
        return {"maxiter": self.maxiter, "batch_limit": max(self.restarts, 1), "init_batch_limit": self.raw_samples}


def _optimize(acq: AcquisitionFunction, d: int, q: int, effort: Effort, restarts: int | None = None,
              raw_samples: int | None = None, **kwargs) -> tuple[Tensor, Tensor]:
    """optimize_acqf over the unit cube. An L-BFGS start that ends ABNORMAL (a line search on the
    kinks of hypervolume) keeps its best point instead of starting over: the retry doubled the time."""
    return optimize_acqf(acq, _unit_bounds(d), q=q, num_restarts=restarts or effort.restarts,
                         raw_samples=raw_samples or effort.raw_samples, options=effort.options(),
                         retry_on_optimization_warning=False, **kwargs)


def _gp(x: Tensor, y: Tensor) -> ModelListGP:
    models = [SingleTaskGP(x, y[:, i : i + 1], outcome_transform=Standardize(m=1)) for i in range(y.shape[-1])]
    return ModelListGP(*models)


def fit_model(x: Tensor, y: Tensor) -> ModelListGP:
    """One GP per objective (independent outputs, as the paper's model)."""
    model = _gp(x, y)
    fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
    return model


def believe(model: ModelListGP, x: Tensor, y: Tensor, point: Tensor) -> tuple[ModelListGP, Tensor, Tensor]:
    """`model` (fitted to x, y) with `point` added at its posterior mean, hyperparameters and
    outcome scaling kept. (ModelListGP.condition_on_observations would add a batch dimension.)"""
    with torch.no_grad():
        mean = model.posterior(point.view(1, -1)).mean
    x, y = torch.cat([x, point.view(1, -1)]), torch.cat([y, mean])
    believed = _gp(x, y)
    believed.load_state_dict(model.state_dict())
    return believed, x, y


def mean_front(model: ModelListGP, x: Tensor, ref: Tensor) -> FastNondominatedPartitioning:
    """Box decomposition of the non-dominated region above `ref`, from the posterior mean at `x`."""
    with torch.no_grad():
        mean = model.posterior(x).mean
    return FastNondominatedPartitioning(ref_point=ref, Y=mean)


def _qehvi(model: ModelListGP, ref: Tensor, front: FastNondominatedPartitioning,
           mc_samples: int, seed: int) -> qExpectedHypervolumeImprovement:
    with warnings.catch_warnings():  # BoTorch suggests qLogEHVI; the paper's terms are plain EHVI
        warnings.simplefilter("ignore", NumericsWarning)
        return qExpectedHypervolumeImprovement(model, ref, front, sampler=_sampler(mc_samples, seed))


def _sampler(n: int, seed: int) -> SobolQMCNormalSampler:
    return SobolQMCNormalSampler(sample_shape=torch.Size([n]), seed=seed)


def _draws(model: ModelListGP, x1: Tensor, fantasies: int, seed: int) -> Tensor:
    """Fantasized observations at x1 (`b x 1 x d`) -> `F x b x 1 x m`: the posterior mean
    (F = 1) or F quasi-random draws including observation noise, reparameterized so that
    gradients reach x1 (BoTorch's `fantasize` detaches its draws)."""
    posterior = model.posterior(x1, observation_noise=fantasies > 1)
    if fantasies > 1:
        return _sampler(fantasies, seed)(posterior)
    return posterior.mean.unsqueeze(0)


def _condition(model: ModelListGP, x1: Tensor, y1: Tensor) -> ModelListGP:
    """The model with (x1, y1) added to its data (hyperparameters kept)."""
    return model.condition_on_observations(X=[x1] * y1.shape[-1], Y=y1)


class LookaheadValue:
    """E over fantasies y1 at x1 of qEHVI({x2..xH} | model + (x1, y1), front P + y1), computed
    with the telescoping identity HVI(Y2 | P + y1) = HVI({y1} + Y2 | P) - HVI(y1 | P), so that
    the front's update by y1 needs no new box decomposition and stays differentiable in x1.
    Hand-written (BoTorch has no lookahead hypervolume); the hypervolume of sample sets is
    qEHVI's own inclusion-exclusion (`_compute_qehvi`), applied to those sets.

    Joint calls this hundreds of times per proposal, so there the fantasy model's posterior at
    x2..xH comes from one joint posterior at (x1, x2..xH) per objective by Gaussian conditioning on
    y1 (with the GP's observation noise): exactly what BoTorch's condition_on_observations gives
    (tests check it), at a third of the time. Nested conditions through BoTorch (once per x1)."""

    def __init__(self, model: ModelListGP, ref: Tensor, front: FastNondominatedPartitioning, effort: Effort,
                 seed: int):
        self.model, self.effort, self.seed = model, effort, seed
        self.hvi = _qehvi(model, ref, front, effort.mc_samples, seed)  # only its HVI arithmetic is used
        self.sampler = _sampler(effort.mc_samples, seed + 1)
        self._base: dict[int, Tensor] = {}

    def _normals(self, q: int, m: int) -> Tensor:
        """Fixed quasi-random standard normals, `mc x q x m` (common random numbers across x)."""
        if q not in self._base:
            engine = NormalQMCEngine(d=q * m, seed=self.seed + 1)
            self._base[q] = engine.draw(self.effort.mc_samples, dtype=DTYPE).view(-1, q, m)
        return self._base[q]

    def fantasy_moments(self, x1: Tensor, x_rest: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per objective: y1 (`F x b`), and the mean (`F x b x q`) and covariance (`b x q x q`)
        at x2..xH of the model conditioned on (x1, y1)."""
        X = torch.cat([x1, x_rest], dim=-2)
        out = []
        for i, sub in enumerate(self.model.models):
            post = sub.posterior(X)
            mean, cov = post.mean[..., 0], post.distribution.covariance_matrix  # b x H, b x H x H
            noise = (sub.likelihood.noise * sub.outcome_transform.stdvs.pow(2)).view(-1)[0]
            var1 = cov[..., 0, 0] + noise  # the variance of an observation at x1
            gain = cov[..., 0, 1:] / var1.unsqueeze(-1)  # b x q
            if self.effort.fantasies > 1:
                z = NormalQMCEngine(d=1, seed=self.seed + 2 + i).draw(self.effort.fantasies, dtype=DTYPE)
                y1 = mean[..., 0] + var1.sqrt() * z.view(-1, 1)  # F x b
            else:
                y1 = mean[..., 0].unsqueeze(0)  # 1 x b (the posterior mean)
            mean_rest = mean[..., 1:] + gain * (y1 - mean[..., 0]).unsqueeze(-1)
            cov_rest = cov[..., 1:, 1:] - gain.unsqueeze(-1) * cov[..., 0, 1:].unsqueeze(-2)
            out.append((y1, mean_rest, cov_rest))
        return out

    def _fantasy_samples(self, x1: Tensor, x_rest: Tensor) -> tuple[Tensor, Tensor]:
        """(y1 `F x b x 1 x m`, samples of y2..yH under the model conditioned on (x1, y1):
        `mc x F x b x (H-1) x m`)."""
        q, moments = x_rest.shape[-2], self.fantasy_moments(x1, x_rest)
        y1s, rests = [], []
        for i, (y1, mean_rest, cov_rest) in enumerate(moments):
            # jittered: two lookahead points close together make the covariance singular
            jitter = 1e-9 * cov_rest.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-12)
            chol = torch.linalg.cholesky_ex(cov_rest + jitter * torch.eye(q, dtype=DTYPE))[0]
            z = self._normals(q, len(moments))[..., i]  # mc x q
            draws = (chol.unsqueeze(0) @ z.view(-1, 1, q, 1)).squeeze(-1)  # mc x b x q
            rests.append(mean_rest.unsqueeze(0) + draws.unsqueeze(1))  # mc x F x b x q
            y1s.append(y1)
        return torch.stack(y1s, dim=-1).unsqueeze(-2), torch.stack(rests, dim=-1)

    def __call__(self, x1: Tensor, x_rest: Tensor, fantasized: tuple[ModelListGP, Tensor] | None = None) -> Tensor:
        """`x1`: `b x 1 x d`; `x_rest`: `b x (H-1) x d` -> `F x b` (one value per fantasy).
        `fantasized`: one fantasy given as (conditioned model, y1 of shape `1 x 1 x m`), as the
        nested inner problem holds x1 and y1 fixed -> `b`."""
        if fantasized is None:
            y1, y_rest = self._fantasy_samples(x1, x_rest)
        else:
            model, y1 = fantasized
            y_rest = self.sampler(model.posterior(x_rest))  # mc x b x (H-1) x m
        y1_mc = y1.unsqueeze(0).expand(*y_rest.shape[:-2], 1, y1.shape[-1])
        together = self.hvi._compute_qehvi(torch.cat([y1_mc, y_rest], dim=-2))
        alone = self.hvi._compute_qehvi(y1.unsqueeze(0))
        return together - alone


class JointLookahead(AcquisitionFunction):
    """Joint: EHVI(x1 | P) + E_{y1}[qEHVI(x2..xH | model + (x1, y1), P + y1)] for a batch
    `b x H x d` (slot 0 is x1, the point to run). All H points are optimized together."""

    def __init__(self, model: ModelListGP, ref: Tensor, front: FastNondominatedPartitioning, effort: Effort,
                 seed: int):
        super().__init__(model=model)
        self.ehvi = ExpectedHypervolumeImprovement(model, ref.tolist(), front)
        self.lookahead = LookaheadValue(model, ref, front, effort, seed)

    def forward(self, X: Tensor) -> Tensor:
        first = self.ehvi(X[..., :1, :])
        if X.shape[-2] == 1:
            return first
        return first + self.lookahead(X[..., :1, :], X[..., 1:, :]).mean(dim=0)


class _NestedInner(AcquisitionFunction):
    """The inner problem of Nested for one x1 and one fantasy: x2..xH -> lookahead value."""

    def __init__(self, lookahead: LookaheadValue, x1: Tensor, fantasized: tuple[ModelListGP, Tensor]):
        super().__init__(model=fantasized[0])
        self.lookahead, self.x1, self.fantasized = lookahead, x1, fantasized

    def forward(self, X: Tensor) -> Tensor:
        return self.lookahead(self.x1.expand(X.shape[0], 1, -1), X, self.fantasized)


def nested_value(model: ModelListGP, ref: Tensor, front: FastNondominatedPartitioning, x1: Tensor, horizon: int,
                 effort: Effort, seed: int, warm: Tensor | None = None) -> float:
    """Nested at one x1 (`d`): EHVI(x1 | P) + mean over fantasies y1 of the best lookahead value
    over x2..xH (an inner optimize_acqf for each fantasy: the max sits inside the expectation, the
    adaptive policy). `warm` (`(H-1) x d`, e.g. Joint's partners of x1) is tried too, so Nested is
    at least Joint at that x1."""
    d = x1.shape[-1]
    x1 = x1.view(1, 1, d)
    with torch.no_grad():
        first = ExpectedHypervolumeImprovement(model, ref.tolist(), front)(x1).item()
        if horizon == 1:
            return first
        draws = _draws(model, x1, effort.fantasies, seed + 2)  # F x 1 x 1 x m
    lookahead = LookaheadValue(model, ref, front, effort, seed)
    best = []
    for y1 in draws:  # 1 x 1 x m each
        with torch.no_grad():
            inner = _NestedInner(lookahead, x1, (_condition(model, x1, y1), y1))
        _, value = _optimize(inner, d, horizon - 1, effort, max(effort.restarts // 2, 1),
                             max(effort.raw_samples // 2, 8))
        values = [float(value)]
        if warm is not None:
            with torch.no_grad():
                values.append(inner(warm.view(1, horizon - 1, d)).item())
        best.append(max(values))
    return first + sum(best) / len(best)


def _unit_bounds(d: int) -> Tensor:
    return torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])


def _one_point(model: ModelListGP, x: Tensor, ref: Tensor, acquisition: str, horizon: int, effort: Effort,
               seed: int) -> Tensor:
    """The next single point (`d`) of a non-myopic acquisition under `model` (fitted to `x`)."""
    d = x.shape[-1]
    front = mean_front(model, x, ref)
    if acquisition == "binom":
        batch, _ = _optimize(_qehvi(model, ref, front, effort.mc_samples, seed), d, horizon, effort)
        with torch.no_grad():
            single = ExpectedHypervolumeImprovement(model, ref.tolist(), front)(batch.unsqueeze(1))
        return batch[int(single.argmax())]
    joint = JointLookahead(model, ref, front, effort, seed)
    if acquisition == "joint":
        best, _ = _optimize(joint, d, horizon, effort)
        return best[0]
    # nested: the outer search is over a few x1 candidates (Joint's local optima, each with its
    # partners as a warm start for the inner problem); each is valued by its inner optimization
    starts, values = _optimize(joint, d, horizon, effort, return_best_only=False)
    order = torch.argsort(values.view(-1), descending=True)[: effort.nested_candidates]
    scored = []
    for i in order.tolist():
        x1, rest = starts[i, 0], starts[i, 1:]
        scored.append((nested_value(model, ref, front, x1, horizon, effort, seed, rest if horizon > 1 else None), i))
    return starts[max(scored)[1], 0]


def propose(x: Tensor, y: Tensor, ref: Tensor, n: int, acquisition: str, horizon: int = 2,
            effort: Effort | None = None, seed: int = 0,
            snap: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """`n` new points (`n x d` in the unit cube) given evaluated points `x` (`N x d`) and their
    objectives `y` (`N x m`, maximized), with hypervolume measured above `ref` (`m`). `snap` maps
    a point to the nearest one the search space can run (integers, choices); proposals never
    repeat an evaluated point or each other after snapping. Deterministic given `seed`.
    Runs on one thread: the matrices are tiny, and more threads only contend with the training
    runs sharing the machine (measured 3-5x slower with two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _propose(x, y, ref, n, acquisition, horizon, effort, seed, snap)
    finally:
        torch.set_num_threads(threads)


def _propose(x: Tensor, y: Tensor, ref: Tensor, n: int, acquisition: str, horizon: int, effort: Effort | None,
             seed: int, snap: Callable[[Tensor], Tensor] | None) -> Tensor:
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition {acquisition!r}: choose one of {', '.join(ACQUISITIONS)}")
    effort = effort or Effort()
    snap = snap or (lambda point: point)
    x, y, ref = x.to(DTYPE), y.to(DTYPE), ref.to(DTYPE)
    d = x.shape[-1]
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore", BotorchWarning)
        chosen: list[Tensor] = []
        if acquisition == "random" or x.shape[0] < 2:  # a GP needs two points
            return _fill(chosen, x, n, d, seed, snap)
        model = fit_model(x, y)
        if acquisition == "qlognehvi":
            acq = qLogNoisyExpectedHypervolumeImprovement(model, ref, x, sampler=_sampler(effort.mc_samples, seed),
                                                          prune_baseline=True)
            batch, _ = _optimize(acq, d, n, effort, sequential=True)
            for point in batch:
                _add_unique(chosen, snap(point), x)
            return _fill(chosen, x, n, d, seed, snap)
        seen, seen_y = x, y
        for k in range(n):
            point = snap(_one_point(model, seen, ref, acquisition, horizon, effort, seed + 7919 * k))
            if _add_unique(chosen, point, x) and k < n - 1:
                # Kriging believer: the next point of the round sees this one as observed at its mean
                model, seen, seen_y = believe(model, seen, seen_y, point)
        return _fill(chosen, x, n, d, seed, snap)


def _add_unique(chosen: list[Tensor], point: Tensor, x: Tensor) -> bool:
    known = torch.cat([x, *[c.view(1, -1) for c in chosen]]) if chosen else x
    if bool((known - point).abs().max(dim=-1).values.lt(1e-9).any()):
        return False
    chosen.append(point.detach())
    return True


def _fill(chosen: list[Tensor], x: Tensor, n: int, d: int, seed: int, snap: Callable[[Tensor], Tensor]) -> Tensor:
    """Top up with scrambled Sobol points (snapped, unseen) to `n` proposals: the initial design,
    `random`, and the rare round where snapping made two proposals one."""
    engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
    for _ in range(64 * n):
        if len(chosen) >= n:
            break
        _add_unique(chosen, snap(engine.draw(1, dtype=DTYPE)[0]), x)
    if len(chosen) < n:
        raise ValueError(f"the search space has fewer than {n} unseen points left; lower the budget")
    return torch.stack(chosen[:n])
