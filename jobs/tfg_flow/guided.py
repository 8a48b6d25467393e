"""Guided vs unguided sampling scored by the oracle: the numbers behind report.md.

The guidance predictor and the oracle are runs of this job with `task=predictor`, trained on
disjoint QM9 splits; both load through `load_run_weights`, so any engine's checkpoint works.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleyard.jobs.tfg_flow.chemistry import Checked, check_molecule, chemistry_metrics
from scaleyard.models.molecules.egnn import EGNNConfig, MoleculeFlowNet, PropertyNet
from scaleyard.models.molecules.flow import SamplerConfig, sample
from scaleyard.models.molecules.guidance import GuidanceConfig, Guide


class TargetError(ValueError):
    """A guidance target that names no trained property or lies outside its training range."""


@dataclass
class Predictor:
    net: PropertyNet
    properties: list[str]
    low: dict[str, float]
    high: dict[str, float]
    run_dir: str

    def column(self, name: str) -> int:
        if name not in self.properties:
            raise TargetError(f"target property {name!r} is unknown to the predictor {self.run_dir}; it predicts: "
                              f"{', '.join(self.properties)}")
        return self.properties.index(name)

    def check_target(self, name: str, value: float) -> None:
        self.column(name)
        if not self.low[name] <= value <= self.high[name]:
            raise TargetError(f"target {name}={value:g} lies outside the property's training range "
                              f"[{self.low[name]:g}, {self.high[name]:g}] ({self.run_dir}); pick a value inside it")


def load_predictor(run_dir: str | Path) -> Predictor:
    """A trained `tfg_flow task=predictor` run, in eval mode (trained weights, not an EMA)."""
    from scaleyard.platform.weights import load_run_weights

    loaded = load_run_weights(run_dir, ema=False)
    state = loaded.job_state
    if state.get("task") != "predictor":
        raise ValueError(f"{run_dir} is not a property-predictor run (tfg_flow task=predictor)")
    net = PropertyNet(EGNNConfig(**state["model_config"]), len(state["properties"]))
    net.load_state_dict(loaded.weights)
    net.eval().requires_grad_(False)
    return Predictor(net, list(state["properties"]), state["low"], state["high"], str(run_dir))


def draw_counts(histogram: dict[int, int] | dict[str, int], rows: int, generator: torch.Generator) -> torch.Tensor:
    """Atom counts drawn from the training split's distribution."""
    sizes = torch.tensor([int(k) for k in histogram])
    weights = torch.tensor([float(v) for v in histogram.values()])
    return sizes[torch.multinomial(weights, rows, replacement=True, generator=generator)]


def generate(flow: MoleculeFlowNet, counts: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator,
             guide: Guide | None = None, batch: int = 256) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Molecules as (class indices, positions) plus the padded tensors, in batches."""
    out = []
    for start in range(0, len(counts), batch):
        part = counts[start:start + batch]
        sub = guide.part(slice(start, start + batch)) if guide is not None else None
        x, a, mask = sample(flow, part, sampler, generator, sub)
        out.append((x, a, mask))
    return out


def molecules_of(batches, vocabulary: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    numbers = np.asarray(vocabulary)
    found = []
    for x, a, mask in batches:
        for xi, ai, mi in zip(x, a, mask):
            found.append((numbers[ai[mi].numpy()], xi[mi].numpy()))
    return found


def oracle_values(oracle: Predictor, batches, column: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([oracle.net.predict(x, a, mask)[:, column] for x, a, mask in batches])


def compare(flow: MoleculeFlowNet, vocabulary: list[int], histogram: dict, predictor: Predictor, oracle: Predictor,
            prop: str, targets: torch.Tensor, sampler: SamplerConfig, guidance: GuidanceConfig,
            seed: int) -> tuple[dict[str, Any], dict[str, list]]:
    """Guided and unguided samples for the same targets and atom counts: oracle MAE and chemistry;
    also the generated batches and the oracle's values per mode."""
    column, oracle_column = predictor.column(prop), oracle.column(prop)
    result: dict[str, Any] = {"property": prop, "molecules": len(targets)}
    generated: dict[str, Any] = {}
    for mode in ("unguided", "guided"):
        generator = torch.Generator().manual_seed(seed)
        counts = draw_counts(histogram, len(targets), generator)
        guide = Guide(predictor.net, column, targets, guidance) if mode == "guided" else None
        started = time.perf_counter()
        batches = generate(flow, counts, sampler, generator, guide)
        seconds = time.perf_counter() - started
        values = oracle_values(oracle, batches, oracle_column)
        checked = checked_rows(batches, vocabulary)
        generated[mode] = (batches, values, checked)
        result[mode] = {"mae": float((values - targets).abs().mean()), "seconds": round(seconds, 2),
                        **chemistry_metrics(checked)}
    result["mae_ratio"] = result["guided"]["mae"] / max(result["unguided"]["mae"], 1e-12)
    result["validity_ratio"] = result["guided"]["validity"] / max(result["unguided"]["validity"], 1e-12)
    return result, generated


def write_report(stem: Path, results: list[dict[str, Any]], context: dict[str, Any]) -> Path:
    """report.md and report.json: guided vs unguided oracle MAE per property, validity, stability."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps({"context": context, "results": results}, indent=1))
    lines = ["# TFG-Flow: training-free guidance on QM9", "",
             "MAE between the oracle's prediction for each generated molecule and its target (lower is better);",
             "the oracle was trained on a QM9 split disjoint from the guidance predictor's and the flow model's.", "",
             "| property | molecules | MAE unguided | MAE guided | ratio | validity unguided | validity guided "
             "| mol. stability unguided | mol. stability guided |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        u, g = r["unguided"], r["guided"]
        lines.append(f"| {r['property']} | {r['molecules']} | {u['mae']:.4g} | {g['mae']:.4g} | {r['mae_ratio']:.2f} "
                     f"| {u['validity']:.2f} | {g['validity']:.2f} | {u['molecule_stability']:.2f} "
                     f"| {g['molecule_stability']:.2f} |")
    lines += ["", "Context:", ""] + [f"- {k}: {v}" for k, v in context.items()]
    path = stem.with_name(stem.name + ".md")
    path.write_text("\n".join(lines) + "\n")
    return path


def checked_rows(batches, vocabulary: list[int]) -> list[Checked]:
    return [check_molecule(z, p) for z, p in molecules_of(batches, vocabulary)]
