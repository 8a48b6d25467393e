"""tfg_flow: TFG-Flow on QM9: a multimodal flow model for molecules (task=flow) and the property
predictors that guide it and score it (task=predictor), with RDKit-checked samples.

Recipe: QM9 in four disjoint splits (`scaleyard data build qm9 --option heavy_atoms_only=true
--option tfg_splits=true`): `flow` trains the flow model, `guide` the guidance predictor, `oracle`
the oracle, `heldout` gives test molecules and guidance targets. Flow: EGNN with attention,
coordinates by flow matching, atom types by a masking CTMC; evaluation: validity, uniqueness,
novelty, stability; at the last step, with `guidance.predictor_run` and `guidance.oracle_run`,
report.md compares guided and unguided sampling per property.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from scaleyard.data_loaders.decoders import Compose, MoleculeDecoder
from scaleyard.data_loaders.index import DataError, load_index
from scaleyard.data_loaders.pipeline import ShardStream
from scaleyard.jobs.tfg_flow.data import PROPERTIES, PadBatch, atom_vocabulary, pad, read_molecules
from scaleyard.models.molecules.egnn import PRESETS, EGNNConfig, MoleculeFlowNet, PropertyNet, egnn_flops_per_sample
from scaleyard.models.molecules.flow import SamplerConfig, flow_loss
from scaleyard.models.molecules.guidance import GuidanceConfig
from scaleyard.platform.config import (
    ConfigError,
    DataConfig,
    TrainingConfig,
    batch_per_rank,
    bounded,
    choice,
    stream_config,
    to_dotlist,
)
from scaleyard.platform.job import Context, EvalResult, Job, JobParts, SampleRequest
from scaleyard.platform.stages import Stage

log = logging.getLogger("scaleyard")
TASKS = ("flow", "predictor")
STATS_MOLECULES = 5000  # training molecules read for the atom-count histogram / property statistics


@dataclass
class ModelConfig:
    preset: str = choice("cpu_small", tuple(PRESETS))
    hidden: int = bounded(0, 0)  # 0: the preset's
    layers: int = bounded(0, 0)  # 0: the preset's
    attention: bool = True
    type_weight: float = bounded(1.0, 0.0)  # flow: weight of the atom-type cross-entropy


@dataclass
class EvalConfig:
    molecules: int = bounded(100, 0)  # flow: molecules sampled per evaluation (0: skip)
    steps: int = bounded(100, 1)  # Euler steps
    heldout: int = bounded(2000, 0)  # predictor: held-out molecules for the test MAE (0: all)
    reference: int = bounded(STATS_MOLECULES, 0)  # flow: training molecules novelty is judged against
    seed: int = 0


@dataclass
class GuidanceSection(GuidanceConfig):
    predictor_run: str = ""  # a `task=predictor` run on the guide split
    oracle_run: str = ""  # a `task=predictor` run on the oracle split
    # with predictor_run and oracle_run empty: train both first from this preset (e.g. small_predictor)
    # on the `guide` and `oracle` splits beside data.path, into <run.dir>/stages/{predictor,oracle}
    predictor_stage: str = ""
    properties: list[str] = field(default_factory=lambda: list(PROPERTIES))  # compared in report.md
    molecules: int = bounded(64, 1)  # per property in report.md (targets: the held-out split's values)
    # report.md's targets: held-out molecules [target_offset, target_offset + molecules); a non-zero offset
    # gives a tuning slice disjoint from the default scored one (the first `molecules`)
    target_offset: int = bounded(0, 0)
    # per-property knobs over the ones above, e.g. {gap: {tau: 0.02, rho: 0.01}} (report.md and `sample --target`)
    per_property: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Config(TrainingConfig):
    task: str = choice("flow", TASKS)
    properties: list[str] = field(default_factory=lambda: list(PROPERTIES))  # predictor outputs
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/qm9_tfg/flow",
                                                                 eval_path="data/qm9_tfg/heldout"))
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guidance: GuidanceSection = field(default_factory=GuidanceSection)


def egnn_config(cfg: DictConfig, num_types: int) -> EGNNConfig:
    size = PRESETS[cfg.model.preset]
    return EGNNConfig(num_types=num_types, hidden=cfg.model.hidden or size["hidden"],
                      layers=cfg.model.layers or size["layers"], attention=cfg.model.attention)


def guidance_config(cfg: DictConfig, prop: str | None = None) -> GuidanceConfig:
    """The guidance knobs, with `guidance.per_property[prop]` over the shared ones."""
    knobs = {f.name: cfg.guidance[f.name] for f in dataclasses.fields(GuidanceConfig)}
    own = cfg.guidance.get("per_property", {}) or {}
    if prop is not None and prop in own:
        knobs.update(own[prop])
    types = {f.name: type(f.default) for f in dataclasses.fields(GuidanceConfig)}  # int knobs stay ints
    return GuidanceConfig(**{k: types[k](v) for k, v in knobs.items()})


def check_per_property(cfg: DictConfig) -> None:
    knobs = [f.name for f in dataclasses.fields(GuidanceConfig)]
    for prop, values in (cfg.guidance.get("per_property", {}) or {}).items():
        if prop not in PROPERTIES:
            raise ConfigError(f"config key 'guidance.per_property.{prop}': unknown property {prop!r}; choose from "
                              f"{list(PROPERTIES)}")
        for key in values:
            if key not in knobs:
                raise ConfigError(f"config key 'guidance.per_property.{prop}.{key}': not a guidance knob; knobs: "
                                  f"{knobs}")


class TFGFlow(Job):
    name = "tfg_flow"
    Config = Config

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to a QM9 split folder, e.g. data/qm9_tfg/flow "
                              "(`scaleyard data build qm9 --out data/qm9_tfg --option heavy_atoms_only=true "
                              "--option tfg_splits=true`)")
        try:
            atom_vocabulary(load_index(cfg.data.path))
        except DataError as err:
            raise ConfigError(f"config key 'data.path': {err}") from None
        unknown = [p for p in cfg.properties if p not in PROPERTIES]
        if unknown:
            raise ConfigError(f"config key 'properties': unknown {unknown}; choose from {list(PROPERTIES)}")
        check_per_property(cfg)
        stage = cfg.guidance.predictor_stage
        if stage and cfg.task == "flow" and not (cfg.guidance.predictor_run or cfg.guidance.oracle_run):
            if stage not in self.presets():
                raise ConfigError(f"config key 'guidance.predictor_stage': no preset {stage!r}; presets: "
                                  f"{self.presets()}")
            for split in ("guide", "oracle"):
                if not (Path(cfg.data.path).parent / split / "index.json").exists():
                    raise ConfigError(f"config key 'guidance.predictor_stage': the predictors train on the {split!r} "
                                      f"split beside data.path, and {Path(cfg.data.path).parent / split} holds none "
                                      "(build QM9 with --option tfg_splits=true)")

    def stages(self, cfg: DictConfig) -> list[Stage]:
        """The guidance predictor and the oracle, when `guidance.predictor_stage` names their preset
        and neither run is given: trained on the disjoint guide and oracle splits."""
        g = cfg.guidance
        if cfg.task != "flow" or not g.predictor_stage or g.predictor_run or g.oracle_run:
            return []
        splits = Path(cfg.data.path).parent
        shared = to_dotlist({"engine": OmegaConf.to_container(cfg.engine)})
        return [Stage(name, {f"guidance.{key}": ""}, job=self.name, preset=g.predictor_stage,
                      overrides=(f"data.path={splits / split}", f"data.eval_path={cfg.data.eval_path}",
                                 f"run.seed={cfg.run.seed}", *shared))
                for name, key, split in (("predictor", "predictor_run", "guide"), ("oracle", "oracle_run", "oracle"))]

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        index = load_index(cfg.data.path)
        self.vocabulary = atom_vocabulary(index)
        self.properties = tuple(cfg.properties) if cfg.task == "predictor" else ()
        self.model_cfg = egnn_config(cfg, len(self.vocabulary))
        stream = ShardStream(index, stream_config(cfg), decode=Compose((MoleculeDecoder(),)),
                             collate=PadBatch(tuple(self.vocabulary), self.properties),
                             batch_per_rank=batch_per_rank(cfg, ctx.data_world_size), rank=ctx.data_rank,
                             world_size=ctx.data_world_size)
        sample = read_molecules(index, max(STATS_MOLECULES, cfg.eval.reference))
        self.reference = sample[: cfg.eval.reference]
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            if cfg.task == "flow":
                model: nn.Module = MoleculeFlowNet(self.model_cfg)
            else:
                model = PropertyNet(self.model_cfg, len(self.properties))
        self.histogram = dict(sorted(Counter(len(m["atoms"]) for m in sample[:STATS_MOLECULES]).items()))
        self.stats: dict[str, torch.Tensor] = {}
        if cfg.task == "predictor":  # targets are regressed in normalised units; the range bounds guidance targets
            values = pad(sample[:STATS_MOLECULES], self.vocabulary, self.properties)["props"]
            self.stats = {"mean": values.mean(0), "std": values.std(0).clamp(min=1e-8),
                          "low": values.min(0).values, "high": values.max(0).values}
            model.mean.copy_(self.stats["mean"])
            model.std.copy_(self.stats["std"])
        self._reference_smiles: set[str] | None = None
        return JobParts(model=model, train_data=stream, blocks=lambda m: list(m.blocks))

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        device = self.ctx.device
        pos, types, mask = batch["pos"].to(device), batch["types"].to(device), batch["mask"].to(device)
        if self.cfg.task == "flow":
            return flow_loss(model, len(self.vocabulary), pos, types, mask, self.cfg.model.type_weight)
        target = (batch["props"].to(device) - self.stats["mean"].to(device)) / self.stats["std"].to(device)
        loss = F.mse_loss(model(pos, types, mask), target)
        return loss, {}

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        if self.cfg.task == "predictor":
            return EvalResult(metrics=self._test_mae(model))
        return self._evaluate_flow(model, step)

    def _test_mae(self, model: PropertyNet) -> dict[str, float]:
        if not self.cfg.data.eval_path:
            return {}
        molecules = read_molecules(load_index(self.cfg.data.eval_path), self.cfg.eval.heldout)
        errors = []
        with torch.no_grad():
            for start in range(0, len(molecules), 256):
                batch = pad(molecules[start:start + 256], self.vocabulary, self.properties)
                device = self.ctx.device
                predicted = model.predict(batch["pos"].to(device), batch["types"].to(device), batch["mask"].to(device))
                errors.append((predicted.cpu() - batch["props"]).abs())
        mae = torch.cat(errors).mean(0)
        return {f"test_mae/{p}": float(v) for p, v in zip(self.properties, mae)} | {"test_molecules": len(molecules)}

    def _evaluate_flow(self, model: MoleculeFlowNet, step: int) -> EvalResult:
        from scaleyard.jobs.tfg_flow.chemistry import chemistry_metrics, reference_smiles
        from scaleyard.jobs.tfg_flow.guided import checked_rows, draw_counts, generate

        cfg = self.cfg
        if cfg.eval.molecules == 0:
            return EvalResult()
        started = time.perf_counter()
        counts = draw_counts(self.histogram, cfg.eval.molecules, torch.Generator().manual_seed(cfg.eval.seed))
        generator = torch.Generator(device=self.ctx.device).manual_seed(cfg.eval.seed)
        batches = generate(model, counts.to(self.ctx.device), SamplerConfig(cfg.eval.steps), generator)
        if self._reference_smiles is None:
            self._reference_smiles = reference_smiles([(m["atoms"].numpy(), m["pos"].numpy())
                                                       for m in self.reference])
        batches = [tuple(t.cpu() for t in b) for b in batches]
        metrics = chemistry_metrics(checked_rows(batches, self.vocabulary), self._reference_smiles)
        metrics["sample_seconds"] = time.perf_counter() - started
        text = {}
        if step == cfg.train.steps and cfg.guidance.predictor_run and cfg.guidance.oracle_run:
            path = self._guided_report(model)
            text["report"] = path.read_text()
            log.info("wrote %s", path)
        return EvalResult(metrics=metrics, text=text)

    def _guided_report(self, model: MoleculeFlowNet) -> Path:
        from scaleyard.jobs.tfg_flow.guided import compare, load_predictor, write_report

        cfg = self.cfg
        predictor, oracle = load_predictor(cfg.guidance.predictor_run), load_predictor(cfg.guidance.oracle_run)
        offset = cfg.guidance.target_offset
        heldout = read_molecules(load_index(cfg.data.eval_path), offset + cfg.guidance.molecules)[offset:]
        if len(heldout) < cfg.guidance.molecules:
            raise DataError(f"config key 'guidance.target_offset': {cfg.data.eval_path} holds too few molecules for "
                            f"{cfg.guidance.molecules} targets from molecule {offset}")
        flow = copy.deepcopy(model).cpu()  # the predictors live on the CPU; the trained model stays put
        results = []
        for prop in cfg.guidance.properties:
            targets = torch.tensor([m["properties"][prop] for m in heldout], dtype=torch.float32)
            results.append(compare(flow, self.vocabulary, self.histogram, predictor, oracle, prop, targets,
                                   SamplerConfig(cfg.eval.steps), guidance_config(cfg, prop), cfg.eval.seed)[0])
            log.info("guidance %s: MAE %.4g guided vs %.4g unguided", prop, results[-1]["guided"]["mae"],
                     results[-1]["unguided"]["mae"])
        context = {"command": " ".join(["scaleyard", *sys.argv[1:]]), "flow_run": str(self.ctx.run_dir),
                   "predictor_run": cfg.guidance.predictor_run, "oracle_run": cfg.guidance.oracle_run,
                   "targets": f"molecules {offset}..{offset + len(heldout) - 1} of {cfg.data.eval_path}",
                   "sampler_steps": cfg.eval.steps, "guidance": OmegaConf.to_container(cfg.guidance)}
        return write_report(self.ctx.run_dir / "report", results, context)

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        return egnn_flops_per_sample(egnn_config(cfg, 4), atoms=9)

    def state_dict(self) -> dict[str, Any]:
        # everything sampling needs travels with the weights (no access to the data)
        state = {"task": self.cfg.task, "model_config": dataclasses.asdict(self.model_cfg),
                 "vocabulary": list(self.vocabulary), "histogram": {str(k): v for k, v in self.histogram.items()}}
        if self.cfg.task == "predictor":
            state.update(properties=list(self.properties),
                         low={p: float(v) for p, v in zip(self.properties, self.stats["low"])},
                         high={p: float(v) for p, v in zip(self.properties, self.stats["high"])})
        return state

    def write_samples(self, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
                      request: SampleRequest) -> dict[str, Any]:
        from scaleyard.jobs.tfg_flow.sampling import write_molecules

        if job_state.get("task") != "flow":
            raise DataError("`scaleyard sample` generates from a flow run (tfg_flow task=flow); this is a "
                            f"{job_state.get('task')!r} run")
        return write_molecules(cfg, weights, job_state, request, request.target)


JOB = TFGFlow
