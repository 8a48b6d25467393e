"""`scaleyard scaling PATH`: fit a sweep's runs and write plots, a markdown table and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scaleyard.platform.scaling import Runs, compute_optimal, fit_chinchilla, fit_isoflop, fit_power_law


def load_runs(path: Path) -> Runs:
    """Runs from a CSV (columns params, tokens and/or compute, loss) or from the summary.json of
    every finished run below a sweep folder (keys params, samples_seen, compute_flops, and
    eval.loss if present, else final_loss)."""
    path = Path(path)
    if path.suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(path)
        missing = {"params", "loss"} - set(frame.columns)
        if missing or not ({"tokens", "compute"} & set(frame.columns)):
            raise ValueError(f"{path}: needs columns params, loss and tokens and/or compute; has {list(frame.columns)}")
        params = frame["params"].to_numpy(float)
        tokens = frame["tokens"].to_numpy(float) if "tokens" in frame else frame["compute"] / (6 * params)
        compute = frame["compute"].to_numpy(float) if "compute" in frame else 6 * params * tokens
        return Runs(params, tokens, compute, frame["loss"].to_numpy(float))
    rows = []
    for summary_file in sorted(path.rglob("summary.json")):
        summary = json.loads(summary_file.read_text())
        if not {"params", "samples_seen", "compute_flops"} <= summary.keys():
            continue
        loss = summary.get("eval", {}).get("loss", summary["final_loss"])
        rows.append((summary["params"], summary["samples_seen"], summary["compute_flops"], loss))
    if not rows:
        raise ValueError(f"no finished runs with params/samples_seen/compute_flops below {path}")
    return Runs(*map(np.array, zip(*rows)))


def write_report(runs: Runs, out: Path, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"runs": len(runs)}
    report["power_law"] = _fit_dict(fit_power_law(runs, bootstrap, seed))
    try:
        isoflop, optima = fit_isoflop(runs, bootstrap, seed)
        report["isoflop"] = {**_fit_dict(isoflop), "per_budget": optima}
    except ValueError as err:
        report["isoflop"] = {"error": str(err)}
    try:
        chinchilla = fit_chinchilla(runs, bootstrap, seed)
        report["chinchilla"] = _fit_dict(chinchilla)
        budgets = sorted(set(runs.compute.tolist()))
        report["compute_optimal"] = [{"compute": c, **compute_optimal(chinchilla.values, c)} for c in budgets]
    except ValueError as err:
        report["chinchilla"] = {"error": str(err)}
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    (out / "scaling.md").write_text(markdown(report))
    plot(runs, report, out)
    return report


def _fit_dict(fit) -> dict[str, Any]:
    return {"values": fit.values, "ci95": {k: list(v) for k, v in fit.intervals.items()}}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Scaling-law fits ({report['runs']} runs)", ""]
    for name, title in (("power_law", "Loss vs compute: L = E + A C^-alpha"),
                        ("isoflop", "IsoFLOP optima: N* = k C^a"),
                        ("chinchilla", "Parametric: L = E + A/N^alpha + B/D^beta (Huber, delta 1e-3)")):
        lines += [f"## {title}", ""]
        fit = report.get(name, {})
        if "error" in fit:
            lines += [f"not fitted: {fit['error']}", ""]
            continue
        lines += ["| parameter | estimate | 95% bootstrap interval |", "|---|---|---|"]
        for key, value in fit["values"].items():
            low, high = fit["ci95"].get(key, (float("nan"), float("nan")))
            lines.append(f"| {key} | {value:.4g} | {low:.4g} - {high:.4g} |")
        lines.append("")
    optima = report.get("isoflop", {}).get("per_budget", [])
    if optima:
        lines += ["## IsoFLOP optimum per budget", "",
                  "| compute (FLOPs) | N* | loss at N* | inside the sampled sizes |", "|---|---|---|---|"]
        lines += [f"| {o['compute']:.3g} | {o['optimal_params']:.3g} | {o['optimal_loss']:.4g} | "
                  f"{'yes' if o['inside_sampled_sizes'] else 'no (extrapolated)'} |" for o in optima]
        lines.append("")
    if "compute_optimal" in report:
        lines += ["## Compute-optimal size per budget (parametric fit)", "", "| compute (FLOPs) | N* | D* |",
                  "|---|---|---|"]
        lines += [f"| {r['compute']:.3g} | {r['params']:.3g} | {r['tokens']:.3g} |" for r in report["compute_optimal"]]
    return "\n".join(lines) + "\n"


def plot(runs: Runs, report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    scatter = left.scatter(runs.compute, runs.loss, c=np.log10(runs.params), cmap="viridis", s=14)
    figure.colorbar(scatter, ax=left, label="log10 params")
    law = report["power_law"]["values"]
    grid = np.geomspace(runs.compute.min(), runs.compute.max(), 100)
    left.plot(grid, law["E"] + law["A"] * grid ** -law["alpha"], "k--",
              label=f"E + A C^-{law['alpha']:.3f}")
    left.set(xscale="log", yscale="log", xlabel="compute (FLOPs)", ylabel="loss", title="loss vs compute")
    left.legend()
    if "per_budget" in report.get("isoflop", {}):
        for budget in report["isoflop"]["per_budget"]:
            same = np.isclose(runs.compute, budget["compute"], rtol=0.05)
            right.plot(runs.params[same], runs.loss[same], "o-", ms=3, label=f"{budget['compute']:.2g}")
            right.plot(budget["optimal_params"], budget["optimal_loss"], "k*")
        right.set(xscale="log", xlabel="params", ylabel="loss", title="IsoFLOP curves (star: fitted optimum)")
        if len(report["isoflop"]["per_budget"]) <= 8:
            right.legend(title="FLOPs", fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "scaling.png", dpi=120)
    plt.close(figure)
