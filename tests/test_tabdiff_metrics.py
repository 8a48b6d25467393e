"""TabDiff evaluation on real Adult rows: metrics tell real from shuffled, corrupted and copied rows,
baselines keep to the schema, and the report lists every metric and method."""

import json

import numpy as np
import pytest

from scaleyard.data_loaders.builders import build
from scaleyard.jobs.tabdiff.baseline_report import REAL, load_table, main
from scaleyard.jobs.tabdiff.baselines import GaussianCopula, IndependentMarginals
from scaleyard.jobs.tabdiff.metrics import evaluate_synthetic, imputation_auc, pair_trend
from scaleyard.jobs.tabdiff.report import write_report

ROWS = 3000  # per split: enough for stable pair statistics, small enough for a quick file


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """BLAS and OpenMP threads fighting over a busy 2-core machine made this file's detectors many
    times slower than one thread (test_tabdiff_paper_metrics.py measures it)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def adult(tmp_path_factory):
    out = tmp_path_factory.mktemp("adult")
    build("adult", out, shard_size=1000, limit=ROWS)
    train, columns, target = load_table(out / "train")
    test, _, _ = load_table(out / "test")
    return {"path": out, "train": train, "test": test, "columns": columns, "target": target}


@pytest.fixture(scope="module")
def scored(adult):
    """Metrics of four tables (fidelity against the same held-out rows): real held-out rows, column-wise shuffled
    train rows, corrupted real rows, and verbatim train copies."""
    train, test, columns, target = adult["train"], adult["test"], adult["columns"], adult["target"]
    rng = np.random.default_rng(0)
    held_out, real = test.iloc[: ROWS // 2], test.iloc[ROWS // 2 :]
    shuffled = real.apply(lambda column: column.to_numpy()[rng.permutation(len(column))])
    corrupted = real.copy()
    corrupted["age"] = corrupted["age"] + 15  # a shifted number
    corrupted["hours-per-week"] = corrupted["hours-per-week"] * 2  # a stretched one
    corrupted["workclass"] = "Private"  # a category collapsed onto its mode
    corrupted["sex"] = corrupted["sex"].map({"Male": "Female", "Female": "Male"})  # labels swapped
    tables = {"real": real, "shuffled": shuffled, "corrupted": corrupted, "copies": train.iloc[: ROWS // 2]}
    return {name: evaluate_synthetic(train, held_out, table, columns, target, seed=0) for name, table in tables.items()}


def test_real_rows_score_near_ideal(scored):
    real = scored["real"]
    # two samples of 1,500 real rows: binned pair statistics carry sampling noise of a few points
    assert real["column_shape"] > 0.95 and real["pair_trend"] > 0.92
    assert real["c2st"] > 0.85 and abs(real["c2st_auc"] - 0.5) < 0.08
    assert 0.42 < real["dcr_share"] < 0.58 and real["dcr_copies"] < 0.01
    assert real["mle_auc"] > 0.85 and real["mle_auc_real"] > 0.85


def test_shuffling_columns_keeps_shapes_but_breaks_trends_and_detection(scored):
    real, shuffled = scored["real"], scored["shuffled"]
    assert shuffled["column_shape"] == pytest.approx(real["column_shape"])  # the same values in every column
    assert shuffled["pair_trend"] < real["pair_trend"] - 0.02
    assert shuffled["pair_trend_correlation"] < real["pair_trend_correlation"] - 0.01
    assert shuffled["c2st"] < real["c2st"] - 0.5 and shuffled["c2st_auc"] > 0.75
    # the first-order detector cannot see it: the reason the headline c2st has pair terms
    assert shuffled["c2st_linear"] > 0.9
    assert shuffled["mle_auc"] < 0.65  # income no longer depends on the other columns


def test_corruption_lowers_shapes_and_is_detected(scored):
    real, corrupted = scored["real"], scored["corrupted"]
    assert corrupted["column_shape"] < real["column_shape"] - 0.1
    assert corrupted["column_shape_numerical"] < real["column_shape_numerical"] - 0.1
    assert corrupted["pair_trend"] < real["pair_trend"] - 0.05
    assert corrupted["c2st"] < 0.2 and corrupted["c2st_linear"] < 0.2


def test_copied_train_rows_show_in_dcr(scored):
    copies, real = scored["copies"], scored["real"]
    assert copies["dcr_copies"] == 1.0
    # half the train split is searched (as many rows as the test split), so copying gives ~0.75
    assert copies["dcr_share"] > 0.68 and copies["dcr_share"] > real["dcr_share"] + 0.15


def test_baselines_respect_the_schema(adult):
    train, columns = adult["train"], adult["columns"]
    for model in (IndependentMarginals(), GaussianCopula()):
        model.fit(train, columns)
        sample = model.sample(2000, seed=1)
        assert list(sample.columns) == [c["name"] for c in columns] and len(sample) == 2000
        for column in columns:
            name, values = column["name"], sample[column["name"]]
            assert values.dtype == train[name].dtype, name
            if column["kind"] == "numerical":
                assert values.min() >= train[name].min() and values.max() <= train[name].max(), name
                assert values.notna().all(), name
            else:
                assert set(values) <= set(column["categories"]), name
        assert sample.equals(model.sample(2000, seed=1))
        assert not sample.equals(model.sample(2000, seed=2))


def test_baselines_and_metrics_take_missing_values(adult):
    train, test, columns, target = adult["train"].copy(), adult["test"], adult["columns"], adult["target"]
    rng = np.random.default_rng(0)
    train.loc[rng.random(len(train)) < 0.2, "age"] = np.nan
    train.loc[rng.random(len(train)) < 0.2, "race"] = None
    sample = GaussianCopula().fit(train, columns).sample(3000, seed=0)
    assert 0.15 < sample["age"].isna().mean() < 0.25 and 0.15 < sample["race"].isna().mean() < 0.25
    scores = evaluate_synthetic(train, test, sample, columns, target, seed=0)
    assert all(np.isfinite(v) for v in scores.values()), scores


def test_baselines_refuse_values_outside_the_schema(adult):
    train = adult["train"].copy()
    train.loc[train.index[0], "workclass"] = "Astronaut"
    with pytest.raises(ValueError, match="'workclass'.*Astronaut"):
        IndependentMarginals().fit(train, adult["columns"])


@pytest.mark.slow  # CI budget
def test_gaussian_copula_beats_independent_marginals_on_adult(adult):
    train, columns, target = adult["train"], adult["columns"], adult["target"]
    independent = IndependentMarginals().fit(train, columns).sample(ROWS, seed=0)
    copula = GaussianCopula().fit(train, columns).sample(ROWS, seed=0)
    trend_independent, trend_copula = pair_trend(train, independent, columns), pair_trend(train, copula, columns)
    assert trend_copula["pair_trend"] > trend_independent["pair_trend"] + 0.004
    assert trend_copula["pair_trend_correlation"] > trend_independent["pair_trend_correlation"] + 0.005
    # the copula links income to the other columns, independent marginals cannot
    held_out = adult["test"]
    auc = {name: evaluate_synthetic(train, held_out, table, columns, target, seed=0)["mle_auc"]
           for name, table in (("independent", independent), ("copula", copula))}
    assert auc["independent"] < 0.65 < 0.75 < auc["copula"]


def test_imputation_auc_on_real_labels(adult):
    truth = adult["test"]["income"].to_numpy()
    positive = (truth == ">50K").astype(float)
    noise = np.random.default_rng(0).random(len(truth))
    assert imputation_auc(truth, positive, ">50K") == 1.0
    assert imputation_auc(list(truth), 1 - positive, ">50K") == 0.0
    assert 0.45 < imputation_auc(truth, noise, ">50K") < 0.55
    assert 0.7 < imputation_auc(truth, 0.5 * positive + noise, ">50K") < 1.0
    with pytest.raises(ValueError, match="both classes"):
        imputation_auc(truth, noise, ">50k")  # wrong spelling: no row is positive
    with pytest.raises(ValueError, match="one probability per row"):
        imputation_auc(truth, noise[:-1], ">50K")


def test_report_lists_every_metric_and_method(scored, tmp_path):
    results = {"tabdiff": scored["corrupted"], "independent": scored["shuffled"], REAL: scored["real"]}
    results["tabdiff"] = {**results["tabdiff"], "imputation_auc": 0.9, "c2st": float("nan")}
    context = {"dataset": "adult (test subset)", "rows": 1500, "seed": 0, "step": 10, "command": "pytest"}
    write_report(tmp_path / "report.md", results, context)
    text = (tmp_path / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert all(method in header for method in results)
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert {k for values in results.values() for k in values} <= rows
    assert "**higher**: column_shape, pair_trend, c2st" in text and "**closer to 0.5**: dcr_share" in text
    assert all(f"- {key}: " in text for key in context)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["results"]["tabdiff"]["c2st"] is None  # NaN has no JSON form
    assert saved["results"][REAL]["pair_trend"] == pytest.approx(scored["real"]["pair_trend"])
    assert saved["context"] == context


@pytest.mark.slow  # CI budget: the TabDiff run in test_tabdiff.py writes the same report with both baselines
def test_baseline_report_command_end_to_end(adult, tmp_path, capsys):
    assert main(["--data", str(adult["path"]), "--out", str(tmp_path), "--rows", "1000"]) == 0
    text = (tmp_path / "report.md").read_text()
    for method in ("independent", "gaussian_copula", REAL):
        assert method in text
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["results"]["gaussian_copula"]["rows_synthetic"] == 1000
    assert saved["results"]["gaussian_copula"]["pair_trend"] > saved["results"]["independent"]["pair_trend"]
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "scaleyard data build" in capsys.readouterr().err


def test_metrics_name_the_bad_column(adult):
    train, columns, target = adult["train"], adult["columns"], adult["target"]
    with pytest.raises(ValueError, match="no column 'age'"):
        evaluate_synthetic(train, train, train.drop(columns="age"), columns, target, seed=0)
    text_age = train.assign(age="old")
    with pytest.raises(ValueError, match="'age'.*non-numbers"):
        evaluate_synthetic(train, train, text_age, columns, target, seed=0)
