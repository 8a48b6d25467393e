"""TabDiff's metrics computed the way the paper's code computes them (MinkaiXu/TabDiff,
`tabdiff/metrics.py`, `eval/eval_quality.py`, `eval/mle/mle.py`; issue #17 item 1).

The reference compares synthetic rows with the *train* split ("real.csv") for shape, trend, C2ST
and alpha-precision / beta-recall, and with the test split only for MLE and DCR. Synthetic tables
have as many rows as train. Per metric:

- shape / trend: SDMetrics QualityReport's Column Shapes (`metrics.column_shape`) and Column Pair
  Trends (`pair_trends_sdmetrics`: it bins numbers on each table's own edges, unlike
  `metrics.pair_trend`); tests/test_tabdiff_paper_metrics.py checks both against sdmetrics 0.32.0
  (the reference does not pin its sdmetrics version).
- c2st: SDMetrics LogisticDetection: numbers mean-filled, categories one-hot (categories of the real
  table), SimpleImputer + RobustScaler + LogisticRegression(lbfgs), 3-fold stratified shuffled CV,
  1 - mean(2 max(AUC, 0.5) - 1). sdmetrics pins pandas<3, so this is a re-implementation checked
  against it on fixed data; its folds come from the global NumPy RNG, ours from `seed`.
- alpha_precision / beta_recall: synthcity's AlphaPrecision "naive" variant as eval_quality.py
  reads it: raw numbers + one-hot categories (target last), the last one-hot column dropped
  (synthcity's GenericDataLoader treats the last column as the target), min-max scaled on real,
  30 alpha levels, Delta = 1 - sum|alpha - curve| / sum(alpha). Needs equal row counts.
- mle: XGBoost trained on synthetic rows, hyper-parameters picked on a 1/9 split of them by
  validation AUC (the reference's 36-point grid), then refitted on the other 8/9 and scored by AUC
  on the real test split (RMSE for a numerical target). Numbers go in raw: the reference's
  min-max / log feature maps are monotone, and trees split on order only.
- dcr: L1 distance with numbers divided by their train range and one-hot categories (target
  included), share of synthetic rows *strictly* closer to train than to the holdout (ties count
  for the holdout, as `dcr_real < dcr_test` there). The paper trains a separate model on a 50/50
  split of all rows for this metric; `dcr_equal_pools` records whether the pools here are equal.
- imputation_auc (`imputation_auc_trials`): the target imputed from all other columns, repeated
  (the reference: 50 trials over the whole test split, `tabdiff/trainer.py` test_impute); each
  trial's imputed class one-hot, averaged over trials into class frequencies, scored by sklearn's
  micro-averaged ROC AUC against the one-hot truth (`eval_impute.py`). Unlike `metrics.imputation_auc`
  (one trial, the sampler's own class probabilities), it sees only the drawn classes.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch

from scaleyard.jobs.tabdiff.metrics import check_table, column_shape, detection, labels, numbers

log = logging.getLogger("scaleyard")
ALPHA_STEPS = 30  # synthcity's n_steps
# eval/mle/mle.py's XGBClassifier grid (36 points); "quick": one point for smoke runs and
# evaluations during training
MLE_GRIDS: dict[str, dict[str, list]] = {
    "paper": {"n_estimators": [10, 50, 100], "min_child_weight": [1, 10], "max_depth": [5, 10, 20],
              "gamma": [0.0, 1.0]},
    "quick": {"n_estimators": [50], "min_child_weight": [1], "max_depth": [5], "gamma": [0.0]},
}


def paper_order(columns: list[dict], target: str) -> tuple[list[dict], list[dict]]:
    """(numerical, categorical) columns in the reference's order: the target moves to the end of
    its kind (`reorder` in tabdiff/metrics.py), everything else keeps the schema order."""
    numerical = [c for c in columns if c["kind"] == "numerical" and c["name"] != target]
    categorical = [c for c in columns if c["kind"] == "categorical" and c["name"] != target]
    for column in columns:
        if column["name"] == target:
            (numerical if column["kind"] == "numerical" else categorical).append(column)
    return numerical, categorical


def _one_hot(real: pd.DataFrame, others: list[pd.DataFrame], column: dict) -> list[np.ndarray]:
    """One-hot blocks with the real table's categories sorted (scikit-learn OneHotEncoder's
    order); values the real table lacks give all-zero rows (the references raise instead)."""
    categories = np.unique(labels(real, column["name"]))
    return [(labels(frame, column["name"])[:, None] == categories[None, :]).astype(np.float64)
            for frame in (real, *others)]


def _own_bins(values: np.ndarray) -> np.ndarray:
    """sdmetrics' discretisation in ColumnPairTrends: 10 equal-width bins over *this* table's own
    finite values (real and synthetic get different edges there), np.digitize codes 0..11."""
    finite = values[~np.isnan(values)]
    edges = np.histogram_bin_edges(finite if len(finite) else np.zeros(1))
    return np.digitize(values, edges)


def pair_trends_sdmetrics(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict]) -> float:
    """SDMetrics QualityReport "Column Pair Trends" over every pair (0.32.0 with its real-correlation
    and association thresholds at 0, as sdmetrics scored every pair when the paper was written): mean of
    CorrelationSimilarity 1 - |r_real - r_syn| / 2 (Pearson, numerical pairs, NaN rows dropped) or
    ContingencySimilarity 1 - TVD of the joint frequencies (other pairs; numbers binned per table).
    `metrics.pair_trend` differs only in binning both tables on the real edges (open outer bins)."""
    codes = {}
    for column in columns:
        name = column["name"]
        if column["kind"] == "numerical":
            codes[name] = (_own_bins(numbers(real, name, "real")), _own_bins(numbers(synthetic, name, "synthetic")))
        else:
            codes[name] = (labels(real, name), labels(synthetic, name))
    scores = []
    for a, b in itertools.combinations(columns, 2):
        if a["kind"] == b["kind"] == "numerical":
            corr = []
            for frame in (real, synthetic):
                pair = np.stack([numbers(frame, a["name"]), numbers(frame, b["name"])], 1)
                pair = pair[~np.isnan(pair).any(1)]
                with np.errstate(invalid="ignore", divide="ignore"):
                    corr.append(np.corrcoef(pair[:, 0], pair[:, 1])[0, 1] if len(pair) > 1 else np.nan)
            scores.append(1 - abs(corr[0] - corr[1]) / 2)
            continue
        joint = []
        for side in (0, 1):
            cells = pd.Series(list(zip(codes[a["name"]][side], codes[b["name"]][side])))
            joint.append(cells.value_counts(normalize=True))
        both = joint[0].index.union(joint[1].index)
        tvd = (joint[0].reindex(both, fill_value=0) - joint[1].reindex(both, fill_value=0)).abs().sum() / 2
        scores.append(1 - float(tvd))
    return float(np.nanmean(scores)) if scores else float("nan")


def logistic_detection(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict], target: str = "",
                       seed: int = 0) -> float:
    """SDMetrics LogisticDetection score (1 = the detector cannot tell them apart)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import RobustScaler

    numerical, categorical = paper_order(columns, target)
    parts_real, parts_syn = [], []
    for column in numerical:  # sdmetrics' HyperTransformer: the real column's mean fills gaps in both
        r, s = numbers(real, column["name"], "real"), numbers(synthetic, column["name"], "synthetic")
        mean = float(np.nanmean(r)) if (~np.isnan(r)).any() else 0.0
        parts_real.append(np.where(np.isnan(r), mean, r)[:, None])
        parts_syn.append(np.where(np.isnan(s), mean, s)[:, None])
    for column in categorical:  # ... and appends the one-hot blocks after the numbers
        r, s = _one_hot(real, [synthetic], column)
        parts_real.append(r)
        parts_syn.append(s)
    x = np.concatenate([np.concatenate(parts_real, 1), np.concatenate(parts_syn, 1)])
    x[np.isinf(x)] = np.nan
    y = np.concatenate([np.ones(len(real)), np.zeros(len(synthetic))])
    scores = []
    for fit_rows, test_rows in StratifiedKFold(3, shuffle=True, random_state=seed).split(x, y):
        model = Pipeline([("imputer", SimpleImputer()), ("scalar", RobustScaler()),
                          ("classifier", LogisticRegression(solver="lbfgs"))])
        with warnings.catch_warnings():  # lbfgs stops at 100 iterations there too; the warning is noise
            warnings.simplefilter("ignore")
            model.fit(x[fit_rows], y[fit_rows])
        auc = roc_auc_score(y[test_rows], model.predict_proba(x[test_rows])[:, 1])
        scores.append(max(0.5, auc) * 2 - 1)
    return float(1 - np.mean(scores))


