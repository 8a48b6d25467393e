"""Guided vs unguided report for trained runs, outside training, over the held-out split's targets
for every property in guidance.properties (`scaleyard sample --target` does one value of one property):
`python -m scaleyard.jobs.tfg_flow.compare_runs FLOW_RUN [report=NAME] [KEY=VALUE ...]`, where the
overrides are the flow run's config keys (guidance.*, eval.steps, eval.seed, data.eval_path); it
writes FLOW_RUN/NAME.md and NAME.json (default report_compare)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from scaleyard.data_loaders.index import load_index
from scaleyard.jobs.tfg_flow.data import read_molecules
from scaleyard.jobs.tfg_flow.guided import compare, load_predictor, write_report
from scaleyard.jobs.tfg_flow.job import TFGFlow, guidance_config
from scaleyard.models.molecules.egnn import EGNNConfig, MoleculeFlowNet
from scaleyard.models.molecules.flow import SamplerConfig
from scaleyard.platform.weights import load_run_weights


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    run, overrides = Path(argv[0]), [a for a in argv[1:] if not a.startswith("report=")]
    names = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("report=")]
    loaded = load_run_weights(run)
    cfg = OmegaConf.merge(OmegaConf.structured(TFGFlow.Config), loaded.config, OmegaConf.from_dotlist(overrides))
    flow = MoleculeFlowNet(EGNNConfig(**loaded.job_state["model_config"]))
    flow.load_state_dict(loaded.weights)
    flow.eval().requires_grad_(False)
    predictor, oracle = load_predictor(cfg.guidance.predictor_run), load_predictor(cfg.guidance.oracle_run)
    heldout = read_molecules(load_index(cfg.data.eval_path), cfg.guidance.molecules)
    results = []
    started = time.perf_counter()
    for prop in cfg.guidance.properties:
        targets = torch.tensor([m["properties"][prop] for m in heldout], dtype=torch.float32)
        result, _ = compare(flow, list(loaded.job_state["vocabulary"]), loaded.job_state["histogram"], predictor,
                            oracle, prop, targets, SamplerConfig(cfg.eval.steps), guidance_config(cfg), cfg.eval.seed)
        results.append(result)
        print(f"{prop}: MAE guided {result['guided']['mae']:.4g} unguided {result['unguided']['mae']:.4g} "
              f"ratio {result['mae_ratio']:.2f}; validity {result['guided']['validity']:.2f} vs "
              f"{result['unguided']['validity']:.2f}", flush=True)
    context = {"command": " ".join(["python -m scaleyard.jobs.tfg_flow.compare_runs", *argv]), "flow_run": str(run),
               "step": loaded.step, "ema": loaded.ema, "predictor_run": cfg.guidance.predictor_run,
               "oracle_run": cfg.guidance.oracle_run, "targets": f"the first {len(heldout)} molecules of "
               f"{cfg.data.eval_path}", "sampler_steps": cfg.eval.steps,
               "guidance": OmegaConf.to_container(cfg.guidance), "seconds": round(time.perf_counter() - started, 1)}
    path = write_report(run / (names[-1] if names else "report_compare"), results, context)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
