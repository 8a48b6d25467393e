"""Fit the two baselines on a table dataset's train split and write their evaluation report.

    python -m scaleyard.jobs.tabdiff.baseline_report --data data/adult --out runs/tabdiff_baselines

Also scores a real reference: half of the test split (as if it were synthetic) against train, with
the other half as the test split, so every metric has a "real data" value to read the others by.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scaleyard.data_loaders.index import DataError, check_shards, load_index
from scaleyard.jobs.tabdiff.baselines import GaussianCopula, IndependentMarginals
from scaleyard.jobs.tabdiff.metrics import describe, evaluate_synthetic
from scaleyard.jobs.tabdiff.paper_metrics import evaluate_paper
from scaleyard.jobs.tabdiff.report import write_report

REAL = "real (train vs test)"
CEILING = "real held-out (ceiling)"  # the same name as the job's row


def load_table(folder: str | Path) -> tuple[pd.DataFrame, list[dict], str]:
    """(rows, schema columns, target) of a table split built by `scaleyard data build` (e.g. adult):
    each sample's `json` member is one row; the schema sits in the index's `extra`."""
    index = load_index(folder)
    check_shards(index)
    columns, target = index.extra.get("columns"), index.extra.get("target")
    if not columns or not target:
        raise DataError(f"{index.root}/index.json has no table schema ('columns' and 'target' in extra); "
                        "point --data at a table dataset such as one built by `scaleyard data build adult`")
    rows = []
    for shard in index.shards:
        with tarfile.open(index.shard_url(shard)) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    rows.append(json.loads(tar.extractfile(member).read()))
    names = [c["name"] for c in columns]
    frame = pd.DataFrame(rows)
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise DataError(f"rows in {index.root} lack schema columns {missing}; rebuild the dataset")
    frame = frame[names]
    for column in columns:
        name = column["name"]
        frame[name] = frame[name].astype(np.float64) if column["kind"] == "numerical" else frame[name].astype(str)
    return frame, columns, target


def run(data: Path, out: Path, seed: int = 0, rows: int | None = None, command: str = "",
        paper: bool = True, mle_grid: str = "paper") -> dict[str, Any]:
    started = time.perf_counter()
    train, columns, target = load_table(data / "train")
    test, _, _ = load_table(data / "test")
    n = rows or len(train)
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}
    results: dict[str, dict[str, float]] = {}
    protocol: dict[str, dict[str, float]] = {}
    order = np.random.default_rng(seed).permutation(len(test))
    half = len(test) // 2
    for name, model in (("independent", IndependentMarginals()), ("gaussian_copula", GaussianCopula(seed))):
        tick = time.perf_counter()
        synthetic = model.fit(train, columns).sample(n, seed)
        timings[f"{name}_fit_sample_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        results[name] = evaluate_synthetic(train, test, synthetic, columns, target, seed)
        timings[f"{name}_eval_s"] = time.perf_counter() - tick
        print(f"{name}: {describe(results[name])}", flush=True)
        if paper:
            tick = time.perf_counter()
            protocol[name] = evaluate_paper(train, test, synthetic, columns, target, seed, mle_grid=mle_grid)
            timings[f"{name}_paper_s"] = time.perf_counter() - tick
            print(f"{name} (paper protocol): {protocol[name]}", flush=True)
    tick = time.perf_counter()
    results[REAL] = evaluate_synthetic(train, test.iloc[order[half:]], test.iloc[order[:half]], columns, target, seed)
    timings["real_eval_s"] = time.perf_counter() - tick
    print(f"{REAL}: {describe(results[REAL])}", flush=True)
    if paper:  # the ceiling: held-out real rows scored as if synthetic
        tick = time.perf_counter()
        protocol[CEILING] = evaluate_paper(train, test.iloc[order[half:]], test.iloc[order[:half]], columns, target,
                                           seed, mle_grid=mle_grid)
        timings["ceiling_paper_s"] = time.perf_counter() - tick
        print(f"{CEILING} (paper protocol): {protocol[CEILING]}", flush=True)
    timings["total_s"] = time.perf_counter() - started
    context = {
        "dataset": str(data), "rows": f"train {len(train)}, test {len(test)}, synthetic {n}", "seed": seed,
        "step": "-", "command": command, "target": target,
        "real reference": f"{half} test rows scored as synthetic; the other {len(test) - half} are its test split",
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_report(out / "report.md", results, context, paper=protocol or None)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder with train/ and test/ splits")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows per baseline (default: train size)")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-protocol metrics (minutes on Adult)")
    parser.add_argument("--mle-grid", choices=("paper", "quick"), default="paper",
                        help="XGBoost grid of the paper-protocol MLE (paper: the reference's 36 points)")
    args = parser.parse_args(argv)
    shown = argv if argv is not None else sys.argv[1:]
    command = "python -m scaleyard.jobs.tabdiff.baseline_report " + shlex.join(shown)
    try:
        run(args.data, args.out, args.seed, args.rows, command, paper=not args.no_paper, mle_grid=args.mle_grid)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