def _alpha_features(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict],
                    target: str) -> tuple[np.ndarray, np.ndarray]:
    numerical, categorical = paper_order(columns, target)
    blocks_real = [numbers(real, c["name"], "real")[:, None] for c in numerical]
    blocks_syn = [numbers(synthetic, c["name"], "synthetic")[:, None] for c in numerical]
    for column in categorical:
        r, s = _one_hot(real, [synthetic], column)
        blocks_real.append(r)
        blocks_syn.append(s)
    x_real, x_syn = np.concatenate(blocks_real, 1)[:, :-1], np.concatenate(blocks_syn, 1)[:, :-1]
    if np.isnan(x_real).any() or np.isnan(x_syn).any():
        raise ValueError("alpha-precision needs tables without missing numbers (the reference stops on NaN)")
    low, high = x_real.min(0), x_real.max(0)
    width = np.where(high > low, high - low, 1.0)  # MinMaxScaler leaves constant columns at 0
    return (x_real - low) / width, (x_syn - low) / width


def alpha_precision_beta_recall(real: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict],
                                target: str = "", seed: int = 0) -> dict[str, float]:
    """synthcity AlphaPrecision (naive variant): `alpha_precision`, `beta_recall`, `authenticity`.
    Both tables must be equally long there; here the longer one is subsampled (rows drawn with
    `seed`) and `alpha_rows` records the count."""
    from sklearn.neighbors import NearestNeighbors

    n = min(len(real), len(synthetic))
    rng = np.random.default_rng(seed)
    if len(real) > n:
        real = real.iloc[np.sort(rng.choice(len(real), n, replace=False))]
    if len(synthetic) > n:
        synthetic = synthetic.iloc[np.sort(rng.choice(len(synthetic), n, replace=False))]
    x, x_syn = _alpha_features(real, synthetic, columns, target)
    alphas = np.linspace(0, 1, ALPHA_STEPS)
    center = x.mean(0)
    radii = np.quantile(np.linalg.norm(x - center, axis=1), alphas)
    precision = (np.linalg.norm(x_syn - center, axis=1)[None] <= radii[:, None]).mean(1)
    # each real row's nearest other real row (the second neighbour: the first is itself)
    # brute force: synthcity's default tree search takes many minutes on Adult's ~100 one-hot
    # dimensions; distances are the same, only a tie between equidistant rows may pick another one
    real_to_real = NearestNeighbors(n_neighbors=2, algorithm="brute", p=2).fit(x).kneighbors(x)[0][:, 1]
    real_to_syn, nearest = NearestNeighbors(n_neighbors=1, algorithm="brute", p=2).fit(x_syn).kneighbors(x)
    real_to_syn, nearest = real_to_syn[:, 0], nearest[:, 0]
    # beta: real rows whose nearest synthetic row lies within their own nearest-real distance and
    # inside the synthetic alpha-ball (centred on the synthetic mean)
    closest_d = np.linalg.norm(x_syn[nearest] - x_syn.mean(0), axis=1)
    syn_radii = np.quantile(closest_d, alphas)
    covered = real_to_syn <= real_to_real
    recall = (covered[None] & (closest_d[None] <= syn_radii[:, None])).mean(1)
    authenticity = float(np.mean(real_to_real[nearest] < real_to_syn))

    def delta(curve: np.ndarray) -> float:
        return float(1 - np.abs(alphas - curve).sum() / alphas.sum())

    return {"alpha_precision": delta(precision), "beta_recall": delta(recall), "authenticity": authenticity,
            "alpha_rows": float(n)}


