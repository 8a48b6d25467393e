"""The paper's TabDiff metrics (jobs/tabdiff/paper_metrics.py) against the libraries the paper's code
calls, on fixed data, and the validation split carved from train (no tuning on the test split).

sdmetrics and synthcity pin pandas<3, so they are not installed here: the expected numbers below were
printed by tests/reference/tabdiff_paper_expected.py in a scratch environment (sdmetrics 0.32.0,
synthcity 0.2.12's AlphaPrecision source; pandas 2.3.3, scikit-learn 1.9.1, NumPy 2.4.6), with the
commands in that script's docstring:

    python -m venv /tmp/sdm && /tmp/sdm/bin/pip install sdmetrics==0.32.0
    /tmp/sdm/bin/pip download synthcity==0.2.12 --no-deps -d /tmp/synthcity_dl
    (cd /tmp/synthcity_dl && unzip -o -q synthcity-0.2.12-py3-none-any.whl -d x)
    /tmp/sdm/bin/python tests/reference/tabdiff_paper_expected.py /tmp/synthcity_dl/x
"""

import numpy as np
import pandas as pd
import pytest
import torch
from reference.tabdiff_paper_expected import COLUMNS, SEED, TARGET, fixed_tables

from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.writer import write_split
from scaleyard.jobs.tabdiff import paper_metrics as pm
from scaleyard.jobs.tabdiff.metrics import column_shape
from scaleyard.jobs.tabdiff.table import HoldoutDecoder, is_holdout, read_split, read_split_holdout, schema_of

# printed by the command above
EXPECTED = {
    "shape": 0.9044444444444443,  # QualityReport "Column Shapes"
    "trend": 0.8688178047942383,  # "Column Pair Trends", real_correlation/association thresholds 0
    "c2st": 0.7661333333333334,  # LogisticDetection.compute after np.random.seed(3)
    "trend_thresholded_0_32": 0.818888888888889,  # the same report with 0.32's default thresholds
    "alpha_precision": 0.882,  # synthcity AlphaPrecision.metrics, naive variant
    "beta_recall": 0.46066666666666667,
    "authenticity": 0.5033333333333333,
}
# Same arithmetic as the references (means of the same sums), so the scores agree to float rounding:
# shape/trend differ in the last bit (summation order), alpha/beta/authenticity are shares of 300 or
# 30 counts and agree exactly. C2ST fits the same logistic regressions on the same folds (sdmetrics'
# folds come from the global RNG after np.random.seed(SEED), identical to StratifiedKFold(SEED));
# lbfgs on the same matrix gives the same AUCs: 1e-9 leaves room for a BLAS difference only.
ROUNDING = 1e-12


@pytest.fixture(scope="module")
def tables():
    return fixed_tables()


