"""Multi-objective BO acquisitions on BoTorch's test problems: dominated hypervolume of the
evaluated points vs evaluations, for random, qLogNEHVI (myopic) and the non-myopic BINOM, Joint
and Nested (horizon H), one evaluation per iteration as in the paper, over several seeds. Every
method of a seed starts from the same scrambled-Sobol design of 2(d+1) points.

    python benchmarks/mobo.py                      # modest: 2 seeds x 5 evaluations, minutes on 2 cores
    python benchmarks/mobo.py --seeds 3 --iterations 8 --out runs/bench/mobo       # the README's numbers
    python benchmarks/mobo.py --seeds 3 --first-seed 3 --iterations 8 --out runs/bench/mobo-b
    python benchmarks/mobo.py --summarize <(cat runs/bench/mobo/runs.jsonl runs/bench/mobo-b/runs.jsonl) --out D

Prints JSON (per problem and method: mean and standard error over seeds of the final hypervolume,
and of its share of the problem's best known hypervolume where BoTorch gives one; seconds per
proposal) and writes hv.png (mean +- standard error vs evaluations) and mobo.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from botorch.test_functions.multi_objective import DTLZ2, ZDT3, BraninCurrin, VehicleSafety
from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning

from scaleyard.platform.mobo_acquisition import ACQUISITIONS, DTYPE, Effort, propose

PROBLEMS = {
    "branin_currin": lambda: BraninCurrin(negate=True),
    "dtlz2": lambda: DTLZ2(dim=4, num_objectives=2, negate=True),
    "vehicle_safety": lambda: VehicleSafety(negate=True),
    "zdt3": lambda: ZDT3(dim=4, num_objectives=2, negate=True),
}


def hypervolume(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(DominatedPartitioning(ref_point=ref, Y=y).compute_hypervolume())


def one_run(problem_name: str, method: str, seed: int, iterations: int, horizon: int, effort: Effort) -> dict:
    """One seed of one method: hypervolume after the initial design and after each evaluation."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    problem = PROBLEMS[problem_name]().to(DTYPE)
    low, high = problem.bounds[0], problem.bounds[1]
    d = low.shape[0]

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        return problem(low + x * (high - low))

    ref = problem.ref_point.to(DTYPE)
    x = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(2 * (d + 1), dtype=DTYPE)
    y = evaluate(x)
    hvs, seconds = [hypervolume(y, ref)], []
    for it in range(iterations):
        start = time.perf_counter()
        new = propose(x, y, ref, 1, method, horizon, effort, seed=1000 * seed + it)
        seconds.append(time.perf_counter() - start)
        x, y = torch.cat([x, new]), torch.cat([y, evaluate(new)])
        hvs.append(hypervolume(y, ref))
    try:
        best = float(problem.max_hv)
    except (NotImplementedError, AttributeError, ValueError):
        best = None
    return {"problem": problem_name, "method": method, "seed": seed, "hv": hvs, "seconds": seconds,
            "max_hv": best, "initial": 2 * (d + 1)}


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for run in runs:
        out.setdefault(run["problem"], {}).setdefault(run["method"], []).append(run)
    table: dict = {}
    for problem, methods in out.items():
        table[problem] = {}
        for method, rs in methods.items():
            finals = [r["hv"][-1] for r in rs]
            mean, se = _mean_se(finals)
            curve = [sum(r["hv"][i] for r in rs) / len(rs) for i in range(len(rs[0]["hv"]))]
            proposals = max(sum(len(r["seconds"]) for r in rs), 1)
            row = {"final_hv_mean": mean, "final_hv_se": se, "seeds": len(rs),
                   "seconds_per_proposal": sum(sum(r["seconds"]) for r in rs) / proposals,
                   "hv_curve_mean": curve, "initial": rs[0]["initial"]}
            if rs[0]["max_hv"]:
                share = [f / rs[0]["max_hv"] for f in finals]
                row["final_share_of_max_hv_mean"], row["final_share_of_max_hv_se"] = _mean_se(share)
            table[problem][method] = row
    return table


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in runs})
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.4), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        for method in ACQUISITIONS:
            rs = [r for r in runs if r["problem"] == problem and r["method"] == method]
            if not rs:
                continue
            steps = range(rs[0]["initial"], rs[0]["initial"] + len(rs[0]["hv"]))
            stats = [_mean_se([r["hv"][i] for r in rs]) for i in range(len(rs[0]["hv"]))]
            mean = [m for m, _ in stats]
            se = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.plot(list(steps), mean, label=method)
            ax.fill_between(list(steps), [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                            alpha=0.2)
        ax.set_title(problem)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("dominated hypervolume")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated: " + ", ".join(PROBLEMS))
    parser.add_argument("--methods", default=",".join(ACQUISITIONS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--iterations", type=int, default=5, help="evaluations after the initial design")
    parser.add_argument("--horizon", type=int, default=2)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--raw-samples", type=int, default=32)
    parser.add_argument("--mc-samples", type=int, default=Effort.mc_samples)
    parser.add_argument("--maxiter", type=int, default=20)
    parser.add_argument("--fantasies", type=int, default=Effort.fantasies)
    parser.add_argument("--jobs", type=int, default=2, help="processes (one run per process at a time)")
    parser.add_argument("--out", default="runs/bench/mobo")
    parser.add_argument("--summarize", default=None, help="only summarize and plot the runs.jsonl of an earlier "
                                                          "(or unfinished) benchmark into --out")
    args = parser.parse_args()
    if args.summarize:
        runs = [json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line.strip()]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        report(runs, {"summarized": args.summarize, "runs": len(runs)}, Path(args.out))
        return
    effort = Effort(restarts=args.restarts, raw_samples=args.raw_samples, mc_samples=args.mc_samples,
                    maxiter=args.maxiter, fantasies=args.fantasies)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    work = [(p, m, s, args.iterations, args.horizon, effort) for s in seeds
            for p in args.problems.split(",") for m in args.methods.split(",")]
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with (out / "runs.jsonl").open("w") as log:  # each run as it ends: a long benchmark stopped early still tells
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                for run in pool.map(one_run, *zip(*work)):
                    runs.append(run)
                    log.write(json.dumps(run) + "\n")
                    log.flush()
        else:
            for w in work:
                runs.append(one_run(*w))
                log.write(json.dumps(runs[-1]) + "\n")
                log.flush()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "summarize")}
    report(runs, {**settings, "seconds": time.perf_counter() - start}, out)


def report(runs: list[dict], settings: dict, out: Path) -> None:
    result = {"settings": settings, "results": summarize(runs)}
    (out / "mobo.json").write_text(json.dumps({**result, "runs": runs}, indent=1))
    plot(runs, out / "hv.png")
    brief = {p: {m: {k: v for k, v in row.items() if k != "hv_curve_mean"} for m, row in ms.items()}
             for p, ms in result["results"].items()}
    print(json.dumps({"settings": result["settings"], "results": brief}, indent=1))


if __name__ == "__main__":
    main()
