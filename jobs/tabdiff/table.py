"""Table schema and conversions for the tabdiff job: the index's `extra.columns` schema, whole
splits read in a fixed order, and tensors <-> pandas DataFrames with the original column names
(numerical columns float64, categorical columns str)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaleyard.data_loaders.decoders import TableDecoder
from scaleyard.data_loaders.index import INDEX_FILE, DataError, ShardIndex, load_index
from scaleyard.data_loaders.pipeline import first_samples

if TYPE_CHECKING:  # pandas is imported where used: every process that lists the jobs imports this module
    import pandas as pd

KINDS = ("numerical", "categorical")


@dataclass(frozen=True)
class Schema:
    columns: tuple[dict[str, Any], ...]  # in table order: {name, kind, categories?}
    target: str = ""

    @property
    def numerical(self) -> list[str]:
        return [c["name"] for c in self.columns if c["kind"] == "numerical"]

    @property
    def categorical(self) -> list[dict[str, Any]]:
        return [c for c in self.columns if c["kind"] == "categorical"]

    @property
    def categories(self) -> tuple[int, ...]:
        return tuple(len(c["categories"]) for c in self.categorical)

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.columns]

    def to_state(self) -> dict[str, Any]:
        return {"columns": [dict(c) for c in self.columns], "target": self.target}

    @classmethod
    def from_state(cls, state: dict[str, Any], where: str) -> Schema:
        return cls(tuple(check_columns(state.get("columns"), where)), state.get("target", ""))


def check_columns(columns: Any, where: str) -> list[dict[str, Any]]:
    """The schema list, or an error naming `where` and what is wrong with it."""
    if not isinstance(columns, list) or not columns:
        raise DataError(f"{where} has no table schema: its 'extra.columns' must list "
                        "{name, kind: numerical|categorical, categories} (see data_loaders/builders/adult.py)")
    seen = set()
    out = []
    for column in columns:
        name, kind = column.get("name"), column.get("kind")
        if not name or kind not in KINDS:
            raise DataError(f"{where}: schema column {column!r} needs a name and kind numerical|categorical")
        if name in seen:
            raise DataError(f"{where}: schema column {name!r} appears twice")
        seen.add(name)
        if kind == "categorical":
            categories = column.get("categories")
            if not categories or len(set(map(str, categories))) != len(categories):
                raise DataError(f"{where}: categorical column {name!r} needs a list of distinct 'categories'")
            column = {"name": name, "kind": kind, "categories": [str(c) for c in categories]}
        else:
            column = {"name": name, "kind": kind}
        out.append(column)
    return out


def schema_of(index: ShardIndex) -> Schema:
    where = f"{index.root}/{INDEX_FILE}"
    columns = check_columns(index.extra.get("columns"), where)
    target = index.extra.get("target", "")
    if target and target not in {c["name"] for c in columns}:
        raise DataError(f"{where}: extra.target {target!r} is not one of its columns")
    return Schema(tuple(columns), target)


def read_split(index: ShardIndex, schema: Schema, limit: int = 0,
               batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` rows (0 = all) of a split in its fixed order: (numbers [N, n_num] float64
    as written, class indices [N, n_cat]). Identical on every rank that calls it."""
    decode = TableDecoder(schema.columns)
    count = index.total if limit <= 0 else min(limit, index.total)
    nums, cats = [], []
    for item in first_samples(index, decode, count, batch):
        nums.append(item["numeric"].double())
        cats.append(item["categorical"])
    return torch.cat(nums), torch.cat(cats)


def is_holdout(key: str, share: float, salt: str) -> bool:
    """Whether the row with sample key `key` belongs to the validation split carved from train: a
    CRC-32 of salt/key below share x 2^32. Depends on the key alone, so every rank, worker, resume
    and re-read agrees without storing a list."""
    return zlib.crc32(f"{salt}/{key}".encode()) < share * 2**32


@dataclass(frozen=True)
class HoldoutDecoder:
    """TableDecoder plus a `holdout` flag per row (the validation split, see `is_holdout`)."""

    columns: tuple[dict[str, Any], ...]
    share: float
    salt: str

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        row = TableDecoder(self.columns)(raw, position)
        row["holdout"] = torch.tensor(is_holdout(str(raw["__key__"]), self.share, self.salt))
        return row