@pytest.fixture(autouse=True)
def one_thread():
    """BLAS and XGBoost's OpenMP threads on a busy 2-core machine cost 10-100x the single-thread time
    on these small tables (measured: LogisticDetection 2.7 s -> 0.05 s, the 36-point MLE grid 41 s -> 0.4 s)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def test_shape_and_trend_match_sdmetrics(tables):
    real, synthetic = tables
    assert column_shape(real, synthetic, COLUMNS)["column_shape"] == pytest.approx(EXPECTED["shape"], abs=ROUNDING)
    trend = pm.pair_trends_sdmetrics(real, synthetic, COLUMNS)
    assert trend == pytest.approx(EXPECTED["trend"], abs=ROUNDING)
    # sdmetrics 0.32's default skips weakly associated real pairs: a different number, not the paper's
    assert abs(trend - EXPECTED["trend_thresholded_0_32"]) > 0.01


def test_c2st_matches_sdmetrics_logistic_detection(tables):
    real, synthetic = tables
    assert pm.logistic_detection(real, synthetic, COLUMNS, TARGET, SEED) == pytest.approx(EXPECTED["c2st"], abs=1e-9)
    same = pm.logistic_detection(real, real, COLUMNS, TARGET, SEED)
    assert same == pytest.approx(1.0, abs=0.15)  # a table against itself: the detector is at chance


def test_alpha_precision_and_beta_recall_match_synthcity(tables):
    real, synthetic = tables
    scores = pm.alpha_precision_beta_recall(real, synthetic, COLUMNS, TARGET, SEED)
    for key in ("alpha_precision", "beta_recall", "authenticity"):
        assert scores[key] == pytest.approx(EXPECTED[key], abs=ROUNDING), key
    assert scores["alpha_rows"] == len(real)


def brute_force_dcr(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame) -> float:
    """eval_dcr.py's rule written out row by row: numbers over the train range, one-hot categories
    fitted on train + holdout, L1 distance; a synthetic row counts when strictly closer to train."""
    numerical = [c["name"] for c in COLUMNS if c["kind"] == "numerical"]
    categorical = [c["name"] for c in COLUMNS if c["kind"] == "categorical"]
    span = (train[numerical].max() - train[numerical].min()).to_numpy(float)
    levels = {c: sorted(set(train[c]) | set(holdout[c])) for c in categorical}

    def encode(frame: pd.DataFrame) -> np.ndarray:
        parts = [frame[numerical].to_numpy(float) / span]
        parts += [(frame[c].to_numpy()[:, None] == np.array(levels[c])[None]).astype(float) for c in categorical]
        return np.concatenate(parts, 1)

    syn, pools = encode(synthetic), [encode(train), encode(holdout)]
    closest = [np.abs(syn[:, None] - pool[None]).sum(-1).min(1) for pool in pools]
    return float(np.mean(closest[0] < closest[1]))


def test_dcr_follows_the_reference_rule(tables):
    real, synthetic = tables
    train, holdout = real.iloc[:150], real.iloc[150:]
    scores = pm.dcr(train, holdout, synthetic, COLUMNS, SEED)
    assert scores["dcr"] == pytest.approx(brute_force_dcr(train, holdout, synthetic), abs=1e-12)
    assert scores["dcr_equal_pools"] == 1.0
    copied = pm.dcr(train, holdout, train.iloc[:60], COLUMNS, SEED)  # memorised rows: always closer to train
    assert copied["dcr"] == 1.0 and copied["dcr_ties"] == 0.0
    tied = pm.dcr(train, train, synthetic, COLUMNS, SEED)  # equal distances count for the holdout
    assert tied["dcr"] == 0.0 and tied["dcr_ties"] == 1.0


def test_imputation_auc_averages_the_drawn_classes_of_every_trial():
    truth = np.array([1, 0, 1, 0])
    # row frequencies of class 1: 1, 0, 1/2, 1/2. Micro-averaged over both one-hot columns, positives
    # score {1, 1, 1/2, 1/2} and negatives {0, 0, 1/2, 1/2}: 12 wins and 4 ties of 16 pairs
    trials = np.array([[1, 0, 1, 1], [1, 0, 0, 0]])
    assert pm.imputation_auc_trials(truth, trials, 2) == 0.875
    assert pm.imputation_auc_trials(truth, np.stack([truth] * 3), 2) == 1.0
    assert pm.imputation_auc_trials(truth, np.stack([1 - truth] * 3), 2) == 0.0
    with pytest.raises(ValueError, match=r"need \[trials, 4\]"):
        pm.imputation_auc_trials(truth, trials[:, :3], 2)


def test_mle_grid_and_train_on_synthetic_test_on_real(tables):
    real, synthetic = tables
    assert np.prod([len(v) for v in pm.MLE_GRIDS["paper"].values()]) == 36  # eval/mle/mle.py's grid
    test = fixed_tables(rows=600)[0].iloc[300:]  # real rows from the same draw stream, never fitted on
    on_real = pm.mle(real, test, COLUMNS, TARGET, SEED, grid="quick", n_jobs=1)
    shuffled = synthetic.assign(income=synthetic["income"].sample(frac=1, random_state=0).to_numpy())
    on_noise = pm.mle(shuffled, test, COLUMNS, TARGET, SEED, grid="quick", n_jobs=1)
    assert on_real["mle_auc"] > 0.75 and on_noise["mle_auc"] < 0.65
    one_class = pm.mle(real.assign(income="<=50K"), test, COLUMNS, TARGET, SEED, grid="quick")
    assert one_class["mle_auc"] == 0.5  # the reference predicts the one class it saw


def test_evaluate_paper_reports_every_metric(tables):
    real, synthetic = tables
    columns = [{**c, "categories": sorted(set(real[c["name"]]))} if c["kind"] == "categorical" else c
               for c in COLUMNS]  # the job's schema lists them
    scores = pm.evaluate_paper(real.iloc[:200], real.iloc[200:], synthetic.iloc[:200], columns, TARGET, SEED,
                               mle_grid="quick")
    assert {"shape", "trend", "c2st", "c2st_pairs", "alpha_precision", "beta_recall", "mle_auc", "dcr",
            "shape_error_pct", "trend_error_pct"} <= scores.keys()
    assert all(np.isfinite(v) for k, v in scores.items() if k != "mle_params")


# --- the validation split carved from train ---------------------------------------------------

ID_COLUMNS = [{"name": "id", "kind": "numerical"}, {"name": "x", "kind": "numerical"},
              {"name": "label", "kind": "categorical", "categories": ["no", "yes"]}]


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """2,000 train rows whose `id` column is their position, keyed as the data builders key rows."""
    rng = np.random.default_rng(0)
    samples = ({"__key__": f"{i:06d}", "json": {"id": float(i), "x": float(rng.normal()),
                                                 "label": ["no", "yes"][int(rng.random() < 0.3)]}}
               for i in range(2000))
    root = tmp_path_factory.mktemp("numbered") / "train"
    write_split(samples, root, builder="generated", version="1", split="train", schema={"json": "one table row"},
                shard_size=300, extra={"columns": ID_COLUMNS, "target": "label"})
    return load_index(root)


def test_validation_split_is_deterministic_disjoint_and_about_val_share(numbered):
    schema = schema_of(numbered)
    salt = "tabdiff-val-0"
    train_num, train_cat, val_num, val_cat = read_split_holdout(numbered, schema, 0.1, salt)
    again = read_split_holdout(numbered, schema, 0.1, salt)
    assert all(torch.equal(a, b) for a, b in zip((train_num, train_cat, val_num, val_cat), again))
    train_ids, val_ids = set(train_num[:, 0].tolist()), set(val_num[:, 0].tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == 2000 == len(train_cat) + len(val_cat)
    assert val_ids == {float(i) for i in range(2000) if is_holdout(f"{i:06d}", 0.1, salt)}  # by key alone
    assert 0.08 < len(val_ids) / 2000 < 0.12  # binomial sd 0.007
    other = set(read_split_holdout(numbered, schema, 0.1, "tabdiff-val-1")[2][:, 0].tolist())
    assert other != val_ids  # eval.val_seed draws another split
    full_num, _ = read_split(numbered, schema)
    assert torch.equal(full_num[~torch.isin(full_num[:, 0], val_num[:, 0])], train_num)  # order kept


def test_training_never_sees_validation_rows(numbered):
    """The stream flags validation rows by key; train_step drops them before the model sees a row."""
    from omegaconf import OmegaConf

    from scaleyard.data_loaders.pipeline import first_samples
    from scaleyard.jobs.tabdiff.job import TabDiffJob

    schema = schema_of(numbered)
    decode = HoldoutDecoder(schema.columns, 0.1, "tabdiff-val-0")
    batch = next(first_samples(numbered, decode, 256, 256))
    ids = batch["numeric"][:, 0].long().tolist()
    assert batch["holdout"].tolist() == [is_holdout(f"{i:06d}", 0.1, "tabdiff-val-0") for i in ids]

    seen = []

    def model(numeric, categorical, num_weight):
        seen.append(numeric[:, 0].long().tolist())
        return numeric.sum() * 0 + 1.0, {}

    job = TabDiffJob()
    job.cfg = OmegaConf.create({"train": {"steps": 10, "grad_accum": 1}, "model": {"num_weight_end": 0.0}})
    job.ctx, job.micro_batches = type("Ctx", (), {"device": torch.device("cpu")})(), 0
    job.train_step(model, batch)
    assert seen[0] == [i for i, held in zip(ids, batch["holdout"].tolist()) if not held]
    only_val = {k: v[batch["holdout"]] for k, v in batch.items()}
    loss, _ = job.train_step(model, only_val)  # still a forward (DDP), but nothing to learn
    assert float(loss) == 0.0


def test_report_marks_rows_comparable_only_for_the_papers_budget_and_denoiser():
    from scaleyard.jobs.tabdiff.paper_report import comparability, paper_section

    paper_run = {"step": 64_000, "batch_size": 4096, "model_deviations": ""}
    assert comparability("tabdiff", paper_run)[0] == "partly"  # per-step EMA, DCR pools, one sample remain
    assert comparability("tabdiff", {**paper_run, "step": 2000})[0] == "no"
    verdict, why = comparability("tabdiff", {**paper_run, "model_deviations": "model.mid_residual"})
    assert verdict == "no" and "model.mid_residual" in why
    assert comparability("gaussian_copula", paper_run)[0] == "no"
    lines = paper_section({"tabdiff": {"c2st": 0.5, "mle_auc": 0.8}}, paper_run)
    assert any(line.startswith("| this run | tabdiff | - | - | 0.5000 |") for line in lines)
