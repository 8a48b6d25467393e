"""TrAct vs plain training of classify at equal steps, several seeds, on Fashion-MNIST shards.

    python benchmarks/tract.py [--data data/fashion_mnist] [--preset tiny] [--steps 200]
                               [--seeds 0 1 2] [--evals 5] [--eval-samples 2000] [--target 0.7]

Each (seed, tract on/off) pair is a real `classify` run through the Trainer (in-process), evaluated
`--evals` times on the first `--eval-samples` test images. Prints JSON: per-run accuracy curves,
the final accuracy with and without TrAct (mean and spread over seeds), and the steps each took to
first reach `--target` accuracy (None: never within the run), with their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from scaleyard.jobs.classify.job import Classify
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.launch import prepare, write_config
from scaleyard.platform.trainer import Trainer


class Recording(Classify):
    """classify that keeps each evaluation's accuracy (step -> accuracy)."""

    def __init__(self) -> None:
        super().__init__()
        self.curve: dict[int, float] = {}

    def evaluate(self, model, step):
        result = super().evaluate(model, step)
        self.curve[step] = result.metrics.get("accuracy", float("nan"))
        return result


def one_run(args: argparse.Namespace, seed: int, tract: bool, folder: Path) -> dict:
    every = max(1, args.steps // args.evals)
    overrides = [f"data.path={args.data}/train", f"data.eval_path={args.data}/test", f"run.seed={seed}",
                 f"train.steps={args.steps}", f"train.eval_every={every}", f"train.ckpt_every={args.steps}",
                 f"eval.max_samples={args.eval_samples}", f"optim.tract={str(tract).lower()}",
                 f"optim.tract_lambda={args.tract_lambda}", f"run.dir={folder / f'seed{seed}_tract{int(tract)}'}"]
    prepared = prepare("classify", overrides, preset=args.preset)
    write_config(prepared)
    job = Recording()
    start = time.perf_counter()
    Trainer(job, prepared.cfg, DistEnv(), handle_signals=False).run()
    reached = next((step for step, acc in sorted(job.curve.items()) if acc >= args.target), None)
    return {"seed": seed, "tract": tract, "curve": job.curve, "final_accuracy": job.curve[args.steps],
            "steps_to_target": reached, "seconds": round(time.perf_counter() - start, 1)}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fashion_mnist")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evals", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--tract-lambda", type=float, default=0.1)
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the Trainer's per-step lines would drown the JSON
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for tract in (False, True):
                runs.append(one_run(args, seed, tract, Path(tmp)))
    by = {flag: [r for r in runs if r["tract"] == flag] for flag in (False, True)}
    report = {
        "preset": args.preset, "steps": args.steps, "seeds": args.seeds, "tract_lambda": args.tract_lambda,
        "target_accuracy": args.target,
        "final_accuracy": {"plain": spread([r["final_accuracy"] for r in by[False]]),
                           "tract": spread([r["final_accuracy"] for r in by[True]])},
        "steps_to_target": {"plain": [r["steps_to_target"] for r in by[False]],
                            "tract": [r["steps_to_target"] for r in by[True]]},
        "runs": runs,
    }
    pairs = [(p["steps_to_target"], t["steps_to_target"]) for p, t in zip(by[False], by[True])]
    ratios = [p / t for p, t in pairs if p and t]
    report["steps_ratio_plain_over_tract"] = spread(ratios) if ratios else None
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
