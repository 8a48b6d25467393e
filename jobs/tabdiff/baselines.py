"""Two reference generators for the TabDiff report (issue #7, part 3): independent empirical marginals
and a Gaussian copula over empirical marginals.

Both only ever emit values seen in training (numbers inside the training range, categories from the
schema), so the metrics judge the dependence structure rather than interpolation artefacts.

The `copulas` package is not used: it pins pandas<3 and would downgrade the pandas installed here;
the copula below is ~40 lines of numpy/scipy and handles categorical columns the way we want.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from scaleyard.jobs.tabdiff.metrics import MISSING, check_table, labels, numbers

MISSING_ATOM = object()  # the atom of a numerical column's NaNs, kept apart from every number


class Marginal:
    """Empirical distribution of one column as ordered atoms with CDF steps.

    Numerical atoms are the distinct training values in increasing order (NaN last); categorical
    atoms are the observed schema categories by decreasing frequency, so that in the copula adjacent
    codes are similar in mass and the commonest categories sit in the middle of neither tail.
    """

    def __init__(self, frame: pd.DataFrame, column: dict):
        self.name, self.kind = column["name"], column["kind"]
        if self.kind == "numerical":
            values = numbers(frame, self.name, "training")
            atoms, counts = np.unique(values[~np.isnan(values)], return_counts=True)
            self.atoms = atoms.astype(object)
            if np.isnan(values).any():
                self.atoms = np.append(self.atoms, MISSING_ATOM)
                counts = np.append(counts, np.isnan(values).sum())
        else:
            observed = labels(frame, self.name)
            allowed = [str(c) for c in column["categories"]]
            unknown = sorted(set(observed) - set(allowed) - {MISSING})  # NaN stays a value of its own
            if unknown:
                raise ValueError(f"column {self.name!r} holds values outside its schema categories, e.g. "
                                 f"{unknown[:5]}; add them to the schema's 'categories' or clean the data")
            found, counts = np.unique(observed, return_counts=True)
            rank = {c: i for i, c in enumerate([*allowed, MISSING])}
            order = sorted(range(len(found)), key=lambda i: (-counts[i], rank[found[i]]))
            self.atoms, counts = found[order], counts[order]
        self.cdf = np.cumsum(counts) / counts.sum()
        self.cdf[-1] = 1.0  # exact, so a uniform draw below 1 always lands on an atom
        self.lower = np.concatenate([[0.0], self.cdf[:-1]])
        self._index = {atom: i for i, atom in enumerate(self.atoms)} if self.kind == "categorical" else None

    def codes(self, frame: pd.DataFrame) -> np.ndarray:
        """Atom index of each row (the training rows the marginal was fitted on)."""
        if self.kind == "categorical":
            return np.array([self._index[v] for v in labels(frame, self.name)])
        values = numbers(frame, self.name)
        finite = self.atoms[: len(self.atoms) - (self.atoms[-1] is MISSING_ATOM)].astype(np.float64)
        return np.where(np.isnan(values), len(self.atoms) - 1, np.searchsorted(finite, values))

    def to_uniform(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Distributional transform: uniform inside each atom's CDF interval, so ties and categories
        get continuous normal scores instead of piling up on one value."""
        low, high = self.lower[codes], self.cdf[codes]
        return low + rng.random(len(codes)) * (high - low)

    def from_uniform(self, u: np.ndarray) -> np.ndarray:
        index = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.atoms) - 1)
        return self.atoms[index]

    def column(self, picked: np.ndarray, dtype) -> pd.Series:
        if self.kind == "numerical":
            return pd.Series([np.nan if v is MISSING_ATOM else v for v in picked], dtype=np.float64)
        text = pd.Series(picked.astype(str), dtype=object)
        return text.where(text != MISSING, None).astype(dtype)


class _EmpiricalModel:
    def __init__(self) -> None:
        self.marginals: list[Marginal] = []
        self.dtypes: dict[str, object] = {}

    def fit(self, train_df: pd.DataFrame, columns: list[dict]) -> _EmpiricalModel:
        check_table(train_df, columns, "training")
        self.marginals = [Marginal(train_df, c) for c in columns]
        self.dtypes = {c["name"]: train_df[c["name"]].dtype for c in columns}
        return self

    def _uniforms(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> pd.DataFrame:
        """`n` rows with the training table's schema columns, in schema order, and dtypes."""
        if not self.marginals:
            raise RuntimeError(f"{type(self).__name__}.sample called before fit(train_df, columns)")
        if n <= 0:
            raise ValueError(f"sample needs a positive number of rows, got {n}")
        u = self._uniforms(n, np.random.default_rng(seed))
        return pd.DataFrame({m.name: m.column(m.from_uniform(u[:, i]), self.dtypes[m.name])
                             for i, m in enumerate(self.marginals)})


class IndependentMarginals(_EmpiricalModel):
    """Every column drawn from its own empirical distribution, independently of the others."""

    def fit(self, train_df: pd.DataFrame, columns: list[dict]) -> IndependentMarginals:
        super().fit(train_df, columns)
        return self

    def _uniforms(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.random((n, len(self.marginals)))


class GaussianCopula(_EmpiricalModel):
    """Empirical marginals joined by the correlation of the training rows' normal scores.

    `jitter_seed` fixes the uniform draws inside each atom's CDF interval when fitting.
    """

    def __init__(self, jitter_seed: int = 0):
        super().__init__()
        self.jitter_seed = jitter_seed
        self.correlation = np.eye(0)

    def fit(self, train_df: pd.DataFrame, columns: list[dict]) -> GaussianCopula:
        super().fit(train_df, columns)
        rng = np.random.default_rng(self.jitter_seed)
        u = np.stack([m.to_uniform(m.codes(train_df), rng) for m in self.marginals], axis=1)
        scores = stats.norm.ppf(np.clip(u, 1e-9, 1 - 1e-9))
        correlation = np.atleast_2d(np.corrcoef(scores, rowvar=False))
        # sampling needs a positive-definite matrix: lift tiny/negative eigenvalues, rescale to unit diagonal
        values, vectors = np.linalg.eigh(np.nan_to_num(correlation))
        fixed = (vectors * np.maximum(values, 1e-6)) @ vectors.T
        scale = np.sqrt(np.diag(fixed))
        self.correlation = fixed / np.outer(scale, scale)
        return self

    def _uniforms(self, n: int, rng: np.random.Generator) -> np.ndarray:
        factor = np.linalg.cholesky(self.correlation)
        return stats.norm.cdf(rng.standard_normal((n, len(self.marginals))) @ factor.T)
