"""QM9 molecules (DFT geometries, SMILES, quantum properties) from the qm9pack wheel."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import numpy as np

from scaleyard.data_loaders.builders import Split, package_folder, require_file

INSTALL = "pip install qm9pack==1.0.3"
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
PROPERTIES = {
    "mu": "Dipole_debye", "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au", "r2": "R2_bohr2", "zpve": "ZPVE_au", "u0": "InternalEnergy_0K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}  # fmt: skip
TEST_EVERY = 10  # every 10th molecule (by QM9 index) is held out
# `tfg_splits=True` (TFG-Flow): four disjoint parts by QM9 index % 10, so a molecule's part never
# depends on --limit or on which other molecules exist. The flow model, its guidance predictor and
# the oracle that scores guided samples must never see each other's molecules.
TFG_SPLITS = {"heldout": (0,), "oracle": (1, 2, 3), "guide": (4, 5), "flow": (6, 7, 8, 9)}


def read_table(limit: int | None):
    import pandas as pd

    folder = package_folder("qm9pack", INSTALL) / "data"
    parts = [require_file(folder / f"qm9_part{i}.csv", "qm9pack", INSTALL) for i in (1, 2, 3)]
    columns = ["Index", "SMILES", "Elements", "XYZ_Ang", *PROPERTIES.values()]
    frames = []
    remaining = limit
    for part in parts:
        frame = pd.read_csv(part, usecols=columns, nrows=remaining)
        frames.append(frame)
        if remaining is not None:
            remaining -= len(frame)
            if remaining <= 0:
                break
    return pd.concat(frames, ignore_index=True).sort_values("Index", kind="stable")


def splits(limit: int | None = None, heavy_atoms_only: bool = False, tfg_splits: bool = False) -> list[Split]:
    table_cache: list = []

    def rows(remainders: tuple[int, ...]) -> Iterator[dict]:
        if not table_cache:
            table_cache.append(read_table(None if limit is None else (limit + 1) * TEST_EVERY))
        table = table_cache[0]
        written = 0
        for row in table.itertuples(index=False):
            if int(row.Index) % TEST_EVERY not in remainders:
                continue
            if limit is not None and written >= limit:
                return
            symbols = ast.literal_eval(row.Elements)
            coords = np.asarray(ast.literal_eval(row.XYZ_Ang), dtype=np.float32)
            numbers = np.asarray([ATOMIC_NUMBERS[s] for s in symbols], dtype=np.int64)
            if heavy_atoms_only:
                keep = numbers != 1
                numbers, coords = numbers[keep], coords[keep]
            props = {name: float(getattr(row, column)) for name, column in PROPERTIES.items()}
            written += 1
            yield {
                "__key__": f"{int(row.Index):06d}",
                "atoms.npy": numbers,
                "pos.npy": coords,
                "smiles.txt": row.SMILES,
                "json": {"index": int(row.Index), "num_atoms": int(len(numbers)), **props},
            }

    schema = {"atoms.npy": "int64[n] atomic numbers", "pos.npy": "float32[n,3] angstrom",
              "smiles.txt": "SMILES", "json": "properties: " + ",".join(PROPERTIES)}
    extra = {"properties": list(PROPERTIES), "heavy_atoms_only": heavy_atoms_only,
             "atom_types": ATOMIC_NUMBERS}
    if tfg_splits:
        rule = {name: f"QM9 index % {TEST_EVERY} in {list(rest)}" for name, rest in TFG_SPLITS.items()}
        return [Split(name, lambda rest=rest: rows(rest), schema, {**extra, "split_rule": rule[name],
                                                                   "tfg_splits": rule})
                for name, rest in TFG_SPLITS.items()]
    train = tuple(r for r in range(TEST_EVERY) if r != 0)
    return [Split("train", lambda: rows(train), schema, extra), Split("test", lambda: rows((0,)), schema, extra)]
