"""`make demo`: an IsoFLOP ladder of U-ViT and DiT-cross on Fashion-MNIST captions, run locally
through the same sweep machinery as a cluster, then scaling-law fits and a report.

    python -m scaleyard.jobs.t2i.demo [--out runs/demo] [--data data/fashion_mnist]

Steps: a `classify` run (the feature network of the image metrics), the sweep (3 sizes x 3
budgets per architecture, 2 at a time), fits per architecture, `<out>/report.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

from scaleyard.platform.scaling import Runs
from scaleyard.platform.scaling_report import write_report

ARCHS = ("uvit", "dit_cross")
SIZES = ("xs", "s", "m")
BUDGETS = (3e11, 6e11, 1.2e12)


def scaleyard(*args: str) -> None:
    command = [sys.executable, "-m", "scaleyard.platform.cli", *args]
    print("$ scaleyard " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def sweep_spec(data: Path, classifier: Path) -> dict:
    return {
        "job": "t2i",
        "preset": "default",
        "base": [f"data.path={data.absolute()}/train", f"data.eval_path={data.absolute()}/test",
                 f"eval.classifier={classifier.absolute()}", "train.batch_size=32", "optim.warmup_steps=20",
                 "train.eval_every=0", "train.log_every=20", "eval.samples=128", "eval.steps=10"],
        "isoflop": {"key": "model.preset", "values": [f"{a}-cpu-{s}" for a in ARCHS for s in SIZES],
                    "budgets": list(BUDGETS)},
        "concurrency": 2,
    }


def collect(sweep_dir: Path) -> dict[str, list[dict]]:
    by_arch: dict[str, list[dict]] = {a: [] for a in ARCHS}
    for summary_file in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        preset = OmegaConf.load(summary_file.parent / "config.yaml").model.preset
        arch = preset.split("-")[0]
        by_arch.setdefault(arch, []).append({"preset": preset, **summary})
    return by_arch


def report(out: Path, by_arch: dict[str, list[dict]], minutes: float) -> Path:
    lines = ["# scaleyard demo: U-ViT vs DiT-cross, IsoFLOP ladder on Fashion-MNIST captions", "",
             f"{sum(len(v) for v in by_arch.values())} runs, {minutes:.1f} minutes on this machine. "
             "Loss = validation flow-matching loss at t in {0.1, 0.3, 0.5, 0.7, 0.9} (fixed noise).", ""]
    fits = {}
    for arch, rows in by_arch.items():
        runs = Runs([r["params"] for r in rows], [r["samples_seen"] for r in rows],
                    [r["compute_flops"] for r in rows], [r["eval"]["loss"] for r in rows])
        fits[arch] = write_report(runs, out / f"scaling_{arch}", bootstrap=100)
        lines += [f"## {arch}", "", "| preset | params | compute (FLOPs) | steps | val loss | Frechet distance |"
                  " caption accuracy |", "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["compute_flops"], r["params"])):
            lines.append(f"| {r['preset']} | {r['params']:,} | {r['compute_flops']:.2e} | {r['step']} | "
                         f"{r['eval']['loss']:.4f} | {r['eval'].get('frechet_distance', float('nan')):.1f} | "
                         f"{r['eval'].get('caption_accuracy', float('nan')):.3f} |")
        power = fits[arch]["power_law"]["values"]
        lines += ["", f"Loss vs compute: L = {power['E']:.3f} + {power['A']:.3g} C^-{power['alpha']:.3f}"]
        iso = fits[arch].get("isoflop", {})
        if "values" in iso:
            lines.append(f"IsoFLOP: N* = {iso['values']['k']:.3g} C^{iso['values']['a']:.3f}")
        chin = fits[arch].get("chinchilla", {})
        if "values" in chin:
            v = chin["values"]
            lines.append(f"Parametric: L = {v['E']:.3f} + {v['A']:.3g}/N^{v['alpha']:.3f} "
                         f"+ {v['B']:.3g}/D^{v['beta']:.3f}")
        lines += ["", f"![{arch}](scaling_{arch}/scaling.png)", f"Details: `scaling_{arch}/scaling.md`", ""]
    lines += ["## U-ViT vs DiT-cross at equal compute", "",
              "| compute (FLOPs) | best U-ViT loss | best DiT-cross loss | better |", "|---|---|---|---|"]
    for budget in BUDGETS:
        best = {}
        for arch, rows in by_arch.items():
            same = [r["eval"]["loss"] for r in rows if np.isclose(r["compute_flops"], budget, rtol=0.05)]
            best[arch] = min(same) if same else float("nan")
        winner = min(best, key=lambda a: best[a]) if all(np.isfinite(list(best.values()))) else "-"
        lines.append(f"| {budget:.2g} | {best.get('uvit', float('nan')):.4f} | "
                     f"{best.get('dit_cross', float('nan')):.4f} | {winner} |")
    lines += ["", "Tiny models and budgets on 2 CPU cores: the fits show the machinery, not the paper's result.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default="data/fashion_mnist")
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    started = time.monotonic()
    classifier = out / "classify"
    scaleyard("run", "classify", f"data.path={data}/train", f"data.eval_path={data}/test", f"run.dir={classifier}")
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "sweep.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(data, classifier), sort_keys=False))
    scaleyard("sweep", str(spec), "--dir", str(out / "sweep"), "--cluster", "local", "--wait")
    path = report(out, collect(out / "sweep"), (time.monotonic() - started) / 60)
    print(path.read_text())
    print(f"report: {path}\nTensorBoard: .venv/bin/tensorboard --logdir {out} --host 127.0.0.1")


if __name__ == "__main__":
    main()
