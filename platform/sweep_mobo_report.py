"""What a mobo sweep has found so far, read from its manifest and its runs' summaries: the Pareto
front, the dominated hypervolume, rounds. `scaleyard status SWEEP` prints `status_lines`;
`scaleyard sweep report SWEEP` writes `write_report`'s plot and tables. No torch: status stays fast
(the hypervolume is computed exactly here, by slicing, for the few dozen runs a sweep has)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from scaleyard.platform.mobo_spec import MoboSpec, Objective

MANIFEST = "manifest.json"  # platform/sweep.py MANIFEST (sweep.py imports this module's readers)
COMPLETED, FAILED = "completed", "failed"


def read_objectives(run_dir: Path, objectives: tuple[Objective, ...]) -> dict[str, float | None] | None:
    """The objectives' values in a finished run's summary.json (None where it lacks one), or None
    when the run has no summary."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    out: dict[str, float | None] = {}
    for o in objectives:
        value = (summary.get("eval") or {}).get(o.name[5:]) if o.name.startswith("eval.") else summary.get(o.name)
        out[o.name] = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
    return out


def mobo_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(sweep_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("spec", {}).get("strategy") == "mobo" else None


def pareto_mask(points: list[list[float]]) -> list[bool]:
    """Which points (maximized) no other point dominates."""
    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(q, p) for q in points) for p in points]


