"""Synthetic-table metrics for TabDiff (issue #7, part 3), following the TabDiff / TabSyn evaluation.

Definitions (real = the held-out test split for column shape, pair trend and detection, as issue #7
asks; TabSyn's scripts compare with the train split instead):
- column_shape: mean over columns of 1 - KS statistic (numerical) or 1 - total variation distance
  (categorical): SDMetrics KSComplement / TVComplement.
- pair_trend: mean over column pairs of 1 - |corr_real - corr_syn| / 2 (Pearson, numerical pairs) or
  1 - TVD of the 2-D contingency table (other pairs; numerical columns cut into the 10 histogram bins
  of the real column with open outer edges): SDMetrics CorrelationSimilarity / ContingencySimilarity
  as its ColumnPairTrends property does.
- c2st: SDMetrics LogisticDetection convention: logistic regression on one-hot + standardized features
  plus pairwise interaction indicators, 3-fold stratified CV, score = 1 - mean_folds(max(AUC, 0.5) * 2 - 1);
  1 = indistinguishable. `c2st_linear` drops the pair terms (the paper's detector; see `detection`).
- mle_auc / mle_auc_real: gradient boosting trained on synthetic / real train rows, ROC AUC on test.
- dcr_share: TabSyn's DCR: L1 distance with numbers scaled by the train range and categories one-hot
  (a mismatch costs 2), share of synthetic rows closer to train than to an equal-sized test sample.

sdmetrics is not used: it pins pandas<3 and would downgrade the pandas installed here; the pieces
above are re-implemented with scipy / scikit-learn and follow its definitions.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse, stats

log = logging.getLogger("scaleyard")
MISSING = "\x00missing"  # stands in for NaN/None in categorical columns, so missingness is a value
PAIR_BINS = 10  # SDMetrics' number of bins for numerical columns in contingency tables


def check_table(frame: pd.DataFrame, columns: list[dict], role: str) -> None:
    """Fail with the column name and the fix when `frame` does not match the schema."""
    if len(frame) == 0:
        raise ValueError(f"the {role} table has no rows; pass at least one row")
    for column in columns:
        name, kind = column.get("name"), column.get("kind")
        if kind not in ("numerical", "categorical"):
            raise ValueError(f"schema column {name!r} has kind {kind!r}; use 'numerical' or 'categorical'")
        if name not in frame.columns:
            raise ValueError(f"the {role} table has no column {name!r}; pass DataFrames with the schema's "
                             f"original column names (it has {list(frame.columns)[:20]})")
        if kind == "categorical" and not column.get("categories"):
            raise ValueError(f"schema column {name!r} is categorical but lists no 'categories'")


def numbers(frame: pd.DataFrame, name: str, role: str = "given") -> np.ndarray:
    """A numerical column as float64; text that is not a number is an error, not a silent NaN."""
    raw = frame[name]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(values) & raw.notna().to_numpy()
    if bad.any():
        example = raw[bad].iloc[0]
        raise ValueError(f"numerical column {name!r} of the {role} table holds non-numbers such as "
                         f"{example!r}; convert it to float or mark the column categorical in the schema")
    return values


def labels(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A categorical column as an object array of str, NaN/None mapped to MISSING."""
    raw = frame[name]
    return np.where(raw.isna().to_numpy(), MISSING, raw.astype(str).to_numpy(dtype=object)).astype(object)


def _tvd(a: np.ndarray, b: np.ndarray) -> float:
    """Total variation distance between the value frequencies of two 1-D arrays."""
    _, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    size = int(inverse.max()) + 1
    pa = np.bincount(inverse[: len(a)], minlength=size) / len(a)
    pb = np.bincount(inverse[len(a) :], minlength=size) / len(b)
    return 0.5 * float(np.abs(pa - pb).sum())


def column_shape(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict]) -> dict[str, float]:
    """Per-column similarity of marginals; keys `column_shape`, `..._numerical`, `..._categorical`."""
    scores: dict[str, list[float]] = {"numerical": [], "categorical": []}
    for column in columns:
        name = column["name"]
        if column["kind"] == "numerical":
            r, s = numbers(real, name, "real"), numbers(synthetic, name, "synthetic")
            r, s = r[~np.isnan(r)], s[~np.isnan(s)]
            if len(r) == 0:
                continue  # nothing to compare against (SDMetrics skips it too)
            score = 0.0 if len(s) == 0 else 1.0 - float(stats.ks_2samp(r, s, method="asymp").statistic)
        else:
            score = 1.0 - _tvd(labels(real, name), labels(synthetic, name))
        scores[column["kind"]].append(score)
    both = scores["numerical"] + scores["categorical"]
    return {"column_shape": _mean(both), "column_shape_numerical": _mean(scores["numerical"]),
            "column_shape_categorical": _mean(scores["categorical"])}


