"""Expected numbers for tests/test_tabdiff_paper_metrics.py, computed by the reference libraries.

sdmetrics (and synthcity) pin pandas<3, so they live in a scratch environment, not in .venv:

    python -m venv /tmp/sdm && /tmp/sdm/bin/pip install sdmetrics==0.32.0
    /tmp/sdm/bin/pip download synthcity==0.2.12 --no-deps -d /tmp/synthcity_dl
    (cd /tmp/synthcity_dl && unzip -o -q synthcity-0.2.12-py3-none-any.whl -d x)
    /tmp/sdm/bin/python tests/reference/tabdiff_paper_expected.py /tmp/synthcity_dl/x

It prints JSON: sdmetrics' QualityReport (Column Shapes, Column Pair Trends over every pair, and
that report's 0.32 default which skips weakly associated real pairs) and LogisticDetection
(its folds drawn after np.random.seed(SEED), which equals StratifiedKFold(random_state=SEED)), and
synthcity's AlphaPrecision naive scores. synthcity imports torch and more at module level, so its
two methods (`metrics`, `_normalize_covariates`) are taken from the wheel's source and run on a
stand-in for GenericDataLoader with that class's default (the last column is the target).
`fixed_tables` is imported by the test; it needs only NumPy and pandas.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

SEED = 3
COLUMNS = [{"name": "x", "kind": "numerical"}, {"name": "colour", "kind": "categorical"},
           {"name": "age", "kind": "numerical"}, {"name": "gain", "kind": "numerical"},
           {"name": "size", "kind": "categorical"}, {"name": "income", "kind": "categorical"}]
TARGET = "income"


def fixed_tables(rows: int = 300) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(real, synthetic): two draws of one mixed table, the second shifted and less dependent."""
    rng = np.random.default_rng(17)

    def table(shift: float, link: float) -> pd.DataFrame:
        x = rng.normal(shift, 1.0, rows)
        age = np.round(rng.gamma(4.0, 8.0, rows) + 17)
        gain = np.where(rng.random(rows) < 0.85, 0.0, np.round(rng.exponential(3000.0, rows)))
        colour = rng.choice(np.array(["red", "green", "blue"], dtype=object), rows, p=[0.5, 0.3, 0.2])
        size = np.where(link * x + rng.normal(0, 1.0, rows) > 0, "L", "S").astype(object)
        income = np.where(link * x + 0.03 * (age - 40) + rng.normal(0, 1, rows) > 1, ">50K", "<=50K").astype(object)
        return pd.DataFrame({"x": x, "colour": colour, "age": age, "gain": gain, "size": size, "income": income})

    return table(0.0, 1.0), table(0.3, 0.5)


def _synthcity_methods(root: str) -> dict:
    import ast

    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import MinMaxScaler

    source = open(f"{root}/synthcity/metrics/eval_statistical.py").read()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "AlphaPrecision")
    names = {"metrics", "_normalize_covariates"}
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names]
    for method in methods:
        method.decorator_list = []  # pydantic's validate_arguments only checks types
    namespace = {"np": np, "pd": pd, "NearestNeighbors": NearestNeighbors, "MinMaxScaler": MinMaxScaler}
    import typing

    # the annotations synthcity's methods use, evaluated when they are defined
    namespace.update({"Any": typing.Any, "Dict": dict, "Optional": typing.Optional, "Tuple": tuple,
                      "DataLoader": object})
    module = ast.Module(body=methods, type_ignores=[])
    exec(compile(module, "synthcity_alpha", "exec"), namespace)
    return {n: namespace[n] for n in names}


class _Loader:
    """GenericDataLoader's behaviour that _normalize_covariates relies on."""

    def __init__(self, frame: pd.DataFrame):
        frame = frame.copy()
        frame.columns = frame.columns.astype(str)
        self.frame, self.target_column = frame, frame.columns[-1]

    def dataframe(self) -> pd.DataFrame:
        return self.frame

    def train(self) -> _Loader:
        return self


def alpha_reference(real: pd.DataFrame, synthetic: pd.DataFrame, root: str) -> dict:
    from sklearn.preprocessing import OneHotEncoder

    numerical = [c["name"] for c in COLUMNS if c["kind"] == "numerical" and c["name"] != TARGET]
    categorical = [c["name"] for c in COLUMNS if c["kind"] == "categorical" and c["name"] != TARGET] + [TARGET]
    encoder = OneHotEncoder().fit(real[categorical].to_numpy().astype(str))  # as eval/eval_quality.py

    def features(frame: pd.DataFrame) -> pd.DataFrame:
        onehot = encoder.transform(frame[categorical].to_numpy().astype(str)).toarray()
        return pd.DataFrame(np.concatenate([frame[numerical].to_numpy(), onehot], axis=1)).astype(float)

    methods = _synthcity_methods(root)

    class Self:
        _task_type = "classification"

    x, x_syn = methods["_normalize_covariates"](Self(), _Loader(features(real)), _Loader(features(synthetic)))
    out = methods["metrics"](Self(), x.to_numpy(), x_syn.to_numpy(), emb_center=None)
    return {"alpha_precision": out[3], "beta_recall": out[4], "authenticity": out[5]}


def main(root: str) -> None:
    from sdmetrics.reports.single_table import QualityReport
    from sdmetrics.single_table import LogisticDetection

    real, synthetic = fixed_tables()
    metadata = {"columns": {c["name"]: {"sdtype": c["kind"]} for c in COLUMNS}}
    report = QualityReport()
    # sdmetrics >= 0.2x skips pairs whose real correlation / association is weak; the paper's code
    # (sdmetrics unpinned, early 2025) averaged every pair: thresholds 0 restore that
    report.real_correlation_threshold = report.real_association_threshold = 0
    report.generate(real, synthetic, metadata, verbose=False)
    scores = report.get_properties()["Score"].tolist()
    thresholded = QualityReport()
    thresholded.generate(real, synthetic, metadata, verbose=False)
    np.random.seed(SEED)
    c2st = LogisticDetection.compute(real_data=real, synthetic_data=synthetic, metadata=metadata)
    result = {"shape": scores[0], "trend": scores[1], "c2st": c2st,
              "trend_thresholded_0_32": thresholded.get_properties()["Score"].tolist()[1],
              **alpha_reference(real, synthetic, root)}
    print(json.dumps({k: float(v) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