def hypervolume(points: list[list[float]], ref: list[float]) -> float:
    """Volume dominated by `points` (maximized) above `ref`, exact (slices along the last axis)."""
    pts = [p for p in points if all(x > r for x, r in zip(p, ref))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in pts) - ref[0]
    pts.sort(key=lambda p: p[-1], reverse=True)
    volume = 0.0
    for i, p in enumerate(pts):
        below = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if p[-1] > below:
            volume += (p[-1] - below) * hypervolume([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return volume


def rows(sweep_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every proposal with its round, values, state and objectives (fresh from summary.json where
    the driver has not recorded them yet), and whether it is on the Pareto front."""
    mobo = MoboSpec.from_dict(manifest["spec"]["mobo"])
    out = []
    for entry in manifest["runs"]:
        row = {k: entry.get(k) for k in ("name", "round", "values", "state", "objectives", "reason")}
        if row["state"] != FAILED and not row["objectives"]:
            found = read_objectives(Path(sweep_dir) / entry["name"], mobo.objectives)
            if found and all(v is not None for v in found.values()):
                row.update(objectives=found, state=COMPLETED)
        out.append(row)
    done = [r for r in out if r["state"] == COMPLETED and r["objectives"]]
    mask = pareto_mask([[o.to_max(r["objectives"][o.name]) for o in mobo.objectives] for r in done])
    for row in out:
        row["pareto"] = False
    for row, on in zip(done, mask):
        row["pareto"] = on
    return out


def front_and_volume(sweep_dir: Path, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], float | None]:
    mobo = MoboSpec.from_dict(manifest["spec"]["mobo"])
    table = rows(sweep_dir, manifest)
    ref = manifest.get("ref_point")
    done = [[o.to_max(r["objectives"][o.name]) for o in mobo.objectives]
            for r in table if r["state"] == COMPLETED and r["objectives"]]
    volume = hypervolume(done, ref) if ref else None
    return [r for r in table if r["pareto"]], volume


def status_lines(sweep_dir: Path) -> list[str]:
    """For `scaleyard status`: rounds, progress against the budget, hypervolume, the front."""
    manifest = mobo_manifest(sweep_dir)
    if manifest is None:
        return []
    mobo = MoboSpec.from_dict(manifest["spec"]["mobo"])
    table = rows(sweep_dir, manifest)
    front, volume = front_and_volume(sweep_dir, manifest)
    rounds = max((r["round"] for r in table), default=-1) + 1
    done = sum(r["state"] == COMPLETED for r in table)
    failed = sum(r["state"] == FAILED for r in table)
    names = ", ".join(f"{o.name} {o.direction}" + (" (log10)" if o.log else "") for o in mobo.objectives)
    lines = [f"mobo ({mobo.acquisition}" + (f", horizon {mobo.horizon}" if mobo.acquisition in ("binom", "joint",
                                                                                                  "nested") else "")
             + f"): {rounds} round(s), {len(table)}/{mobo.budget} runs proposed, {done} completed, {failed} failed; "
             f"objectives: {names}"]
    if volume is not None:
        lines.append(f"hypervolume {volume:.6g} (objectives maximized: min ones negated, log ones log10; "
                     f"reference point {_fmt_list(manifest['ref_point'])})")
    if front:
        lines.append(f"Pareto front ({len(front)} run(s)):")
        for r in sorted(front, key=lambda r: r["objectives"][mobo.objectives[0].name]):
            objs = " ".join(f"{o.name}={r['objectives'][o.name]:.4g}" for o in mobo.objectives)
            vals = " ".join(f"{k.split('.')[-1]}={v}" for k, v in r["values"].items())
            lines.append(f"  r{r['round']} {r['name']}: {objs}  ({vals})")
    return lines


def _fmt_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def write_report(sweep_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """pareto.png (the first two objectives, front highlighted, one colour per round), pareto.md
    and pareto.csv (every run) under SWEEP/report/ or `out`."""
    sweep_dir = Path(sweep_dir)
    manifest = mobo_manifest(sweep_dir)
    if manifest is None:
        raise FileNotFoundError(f"{sweep_dir} holds no mobo sweep ({MANIFEST} with strategy: mobo)")
    out = Path(out) if out else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    mobo = MoboSpec.from_dict(manifest["spec"]["mobo"])
    table = rows(sweep_dir, manifest)
    front, volume = front_and_volume(sweep_dir, manifest)
    keys = [p.key for p in mobo.space]
    names = [o.name for o in mobo.objectives]
    with (out / "pareto.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "run", "state", "pareto", *keys, *names])
        for r in table:
            objs = r["objectives"] or {}
            writer.writerow([r["round"], r["name"], r["state"], r["pareto"], *[r["values"].get(k) for k in keys],
                             *[objs.get(n) for n in names]])
    lines = [f"# mobo sweep {sweep_dir.name}", "",
             f"{len(table)} runs in {max((r['round'] for r in table), default=-1) + 1} rounds, acquisition "
             f"{mobo.acquisition}" + (f" (horizon {mobo.horizon})" if mobo.acquisition in ("binom", "joint", "nested")
                                     else "") + (f"; hypervolume {volume:.6g}" if volume is not None else ""), "",
             "| round | run | state | front | " + " | ".join(keys + names) + " |",
             "|" + "---|" * (4 + len(keys) + len(names))]
    for r in table:
        objs = r["objectives"] or {}
        cells = [str(r["values"].get(k)) for k in keys] + [f"{objs[n]:.4g}" if objs.get(n) is not None else "-"
                                                            for n in names]
        lines.append(f"| {r['round']} | {r['name']} | {r['state']} | {'*' if r['pareto'] else ''} | "
                     + " | ".join(cells) + " |")
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    _plot(table, mobo, out / "pareto.png")
    return {"runs": len(table), "front": [r["name"] for r in front], "hypervolume": volume, "out": str(out)}


def _plot(table: list[dict[str, Any]], mobo: MoboSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = mobo.objectives[0], mobo.objectives[1]
    done = [r for r in table if r["state"] == COMPLETED and r["objectives"]]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    rounds = sorted({r["round"] for r in done})
    cmap = plt.get_cmap("viridis", max(len(rounds), 1))
    for i, rnd in enumerate(rounds):
        pts = [r for r in done if r["round"] == rnd]
        ax.scatter([r["objectives"][a.name] for r in pts], [r["objectives"][b.name] for r in pts], color=cmap(i),
                   label=f"round {rnd}", s=28, zorder=2)
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["objectives"][a.name])
    if front:
        ax.step([r["objectives"][a.name] for r in front], [r["objectives"][b.name] for r in front],
                where="post" if (a.direction == "min") == (b.direction == "min") else "pre", color="crimson",
                zorder=1, label="Pareto front")
        ax.scatter([r["objectives"][a.name] for r in front], [r["objectives"][b.name] for r in front],
                   facecolors="none", edgecolors="crimson", s=90, zorder=3)
    for axis, o in (("x", a), ("y", b)):
        getattr(ax, f"set_{axis}label")(f"{o.name} ({o.direction})")
        if o.log:
            getattr(ax, f"set_{axis}scale")("log")
    ax.legend(fontsize=8)
    ax.set_title(f"mobo: {mobo.acquisition}, {len(done)} completed runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