def read_split_holdout(index: ShardIndex, schema: Schema, share: float, salt: str,
                       batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train numbers, train classes, validation numbers, validation classes) of a whole split,
    the validation rows chosen by `is_holdout`, each part in the split's fixed order."""
    decode = HoldoutDecoder(schema.columns, share, salt)
    nums, cats, flags = [], [], []
    for item in first_samples(index, decode, index.total, batch):
        nums.append(item["numeric"].double())
        cats.append(item["categorical"])
        flags.append(item["holdout"])
    num, cat, held = torch.cat(nums), torch.cat(cats), torch.cat(flags)
    return num[~held], cat[~held], num[held], cat[held]


def to_frame(numerical: torch.Tensor, categorical: torch.Tensor, schema: Schema) -> pd.DataFrame:
    """Tensors -> DataFrame in the schema's column order."""
    import pandas as pd

    data: dict[str, Any] = {}
    num_at = {name: i for i, name in enumerate(schema.numerical)}
    cat_at = {c["name"]: i for i, c in enumerate(schema.categorical)}
    nums, cats = numerical.double().numpy(), categorical.long().numpy()
    for column in schema.columns:
        name = column["name"]
        if column["kind"] == "numerical":
            data[name] = nums[:, num_at[name]].astype(np.float64)
        else:
            labels = np.asarray(column["categories"], dtype=object)
            data[name] = labels[cats[:, cat_at[name]]]
    return pd.DataFrame(data, columns=schema.names)


def from_frame(frame: pd.DataFrame, schema: Schema, free: set[str], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DataFrame -> (numbers, class indices). Columns in `free` (to be imputed) may be absent or
    hold anything; every other schema column must be present with values the schema allows."""
    import pandas as pd

    missing = [n for n in schema.names if n not in frame.columns and n not in free]
    if missing:
        raise DataError(f"{where} lacks known column(s) {missing}; it needs every column except the imputed ones")
    rows = len(frame)
    nums = np.zeros((rows, len(schema.numerical)), dtype=np.float64)
    cats = np.zeros((rows, len(schema.categorical)), dtype=np.int64)
    for j, name in enumerate(schema.numerical):
        if name in free:
            continue
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DataError(f"{where}: numerical column {name!r} has a missing or non-numeric value in row {row} "
                            f"({frame[name].iloc[row]!r}); impute it with --impute {name} or fix the file")
        nums[:, j] = values
    for j, column in enumerate(schema.categorical):
        name = column["name"]
        if name in free:
            continue
        lookup = {c: i for i, c in enumerate(column["categories"])}
        labels = frame[name].astype(str).to_numpy()
        codes = np.array([lookup.get(v, -1) for v in labels], dtype=np.int64)
        if (codes < 0).any():
            bad = labels[codes < 0][0]
            raise DataError(f"{where}: column {name!r} has value {bad!r} outside its schema categories "
                            f"{column['categories'][:10]}{'...' if len(column['categories']) > 10 else ''}")
        cats[:, j] = codes
    return torch.from_numpy(nums), torch.from_numpy(cats)


def read_rows(path: str | Path, schema: Schema, free: set[str]) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """Known rows for imputation from a .csv / .parquet file or a split folder (with index.json)."""
    import pandas as pd

    path = Path(path)
    if path.is_dir() or path.name == INDEX_FILE:
        index = load_index(path)
        nums, cats = read_split(index, schema)
        frame = to_frame(nums, cats, schema)
        return frame, nums, cats
    if not path.exists():
        raise FileNotFoundError(f"--known {path} does not exist; pass a .csv/.parquet file or a split folder")
    if path.suffix == ".csv":
        dtypes = {c["name"]: str for c in schema.categorical}
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=False)
    elif path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise DataError(f"--known {path}: use a .csv or .parquet file, or a split folder holding index.json")
    nums, cats = from_frame(frame, schema, free, str(path))
    return frame, nums, cats


def write_rows(frame: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".csv":
        frame.to_csv(tmp, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        raise DataError(f"--out {path}: the file name must end in .csv or .parquet")
    tmp.rename(path)  # a reader never sees half a file