def _codes(real: pd.DataFrame, synthetic: pd.DataFrame, column: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Shared integer codes of one column for contingency tables (numbers binned on the real column)."""
    name = column["name"]
    if column["kind"] == "numerical":
        r, s = numbers(real, name, "real"), numbers(synthetic, name, "synthetic")
        finite = r[~np.isnan(r)]
        edges = np.histogram_bin_edges(finite if len(finite) else np.zeros(1), bins=PAIR_BINS)
        edges[0], edges[-1] = -np.inf, np.inf
        # np.digitize puts NaN past the last edge: missing becomes its own bin
        return np.digitize(r, edges), np.digitize(s, edges), len(edges) + 1
    _, inverse = np.unique(np.concatenate([labels(real, name), labels(synthetic, name)]), return_inverse=True)
    return inverse[: len(real)], inverse[len(real) :], int(inverse.max()) + 1


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep] - x[keep].mean(), y[keep] - y[keep].mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def pair_trend(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict]) -> dict[str, float]:
    """Column-pair similarity; keys `pair_trend`, `pair_trend_correlation`, `pair_trend_contingency`."""
    codes = {c["name"]: _codes(real, synthetic, c) for c in columns}
    correlation, contingency = [], []
    for a, b in itertools.combinations(columns, 2):
        if a["kind"] == b["kind"] == "numerical":
            real_corr = _pearson(numbers(real, a["name"]), numbers(real, b["name"]))
            if np.isnan(real_corr):
                continue  # a constant real column has no trend to match
            syn_corr = _pearson(numbers(synthetic, a["name"]), numbers(synthetic, b["name"]))
            # a constant synthetic column shows no trend: score it as correlation 0, not as "skip"
            syn_corr = 0.0 if np.isnan(syn_corr) else syn_corr
            correlation.append(1.0 - abs(real_corr - syn_corr) / 2.0)
            continue
        (ra, sa, ka), (rb, sb, kb) = codes[a["name"]], codes[b["name"]]
        pr = np.bincount(ra * kb + rb, minlength=ka * kb) / len(ra)
        ps = np.bincount(sa * kb + sb, minlength=ka * kb) / len(sa)
        contingency.append(1.0 - 0.5 * float(np.abs(pr - ps).sum()))
    return {"pair_trend": _mean(correlation + contingency), "pair_trend_correlation": _mean(correlation),
            "pair_trend_contingency": _mean(contingency)}


class FeatureEncoder:
    """One-hot categoricals (schema categories; unseen values give all zeros) and standardized
    numbers (statistics of the reference table, NaN -> 0 plus a missing flag)."""

    def __init__(self, reference: pd.DataFrame, columns: list[dict]):
        self.columns = columns
        self.stats: dict[str, tuple[float, float]] = {}
        self.nan_flags: set[str] = set()
        for column in columns:
            if column["kind"] == "numerical":
                values = numbers(reference, column["name"], "reference")
                mean = float(np.nanmean(values)) if (~np.isnan(values)).any() else 0.0
                std = float(np.nanstd(values)) if (~np.isnan(values)).any() else 1.0
                self.stats[column["name"]] = (mean, std if std > 0 else 1.0)

    def transform(self, *frames: pd.DataFrame) -> list[np.ndarray]:
        for column in self.columns:  # a flag column only where some table has a missing number
            name = column["name"]
            if column["kind"] == "numerical" and any(np.isnan(numbers(f, name)).any() for f in frames):
                self.nan_flags.add(name)
        return [self._one(frame) for frame in frames]

    def _one(self, frame: pd.DataFrame) -> np.ndarray:
        parts = []
        for column in self.columns:
            name = column["name"]
            if column["kind"] == "numerical":
                mean, std = self.stats[name]
                values = (numbers(frame, name) - mean) / std
                missing = np.isnan(values)
                parts.append(np.where(missing, 0.0, values)[:, None])
                if name in self.nan_flags:
                    parts.append(missing[:, None].astype(np.float64))
            else:
                categories = np.asarray([str(c) for c in column["categories"]], dtype=object)
                parts.append((labels(frame, name)[:, None] == categories[None, :]).astype(np.float64))
        return np.concatenate(parts, axis=1)


def _pair_cells(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict]) -> sparse.csr_matrix:
    """Indicator of each row's cell in every column pair's contingency table (the pair_trend cells),
    rows of `real` first: the second-order features that let a linear detector see dependence."""
    codes = [_codes(real, synthetic, c) for c in columns]
    rows = len(real) + len(synthetic)
    blocks = []
    for (ra, sa, _), (rb, sb, kb) in itertools.combinations(codes, 2):
        _, cell = np.unique(np.concatenate([ra * kb + rb, sa * kb + sb]), return_inverse=True)
        blocks.append(sparse.csr_matrix((np.ones(rows), (np.arange(rows), cell)), shape=(rows, cell.max() + 1)))
    return sparse.hstack(blocks, format="csr") if blocks else sparse.csr_matrix((rows, 0))


def _detector_auc(x: sparse.csr_matrix | np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    aucs = []
    for fit_rows, test_rows in StratifiedKFold(3, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        model = LogisticRegression(max_iter=2000).fit(x[fit_rows], y[fit_rows])
        aucs.append(roc_auc_score(y[test_rows], model.predict_proba(x[test_rows])[:, 1]))
    return np.asarray(aucs)


def detection(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict], seed: int,
              max_rows: int = 20_000) -> dict[str, float]:
    """C2ST with logistic-regression detectors, 3-fold stratified CV, scored in the SDMetrics
    LogisticDetection convention 1 - mean_folds(max(AUC, 0.5) * 2 - 1): 1 = indistinguishable,
    0 = perfectly separated.

    `c2st` (headline): one-hot + standardized features plus the pairwise interaction indicators
    (`_pair_cells`). `c2st_linear`: the first-order features alone, as SDMetrics' LogisticDetection
    (the TabDiff paper's C2ST) uses; a linear score of first-order features cannot see dependence
    between columns (on Adult it scores column-wise shuffled rows 1.0, i.e. indistinguishable), hence
    the headline adds the pair terms. `c2st_auc`: the headline detector's raw mean AUC.
    Both tables are subsampled to the same size (at most `max_rows`) so chance AUC is 0.5.
    """
    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic), max_rows)
    if n < 3:  # 3-fold CV needs three rows of each table
        log.warning("C2ST undefined with %d rows per table (needs 3)", n)
        return {"c2st": float("nan"), "c2st_auc": float("nan"), "c2st_linear": float("nan")}
    real = real.iloc[np.sort(rng.choice(len(real), n, replace=False))]
    synthetic = synthetic.iloc[np.sort(rng.choice(len(synthetic), n, replace=False))]
    first = np.concatenate(FeatureEncoder(real, columns).transform(real, synthetic))
    y = np.concatenate([np.zeros(n), np.ones(n)])
    linear = _detector_auc(first, y, seed)
    paired = _detector_auc(sparse.hstack([sparse.csr_matrix(first), _pair_cells(real, synthetic, columns)],
                                         format="csr"), y, seed)

    def score(aucs: np.ndarray) -> float:
        return float(1.0 - np.mean(np.maximum(aucs, 0.5) * 2 - 1))

    return {"c2st": score(paired), "c2st_auc": float(paired.mean()), "c2st_linear": score(linear)}


def _gbm_inputs(frame: pd.DataFrame, columns: list[dict]) -> np.ndarray:
    """Numbers as they are (NaN = missing) and categories as schema codes (unseen -> missing)."""
    parts = []
    for column in columns:
        if column["kind"] == "numerical":
            parts.append(numbers(frame, column["name"]))
        else:
            lookup = {str(c): i for i, c in enumerate(column["categories"])}
            parts.append(np.array([lookup.get(v, np.nan) for v in labels(frame, column["name"])], dtype=np.float64))
    return np.stack(parts, axis=1)


def _mle_score(fit_frame: pd.DataFrame, test: pd.DataFrame, columns: list[dict], target: dict, seed: int) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import r2_score, roc_auc_score

    features = [c for c in columns if c["name"] != target["name"]]
    # HistGradientBoosting handles categories natively only up to 255 codes; wider ones go in as ordinals
    categorical = [c["kind"] == "categorical" and len(c["categories"]) < 255 for c in features]
    x_fit, x_test = _gbm_inputs(fit_frame, features), _gbm_inputs(test, features)
    settings = {"categorical_features": categorical, "random_state": seed, "early_stopping": False}
    if target["kind"] == "numerical":
        y_fit, y_test = numbers(fit_frame, target["name"]), numbers(test, target["name"])
        keep = ~np.isnan(y_fit)
        model = HistGradientBoostingRegressor(**settings).fit(x_fit[keep], y_fit[keep])
        scored = ~np.isnan(y_test)
        return float(r2_score(y_test[scored], model.predict(x_test[scored])))
    lookup = {str(c): i for i, c in enumerate(target["categories"])}
    y_fit = np.array([lookup.get(v, -1) for v in labels(fit_frame, target["name"])])
    y_test = np.array([lookup.get(v, -1) for v in labels(test, target["name"])])
    keep = y_fit >= 0  # synthetic rows with an out-of-schema target teach nothing
    classes = np.unique(y_fit[keep])
    proba = np.zeros((len(x_test), len(target["categories"])))
    if len(classes) >= 2:
        model = HistGradientBoostingClassifier(**settings).fit(x_fit[keep], y_fit[keep])
        proba[:, model.classes_] = model.predict_proba(x_test)
    # one-vs-rest AUC per class present in test (binary: the second schema category), macro mean;
    # a model that saw one class only ranks nothing and scores 0.5
    present = [k for k in np.unique(y_test[y_test >= 0]) if 0 < (y_test == k).sum() < len(y_test)]
    if len(target["categories"]) == 2:
        present = [1] if 1 in present else []
    if not present:  # undefined rather than an error: small smoke-test splits must still evaluate
        log.warning("MLE AUC undefined: target %r has a single class in the test table", target["name"])
        return float("nan")
    return float(np.mean([roc_auc_score(y_test == k, proba[:, k]) for k in present]))


def dcr(train: pd.DataFrame, test: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict], seed: int,
        max_rows: int = 10_000) -> dict[str, float]:
    """`dcr_share`: share of synthetic rows (at most `max_rows`) whose closest train row is nearer than
    their closest test row, train and test subsampled to the same size; ties count one half so that
    exact copies present in both splits do not bias it. Since only a sample of train is searched, a
    model that copies train rows scores about 0.75, not 1; `dcr_copies` (share of all synthetic rows
    equal to some train row in every column) shows copying directly."""
    copies = np.isin(_row_hashes(synthetic, columns), _row_hashes(train, columns))
    rng = np.random.default_rng(seed)
    n = min(len(train), len(test))
    pools = [frame.iloc[np.sort(rng.choice(len(frame), n, replace=False))] for frame in (train, test)]
    if len(synthetic) > max_rows:
        synthetic = synthetic.iloc[np.sort(rng.choice(len(synthetic), max_rows, replace=False))]
    scale = {}
    for column in columns:
        if column["kind"] == "numerical":
            values = numbers(train, column["name"])
            low, high = (np.nanmin(values), np.nanmax(values)) if (~np.isnan(values)).any() else (0.0, 1.0)
            scale[column["name"]] = (low, high - low if high > low else 1.0)

    # values outside the schema get fresh codes, shared by all three tables
    lookups = {c["name"]: {str(v): i for i, v in enumerate(c["categories"])} for c in columns if "categories" in c}

    def encode(frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        num, cat = [], []
        for column in columns:
            name = column["name"]
            if column["kind"] == "numerical":
                low, width = scale[name]
                # NaN sits at -1: distance >= 1 from any in-range number, 0 from another NaN
                num.append(np.nan_to_num((numbers(frame, name) - low) / width, nan=-1.0))
            else:
                lookup = lookups[name]
                cat.append(np.array([lookup.setdefault(v, len(lookup)) for v in labels(frame, name)]))
        empty = np.zeros((len(frame), 0))
        return (torch.from_numpy(np.stack(num, 1) if num else empty).float(),
                torch.from_numpy(np.stack(cat, 1) if cat else empty).float())

    syn_num, syn_cat = encode(synthetic)
    closest = []
    for pool in pools:
        pool_num, pool_cat = encode(pool)
        best = []
        for start in range(0, len(syn_num), 512):
            block = torch.cdist(syn_num[start : start + 512], pool_num, p=1)
            # Hamming count (p=0) x 2 = L1 between one-hot vectors
            block = block + 2 * torch.cdist(syn_cat[start : start + 512], pool_cat, p=0)
            best.append(block.min(dim=1).values)
        closest.append(torch.cat(best).double().numpy())
    to_train, to_test = closest
    share = np.mean((to_train < to_test) + 0.5 * (to_train == to_test))
    return {"dcr_share": float(share), "dcr_copies": float(copies.mean())}


def _row_hashes(frame: pd.DataFrame, columns: list[dict]) -> np.ndarray:
    canonical = pd.DataFrame({c["name"]: numbers(frame, c["name"]) if c["kind"] == "numerical"
                              else labels(frame, c["name"]) for c in columns})
    return pd.util.hash_pandas_object(canonical, index=False).to_numpy()


def evaluate_synthetic(train: pd.DataFrame, test: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict],
                       target: str, seed: int, *, detector_rows: int = 20_000,
                       dcr_rows: int = 10_000) -> dict[str, float]:
    """All metrics of one synthetic table: fidelity (shape, trend, detection) against the
    held-out test split, MLE trained on synthetic and tested on test, DCR against train and test.

    Returns column_shape, pair_trend, c2st (logistic detector with pair terms, SDMetrics
    LogisticDetection convention: 1 means the detector cannot tell real from synthetic), c2st_auc,
    c2st_linear (the paper's first-order detector), mle_auc (trained on synthetic, AUC on test),
    mle_auc_real (trained on train: the reference), dcr_share (0.5 ideal), dcr_copies, and the
    numerical/categorical and correlation/contingency parts of the first two. A numerical target gives
    mle_r2 / mle_r2_real instead of the AUCs.
    """
    for frame, role in ((train, "train"), (test, "test"), (synthetic, "synthetic")):
        check_table(frame, columns, role)
    by_name = {c["name"]: c for c in columns}
    if target and target not in by_name:
        raise ValueError(f"target {target!r} is not a schema column; choose one of {sorted(by_name)}")
    results: dict[str, float] = {}
    # fidelity against the held-out test split: a model that memorised the train split gains nothing
    results.update(column_shape(test, synthetic, columns))
    results.update(pair_trend(test, synthetic, columns))
    results.update(detection(test, synthetic, columns, seed, detector_rows))
    if target:  # machine-learning efficacy needs a column to predict; a table without one skips it
        kind = "r2" if by_name[target]["kind"] == "numerical" else "auc"
        results[f"mle_{kind}"] = _mle_score(synthetic, test, columns, by_name[target], seed)
        results[f"mle_{kind}_real"] = _mle_score(train, test, columns, by_name[target], seed)
    results.update(dcr(train, test, synthetic, columns, seed, dcr_rows))
    results["rows_synthetic"] = float(len(synthetic))
    return results


def imputation_auc(y_true: Sequence[str] | np.ndarray, p_positive: np.ndarray, positive: str) -> float:
    """ROC AUC of imputed-target probabilities `p_positive` against true labels, `positive` the class
    the probabilities are for (TabDiff's imputation metric on Adult's income)."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray([str(v) for v in y_true]) == str(positive)
    scores = np.asarray(p_positive, dtype=np.float64).reshape(-1)
    if len(scores) != len(truth):
        raise ValueError(f"imputation_auc got {len(truth)} labels but {len(scores)} probabilities; "
                         "pass one probability per row")
    if not np.isfinite(scores).all():
        raise ValueError("imputation_auc got NaN/inf probabilities; check the sampler's output")
    if truth.all() or not truth.any():
        raise ValueError(f"imputation_auc needs rows of both classes; every label is "
                         f"{'' if truth.all() else 'not '}{positive!r} (check `positive` matches the labels)")
    return float(roc_auc_score(truth, scores))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def describe(results: dict[str, Any]) -> str:
    """One line of the headline numbers, for logs."""
    keys = ("column_shape", "pair_trend", "c2st", "mle_auc", "mle_auc_real", "dcr_share")
    return " ".join(f"{k}={results[k]:.4f}" for k in keys if k in results)
