"""`scaleyard sample RUN` for a flow run: molecules as SDF or CSV, guided toward a property target
when one is given (then also a guided-vs-unguided report beside the output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from scaleyard.data_loaders.index import DataError
from scaleyard.jobs.tfg_flow.chemistry import Checked, chemistry_metrics, write_sdf
from scaleyard.jobs.tfg_flow.guided import (
    TargetError,
    checked_rows,
    compare,
    draw_counts,
    generate,
    load_predictor,
    write_report,
)
from scaleyard.models.molecules.egnn import EGNNConfig, MoleculeFlowNet
from scaleyard.models.molecules.flow import SamplerConfig
from scaleyard.models.molecules.guidance import GuidanceConfig

FORMATS = (".sdf", ".csv")


def guidance_of(cfg: DictConfig, prop: str | None = None) -> GuidanceConfig:
    from scaleyard.jobs.tfg_flow.job import guidance_config

    return guidance_config(cfg, prop)


def write_molecules(cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any], request,
                    target: dict[str, float]) -> dict[str, Any]:
    out = Path(request.out)
    if out.suffix not in FORMATS:
        raise DataError(f"--out {out}: the file name must end in {' or '.join(FORMATS)}")
    if request.rows <= 0:
        raise DataError("--rows: give the number of molecules to generate (a positive integer)")
    guided = _guidance_inputs(cfg, target)  # every target error before anything is generated or written
    flow = MoleculeFlowNet(EGNNConfig(**job_state["model_config"]))
    flow.load_state_dict(weights)
    flow.eval().requires_grad_(False)
    vocabulary, histogram = list(job_state["vocabulary"]), job_state["histogram"]
    sampler = SamplerConfig(cfg.eval.steps)
    if guided is None:
        generator = torch.Generator().manual_seed(request.seed)
        batches = generate(flow, draw_counts(histogram, request.rows, generator), sampler, generator)
        checked = checked_rows(batches, vocabulary)
        _write(out, checked, [{} for _ in checked])
        return {"molecules": len(checked), **chemistry_metrics(checked)}
    predictor, oracle, prop, value = guided
    targets = torch.full((request.rows,), float(value))
    result, generated = compare(flow, vocabulary, histogram, predictor, oracle, prop, targets, sampler,
                                guidance_of(cfg, prop), request.seed)
    _, values, checked = generated["guided"]
    _write(out, checked, [{f"oracle_{prop}": float(v), f"target_{prop}": value} for v in values])
    context = {"flow_run": str(cfg.run.dir), "predictor_run": cfg.guidance.predictor_run,
               "oracle_run": cfg.guidance.oracle_run, "target": f"{prop}={value:g}", "seed": request.seed,
               "sampler_steps": cfg.eval.steps, "guidance": OmegaConf.to_container(cfg.guidance), "molecules": str(out)}
    report = write_report(out.with_name(out.stem + ".report"), [result], context)
    return {"molecules": len(checked), "report": str(report), "mae_guided": result["guided"]["mae"],
            "mae_unguided": result["unguided"]["mae"], "validity": result["guided"]["validity"]}


def _guidance_inputs(cfg: DictConfig, target: dict[str, float]):
    if not target:
        return None
    if len(target) != 1:
        raise TargetError(f"--target: give one property=value, got {', '.join(target)}")
    for key in ("predictor_run", "oracle_run"):
        if not cfg.guidance[key]:
            raise TargetError(f"guided sampling needs config key 'guidance.{key}' in the run's config.yaml: "
                              "a tfg_flow task=predictor run folder")
    (prop, value), = target.items()
    predictor, oracle = load_predictor(cfg.guidance.predictor_run), load_predictor(cfg.guidance.oracle_run)
    predictor.check_target(prop, float(value))
    oracle.column(prop)
    return predictor, oracle, prop, float(value)


def _write(out: Path, checked: list[Checked], extra: list[dict[str, float]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".sdf":
        write_sdf(out, checked, extra)
        return
    rows = [{"smiles": c.smiles or "", "valid": c.valid, "stable": c.stable, "atoms": c.atoms, **e}
            for c, e in zip(checked, extra)]
    pd.DataFrame(rows).to_csv(out, index=False)