def _mle_features(frames: list[pd.DataFrame], columns: list[dict], target: str) -> list[np.ndarray]:
    """Raw numbers and one-hot categories (categories of the first frame, the one fitted on)."""
    numerical, categorical = paper_order([c for c in columns if c["name"] != target], "")
    blocks: list[list[np.ndarray]] = [[numbers(f, c["name"])[:, None] for c in numerical] for f in frames]
    for column in categorical:
        for out, block in zip(blocks, _one_hot(frames[0], frames[1:], column)):
            out.append(block)
    return [np.concatenate(b, 1) for b in blocks]


def mle(synthetic: pd.DataFrame, test: pd.DataFrame, columns: list[dict], target: str, seed: int = 0,
        grid: str = "paper", n_jobs: int | None = None) -> dict[str, float]:
    """Train-on-synthetic, test-on-real with XGBoost as eval/mle/mle.py: `mle_auc` (a categorical
    target) or `mle_rmse` and `mle_r2` (a numerical one), plus `mle_params` (grid index picked)."""
    from sklearn.metrics import mean_squared_error, r2_score, roc_auc_score
    from sklearn.model_selection import ParameterGrid
    from xgboost import XGBClassifier, XGBRegressor

    by_name = {c["name"]: c for c in columns}
    if target not in by_name:
        raise ValueError(f"MLE needs a target column; {target!r} is not one of {sorted(by_name)}")
    x_fit, x_test = _mle_features([synthetic, test], columns, target)
    order = np.random.default_rng(seed).permutation(len(synthetic))
    val_rows, fit_rows = order[: len(order) // 9], order[len(order) // 9 :]  # the reference's 1/9 split
    params = list(ParameterGrid(MLE_GRIDS[grid]))
    common = {"tree_method": "hist", "random_state": seed, "n_jobs": n_jobs}
    if by_name[target]["kind"] == "numerical":
        y, y_test = numbers(synthetic, target), numbers(test, target)
        errors = []
        for p in params:
            model = XGBRegressor(**p, **common).fit(x_fit[fit_rows], y[fit_rows])
            errors.append(mean_squared_error(y[val_rows], model.predict(x_fit[val_rows])))
        best = int(np.argmin(errors))
        pred = XGBRegressor(**params[best], **common).fit(x_fit[fit_rows], y[fit_rows]).predict(x_test)
        return {"mle_rmse": float(np.sqrt(mean_squared_error(y_test, pred))), "mle_r2": float(r2_score(y_test, pred)),
                "mle_params": float(best)}
    classes = sorted(set(labels(synthetic, target)))  # LabelEncoder fitted on the synthetic target
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in labels(synthetic, target)])
    truth = labels(test, target)

    def auc(model: Any, x: np.ndarray, true: np.ndarray) -> float:
        proba = model.predict_proba(x)
        if len(classes) == 2:
            positive = np.asarray(true) == classes[1]
            return float(roc_auc_score(positive, proba[:, 1])) if 0 < positive.sum() < len(positive) else float("nan")
        onehot = np.asarray(true)[:, None] == np.asarray(classes)[None]
        present = (onehot.sum(0) > 0) & (onehot.sum(0) < len(onehot))
        return float(roc_auc_score(onehot[:, present], proba[:, present], average="macro"))

    if len(classes) < 2:  # the reference predicts the one class it saw: no ranking at all
        return {"mle_auc": 0.5, "mle_params": float("nan")}
    objective = "binary:logistic" if len(classes) == 2 else "multi:softprob"
    scores = []
    for p in params:
        model = XGBClassifier(**p, **common, objective=objective).fit(x_fit[fit_rows], y[fit_rows])
        scores.append(auc(model, x_fit[val_rows], np.asarray(classes)[y[val_rows]]))
    best = int(np.nanargmax(scores)) if not np.all(np.isnan(scores)) else 0
    model = XGBClassifier(**params[best], **common, objective=objective).fit(x_fit[fit_rows], y[fit_rows])
    return {"mle_auc": auc(model, x_test, truth), "mle_params": float(best)}


def dcr(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict],
        seed: int = 0, block: int = 512) -> dict[str, float]:
    """The paper's DCR score: share of synthetic rows strictly closer (L1) to train than to the holdout.
    The score reads 50% as "no memorisation" only with equally large pools (the paper's 50/50
    split); a larger train pool is subsampled to the holdout's size (rows drawn with `seed`) and
    `dcr_equal_pools` is 0 then."""
    equal = len(train) == len(holdout)
    numerical = [c for c in columns if c["kind"] == "numerical"]
    ranges = []  # the whole train split's ranges, before any subsampling
    for column in numerical:
        values = numbers(train, column["name"], "train")
        spread = float(np.nanmax(values) - np.nanmin(values))
        ranges.append(spread if spread > 0 else 1.0)  # the reference divides by 0 here; 1 keeps it finite
    rng = np.random.default_rng(seed)
    if len(train) > len(holdout):
        train = train.iloc[np.sort(rng.choice(len(train), len(holdout), replace=False))]
    elif len(holdout) > len(train):
        holdout = holdout.iloc[np.sort(rng.choice(len(holdout), len(train), replace=False))]
    categorical = [c for c in columns if c["kind"] == "categorical"]
    # one code space per column over train + holdout (the reference fits its encoder on both)
    lookups = [{v: i for i, v in enumerate(np.unique(np.concatenate([labels(train, c["name"]),
                                                                      labels(holdout, c["name"])])))}
               for c in categorical]

    def encode(frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        num = np.stack([numbers(frame, c["name"]) / r for c, r in zip(numerical, ranges)], 1) if numerical \
            else np.zeros((len(frame), 0))
        # a value outside train + holdout matches nothing (-1); it costs 2 like any mismatch
        # (the reference's all-zero one-hot would cost 1: such values cannot come from our samplers)
        cat = np.stack([[lookup.get(v, -1) for v in labels(frame, c["name"])] for c, lookup in
                        zip(categorical, lookups)], 1) if categorical else np.zeros((len(frame), 0))
        return torch.from_numpy(num).double(), torch.from_numpy(np.asarray(cat, dtype=np.float64))

    syn_num, syn_cat = encode(synthetic)
    closest = []
    for pool in (train, holdout):
        pool_num, pool_cat = encode(pool)
        best = []
        for start in range(0, len(syn_num), block):
            d = torch.cdist(syn_num[start : start + block], pool_num, p=1)
            # L1 between one-hot vectors = 2 x the count of mismatched columns (cdist p=0: Hamming count)
            d = d + 2 * torch.cdist(syn_cat[start : start + block], pool_cat, p=0)
            best.append(d.min(1).values)
        closest.append(torch.cat(best).numpy())
    to_train, to_holdout = closest
    return {"dcr": float(np.mean(to_train < to_holdout)), "dcr_ties": float(np.mean(to_train == to_holdout)),
            "dcr_equal_pools": float(equal)}


def imputation_auc_trials(truth: np.ndarray, trials: np.ndarray, classes: int) -> float:
    """Micro-averaged ROC AUC of a categorical target's imputations: `truth` [N] class indices,
    `trials` [R, N] the class each of R imputation trials drew for each row."""
    from sklearn.metrics import roc_auc_score

    truth, trials = np.asarray(truth), np.asarray(trials)
    if trials.ndim != 2 or trials.shape[1] != len(truth):
        raise ValueError(f"imputation_auc_trials: trials have shape {trials.shape}, need [trials, {len(truth)}]")
    eye = np.eye(classes)
    frequencies = eye[trials].mean(0)  # [N, classes]: how often each row was imputed as each class
    return float(roc_auc_score(eye[truth], frequencies, average="micro"))


def evaluate_paper(train: pd.DataFrame, test: pd.DataFrame, synthetic: pd.DataFrame, columns: list[dict],
                   target: str, seed: int = 0, *, mle_grid: str = "paper", pairs_rows: int = 20_000,
                   mle_test: pd.DataFrame | None = None) -> dict[str, float]:
    """Every paper metric of one synthetic table, plus `c2st_pairs` (the project's detector with
    column-pair indicator features, against the same real rows; see metrics.detection).
    Fidelity is against `train`, MLE is scored on `mle_test` (default `test`), DCR against train
    and `test`. A regression target gives mle_rmse / mle_r2 instead of mle_auc."""
    for frame, role in ((train, "train"), (test, "test"), (synthetic, "synthetic")):
        check_table(frame, columns, role)
    results: dict[str, float] = {}
    shape = column_shape(train, synthetic, columns)["column_shape"]
    trend = pair_trends_sdmetrics(train, synthetic, columns)
    # the paper prints error rates in %: 100 (1 - score)
    results.update({"shape": shape, "trend": trend, "shape_error_pct": 100 * (1 - shape),
                    "trend_error_pct": 100 * (1 - trend)})
    results["c2st"] = logistic_detection(train, synthetic, columns, target, seed)
    results["c2st_pairs"] = detection(train, synthetic, columns, seed, pairs_rows)["c2st"]
    results.update(alpha_precision_beta_recall(train, synthetic, columns, target, seed))
    if target:
        results.update(mle(synthetic, test if mle_test is None else mle_test, columns, target, seed, mle_grid))
    results.update(dcr(train, test, synthetic, columns, seed))
    results["rows_synthetic"] = float(len(synthetic))
    return results
