"""tabdiff: mixed-type tabular diffusion (TabDiff) on table shards, with synthesis and imputation.

Recipe: config -> data (table shards whose index carries the column schema; numerical
preprocessing fitted on the whole train split, identically on every rank) -> model (TabDiff with
learnable or fixed per-column schedules) -> loss (EDM for numbers + masked-diffusion ELBO for
categories, the numerical term annealed) -> evaluation (synthetic rows against the real splits,
two baselines, imputation AUC of the target; report.md at the end) -> `scaleyard sample`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.decoders import TableDecoder
from scaleyard.data_loaders.index import DataError, load_index
from scaleyard.data_loaders.pipeline import ShardStream, stack
from scaleyard.jobs.tabdiff.table import (
    HoldoutDecoder,
    Schema,
    read_rows,
    read_split,
    read_split_holdout,
    schema_of,
    to_frame,
    write_rows,
)
from scaleyard.models.meta import shapes_only
from scaleyard.models.tabdiff import SCHEDULES, TabDiff, TabDiffConfig, flops_per_sample
from scaleyard.models.tabdiff_sampling import Imputation, SamplerConfig, impute, sample
from scaleyard.platform.config import (
    ConfigError,
    DataConfig,
    TrainingConfig,
    batch_per_rank,
    bounded,
    choice,
    stream_config,
)
from scaleyard.platform.job import Context, EvalResult, Job, JobParts, SampleRequest

log = logging.getLogger("scaleyard")
BASELINES = ("independent", "gaussian_copula")
CEILING = "real held-out (ceiling)"


@dataclass
class ModelConfig:
    d_token: int = bounded(4, 1)
    layers: int = bounded(2, 0)
    heads: int = bounded(1, 1)
    ffn_factor: int = bounded(32, 1)
    dim_t: int = bounded(512, 2)
    schedule: str = choice("learnable", SCHEDULES)  # fixed: rho = 7 and k = 1 for every column
    column_dropout: float = bounded(0.1, 0.0, 1.0)  # rows trained with dropped columns (imputation guidance)
    quantiles: int = bounded(1000, 2)
    # the numerical loss weight falls linearly from 1 to this over train.steps (the paper anneals to 0)
    num_weight_end: float = bounded(0.0, 0.0, 1.0)
    # deviations from the reference denoiser, off by default (models/tabdiff.py, README "TabDiff vs the reference")
    mid_residual: bool = False
    extra_norms: bool = False
    mid_input_silu: bool = False


@dataclass
class EvalConfig:
    rows: int = bounded(0, 0)  # synthetic rows for the metrics; 0: as many as the test rows used
    test_rows: int = bounded(0, 0)  # rows of data.eval_path used; 0: all
    steps: int = bounded(50, 2)
    churn: float = bounded(1.0, 0.0)
    heun: bool = True
    guidance: float = bounded(0.6, 0.0)
    impute_rows: int = bounded(2000, 0)  # test rows whose target is imputed (imputation AUC); 0: skip
    impute_trials: int = bounded(10, 1)  # imputations per row in the paper-protocol AUC (the paper: 50)
    metrics: bool = True  # False: only generate and check rows (fast smoke runs)
    baselines: bool = True
    batch_size: int = bounded(4096, 1)
    seed: int = 0
    # Validation split carved from data.path (rows picked by a hash of their key, `table.is_holdout`):
    # never trained on; evaluations before the last step score it, the last step scores the test
    # split once (issue #17: no tuning on test). 0: no validation split, earlier evaluations only
    # check the rows.
    val_share: float = bounded(0.1, 0.0, 0.5)
    val_seed: int = 0
    # the paper's protocol (paper_metrics.py) in the final report, for TabDiff, baselines and a
    # held-out real ceiling; paper_rows 0: as many synthetic rows as train rows, as the paper
    paper_metrics: bool = True
    paper_rows: int = bounded(0, 0)
    mle_grid: str = choice("paper", ("paper", "quick"))


@dataclass
class Config(TrainingConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/adult/train", eval_path="data/adult/test"))
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def model_config(cfg: DictConfig, schema: Schema) -> TabDiffConfig:
    m = cfg.model
    try:
        return TabDiffConfig(num_numerical=len(schema.numerical), categories=schema.categories, d_token=m.d_token,
                             layers=m.layers, heads=m.heads, ffn_factor=m.ffn_factor, dim_t=m.dim_t,
                             schedule=m.schedule, column_dropout=m.column_dropout, quantiles=m.quantiles,
                             mid_residual=m.mid_residual, extra_norms=m.extra_norms,
                             mid_input_silu=m.mid_input_silu)
    except ValueError as err:
        raise ConfigError(f"config section 'model': {err}") from None


def sampler_config(cfg: DictConfig) -> SamplerConfig:
    e = cfg.eval
    return SamplerConfig(steps=e.steps, churn=e.churn, heun=e.heun, guidance=e.guidance, batch_size=e.batch_size)


class TabDiffJob(Job):
    name = "tabdiff"
    Config = Config
    # Runs saved before these keys existed trained the denoiser with all three deviations (they were
    # the only model then) on every train row (no validation split): they resume, sample and export
    # as they were trained, not as today's defaults (platform/job.py saved_config)
    saved_before = {"model.mid_residual": True, "model.extra_norms": True, "model.mid_input_silu": True,
                    "eval.val_share": 0.0}

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to a table split folder with index.json "
                              "(`scaleyard data build adult --out data/adult`)")
        try:
            schema = schema_of(load_index(cfg.data.path))
        except DataError as err:
            raise ConfigError(f"config key 'data.path': {err}") from None
        model_config(cfg, schema)

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        index = load_index(cfg.data.path)
        self.schema = schema_of(index)
        share, self.val_salt = cfg.eval.val_share, f"tabdiff-val-{cfg.eval.val_seed}"
        decode = HoldoutDecoder(self.schema.columns, share, self.val_salt) if share > 0 else TableDecoder(
            self.schema.columns)
        stream = ShardStream(index, stream_config(cfg), decode=decode, collate=stack,
                             batch_per_rank=batch_per_rank(cfg, ctx.data_world_size), rank=ctx.data_rank,
                             world_size=ctx.data_world_size, required=("json",))
        # The whole split in its fixed order, on every rank: the fitted transform is then the
        # same everywhere without a collective.
        # validation rows are left out of everything fitted: the transform, the class priors, the stream
        self.train_num, self.train_cat, self.val_num, self.val_cat = (
            read_split_holdout(index, self.schema, share, self.val_salt) if share > 0
            else (*read_split(index, self.schema), None, None))
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = TabDiff(model_config(cfg, self.schema))
        model.fit_preprocessing(self.train_num.numpy(), self.train_cat.numpy())
        self.micro_batches = 0
        self._baselines: dict[str, dict[str, float]] | None = None
        self._baselines_split = ""
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        return JobParts(model=model, train_data=stream)

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        total = self.cfg.train.steps * self.cfg.train.grad_accum
        progress = min(1.0, self.micro_batches / total)
        self.micro_batches += 1
        num_weight = 1.0 - (1.0 - self.cfg.model.num_weight_end) * progress
        device = self.ctx.device
        numeric, categorical = batch["numeric"], batch["categorical"]
        if "holdout" in batch:  # validation rows never train
            keep = ~batch["holdout"]
            if not bool(keep.any()):
                # a micro-batch of validation rows only: the forward still runs (DDP's gradient hooks
                # expect it on every rank), its loss times 0 teaches nothing
                loss, _ = model(numeric.to(device), categorical.to(device), num_weight)
                return loss * 0.0, {"num_weight": num_weight}
            numeric, categorical = numeric[keep], categorical[keep]
        loss, metrics = model(numeric.to(device), categorical.to(device), num_weight)
        return loss, {**metrics, "num_weight": num_weight}

    def evaluate(self, model: TabDiff, step: int) -> EvalResult:
        # the Trainer isolates every RNG around evaluation, so sampling here never changes training
        cfg, schema, device = self.cfg, self.schema, self.ctx.device
        started = time.perf_counter()
        final = step >= cfg.train.steps
        # the test split is scored once, at the end; earlier evaluations see the validation split
        real_num, real_cat = self._test_split() if final else (self.val_num, self.val_cat)
        split = "test" if final else "validation"
        rows = cfg.eval.rows or (len(real_cat) if real_cat is not None else len(self.train_cat))
        generator = torch.Generator(device=device).manual_seed(cfg.eval.seed)
        syn_num, syn_cat = sample(model, rows, sampler_config(cfg), generator, device)
        metrics = check_rows(syn_num, syn_cat, self.train_num, schema)
        metrics["sample_seconds"] = time.perf_counter() - started
        if not cfg.eval.metrics or real_cat is None or len(real_cat) == 0:
            return EvalResult(metrics=metrics)

        from scaleyard.jobs.tabdiff.metrics import evaluate_synthetic

        train = to_frame(self.train_num, self.train_cat, schema)
        test = to_frame(real_num, real_cat, schema)
        synthetic = to_frame(syn_num, syn_cat, schema)
        scores = evaluate_synthetic(train, test, synthetic, list(schema.columns), schema.target, cfg.eval.seed)
        impute_score = self._imputation_auc(model, real_num, real_cat, generator)
        if impute_score is not None:
            scores["imputation_auc"] = impute_score
        results = {"tabdiff": scores}
        if cfg.eval.baselines:
            results.update(self._baseline_results(train, test, rows, split))
        metrics.update(scores)
        for method, values in results.items():
            if method != "tabdiff":
                metrics.update({f"{method}/{k}": v for k, v in values.items()})
        text = {}
        if final:
            paper = (self._paper_results(model, train, test, (real_num, real_cat), generator)
                     if cfg.eval.paper_metrics else None)
            if paper:
                metrics.update({f"paper/{k}": v for k, v in paper["tabdiff"].items()})
            metrics["eval_seconds"] = time.perf_counter() - started
            from scaleyard.jobs.tabdiff.report import write_report

            val_rows = 0 if self.val_cat is None else len(self.val_cat)
            context = {"dataset": cfg.data.path, "rows": rows, "seed": cfg.eval.seed, "step": step,
                       "command": " ".join(["scaleyard", *sys.argv[1:]]),
                       "params": sum(p.numel() for p in model.parameters()),
                       "train_rows": len(self.train_cat), "test_rows": len(real_cat),
                       "validation": f"{val_rows} train rows held out (eval.val_share={cfg.eval.val_share}, "
                                     f"rule: CRC-32 of '{self.val_salt}/<key>'); never trained on, "
                                     "scored by every evaluation before the last; test scored once, here",
                       "impute": f"{cfg.eval.impute_trials} trial(s) over {cfg.eval.impute_rows} test rows",
                       "schedule": cfg.model.schedule, "sampler_steps": cfg.eval.steps,
                       "batch_size": cfg.train.batch_size, "deviations": deviations(cfg),
                       "model_deviations": model_deviations(cfg),
                       "eval_seconds": round(metrics["eval_seconds"], 1)}
            path = self.ctx.run_dir / "report.md"
            write_report(path, results, context, paper=paper)
            text["report"] = path.read_text()
            log.info("wrote %s", path)
        metrics["eval_seconds"] = time.perf_counter() - started
        return EvalResult(metrics=metrics, text=text)

    def _paper_results(self, model: TabDiff, train, test, test_tensors: tuple[torch.Tensor, torch.Tensor],
                       generator: torch.Generator) -> dict[str, dict[str, float]]:
        """The paper's protocol (paper_metrics.evaluate_paper) for TabDiff, both baselines and the
        ceiling: half the test rows scored as if synthetic, the other half their MLE/DCR test set;
        and TabDiff's imputation AUC over repeated trials."""
        from scaleyard.jobs.tabdiff.baselines import GaussianCopula, IndependentMarginals
        from scaleyard.jobs.tabdiff.paper_metrics import evaluate_paper

        cfg, schema = self.cfg, self.schema
        columns, target, seed = list(schema.columns), schema.target, cfg.eval.seed
        rows = cfg.eval.paper_rows or len(train)
        nums, cats = sample(model, rows, sampler_config(cfg), generator, self.ctx.device)
        tables = {"tabdiff": to_frame(nums, cats, schema)}
        for name, baseline in zip(BASELINES, (IndependentMarginals(), GaussianCopula(seed))):
            tables[name] = baseline.fit(train, columns).sample(rows, seed)
        out = {name: evaluate_paper(train, test, table, columns, target, seed, mle_grid=cfg.eval.mle_grid)
               for name, table in tables.items()}
        order = np.random.default_rng(seed).permutation(len(test))
        half = len(test) // 2
        out[CEILING] = evaluate_paper(train, test.iloc[order[half:]], test.iloc[order[:half]], columns, target,
                                      seed, mle_grid=cfg.eval.mle_grid)
        imputation = self._imputation_auc_paper(model, *test_tensors, generator)
        if imputation is not None:
            out["tabdiff"]["imputation_auc"] = imputation
        return out

    def _test_split(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.cfg.data.eval_path:
            return None, None
        if self._test is None:
            index = load_index(self.cfg.data.eval_path)
            if schema_of(index).columns != self.schema.columns:
                raise DataError(f"{self.cfg.data.eval_path} has a different column schema than {self.cfg.data.path}")
            self._test = read_split(index, self.schema, self.cfg.eval.test_rows)
        return self._test

    def _imputation_auc(self, model: TabDiff, test_num: torch.Tensor, test_cat: torch.Tensor,
                        generator: torch.Generator) -> float | None:
        """AUC of the imputed target's probability of its last class (">50K" for Adult's income),
        all other columns known: only for a binary categorical target."""
        j = self._binary_target()
        if j is None:
            return None
        from scaleyard.jobs.tabdiff.metrics import imputation_auc

        result = self._impute_target(model, test_num, test_cat, j, generator)
        categories = self.schema.categorical[j]["categories"]
        truth = [categories[i] for i in test_cat[: self.cfg.eval.impute_rows, j].tolist()]
        try:
            return imputation_auc(truth, result.probabilities[:, j, 1].numpy(), categories[1])
        except ValueError as err:  # a tiny test subset with one class only
            log.warning("imputation AUC skipped: %s", err)
            return None

    def _imputation_auc_paper(self, model: TabDiff, test_num: torch.Tensor, test_cat: torch.Tensor,
                              generator: torch.Generator) -> float | None:
        """The paper's imputation AUC: eval.impute_trials imputations of the target, their drawn
        classes averaged (paper_metrics.imputation_auc_trials)."""
        j = self._binary_target()
        if j is None:
            return None
        from scaleyard.jobs.tabdiff.paper_metrics import imputation_auc_trials

        trials = [self._impute_target(model, test_num, test_cat, j, generator).categorical[:, j].numpy()
                  for _ in range(self.cfg.eval.impute_trials)]
        try:
            return imputation_auc_trials(test_cat[: self.cfg.eval.impute_rows, j].numpy(), np.stack(trials), 2)
        except ValueError as err:  # a tiny test subset with one class only
            log.warning("paper imputation AUC skipped: %s", err)
            return None

    def _binary_target(self) -> int | None:
        """The target's index among the categorical columns when it is binary categorical and
        eval.impute_rows > 0 (the imputation metrics' condition); otherwise None."""
        schema = self.schema
        names = [c["name"] for c in schema.categorical]
        if self.cfg.eval.impute_rows == 0 or schema.target not in names:
            return None
        j = names.index(schema.target)
        return j if len(schema.categorical[j]["categories"]) == 2 else None

    def _impute_target(self, model: TabDiff, test_num: torch.Tensor, test_cat: torch.Tensor, j: int,
                       generator: torch.Generator) -> Imputation:
        """One imputation of categorical column j from every other column of the first
        eval.impute_rows test rows."""
        rows = self.cfg.eval.impute_rows
        known_cat = torch.ones(len(self.schema.categorical), dtype=torch.bool)
        known_cat[j] = False
        known_num = torch.ones(len(self.schema.numerical), dtype=torch.bool)
        return impute(model, test_num[:rows], test_cat[:rows], known_num, known_cat, sampler_config(self.cfg),
                      generator, self.ctx.device)

    def _baseline_results(self, train, test, rows: int, split: str) -> dict[str, dict[str, float]]:
        """Both baselines scored like TabDiff; they do not change during training: computed once
        per evaluation split."""
        if self._baselines is None or self._baselines_split != split:
            self._baselines_split = split
            from scaleyard.jobs.tabdiff.baselines import GaussianCopula, IndependentMarginals
            from scaleyard.jobs.tabdiff.metrics import evaluate_synthetic

            seed, columns = self.cfg.eval.seed, list(self.schema.columns)
            self._baselines = {}
            for name, baseline in zip(BASELINES, (IndependentMarginals(), GaussianCopula(seed))):
                synthetic = baseline.fit(train, columns).sample(rows, seed)
                self._baselines[name] = evaluate_synthetic(train, test, synthetic, columns, self.schema.target, seed)
        return self._baselines

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        try:
            schema = schema_of(load_index(cfg.data.path))
        except DataError:
            return 0.0  # no data here (e.g. planning a sweep elsewhere): unknown
        return flops_per_sample(model_config(cfg, schema))

    @classmethod
    def model_presets(cls) -> list[dict]:
        """`scaleyard models`: each YAML preset's model for the table at its data.path (the
        columns set the model's size), or no counts when that table is not built here."""
        from scaleyard.platform.config import resolve

        rows = []
        for name in cls.presets():
            cfg = resolve(cls.Config, [cls.presets_dir() / f"{name}.yaml"], [])
            row = {"name": name, "use": f"--preset {name}", "params": None, "flops_per_sample": None,
                   "d_token": cfg.model.d_token, "layers": cfg.model.layers, "dim_t": cfg.model.dim_t}
            try:
                config = model_config(cfg, schema_of(load_index(cfg.data.path)))
            except (DataError, ConfigError):
                rows.append({**row, "note": f"sizes need the table at {cfg.data.path} (scaleyard data build)"})
                continue
            with shapes_only():
                params = sum(p.numel() for p in TabDiff(config).parameters() if p.requires_grad)
            rows.append({**row, "params": params, "flops_per_sample": flops_per_sample(config),
                         "note": f"{config.columns} columns of {cfg.data.path}"})
        return rows

    def build_for_planning(self, cfg: DictConfig, ctx: Context, batch_size: int) -> JobParts:
        """For the planner (engine.name=auto on GPUs): the model for the table at data.path (its
        schema only) and one batch of random rows."""
        self.check(cfg, ctx.world_size)  # errors name data.path
        self.cfg, self.ctx, self.micro_batches = cfg, ctx, 0
        config = model_config(cfg, schema_of(load_index(cfg.data.path)))
        model = TabDiff(config)
        numeric = torch.randn(batch_size, config.num_numerical)
        model.fit_preprocessing(numeric.double().numpy())  # any fitted transform has the same shapes
        classes = torch.tensor(config.categories, dtype=torch.long)
        categorical = torch.randint(0, 2**30, (batch_size, len(classes))) % classes
        return JobParts(model=model, train_data=[{"numeric": numeric, "categorical": categorical}])

    def state_dict(self) -> dict[str, Any]:
        # the schema travels with the weights: `scaleyard sample` needs no access to the data
        return {"micro_batches": self.micro_batches, "schema": self.schema.to_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_batches = int(state.get("micro_batches", 0))

    def write_samples(self, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
                      request: SampleRequest) -> dict[str, Any]:
        if "schema" not in job_state:
            raise DataError("the checkpoint's job state has no table schema; it was not written by the tabdiff job")
        schema = Schema.from_state(job_state["schema"], "the checkpoint's schema")
        if request.out.suffix not in (".csv", ".parquet"):
            raise DataError(f"--out {request.out}: the file name must end in .csv or .parquet")
        model = TabDiff(model_config(cfg, schema))
        model.load_state_dict(weights)
        model.eval()
        generator = torch.Generator().manual_seed(request.seed)
        sampler = sampler_config(cfg)
        if not request.impute:
            if request.rows <= 0:
                raise ConfigError("--rows: give the number of rows to generate (a positive integer)")
            nums, cats = sample(model, request.rows, sampler, generator)
            frame = to_frame(nums, cats, schema)
            check = check_rows(nums, cats, None, schema)
        else:
            frame, check = self._impute_rows(model, schema, request, sampler, generator)
        write_rows(frame, request.out)
        return {**check, "rows": len(frame), "columns": len(frame.columns)}

    def _impute_rows(self, model: TabDiff, schema: Schema, request: SampleRequest, sampler: SamplerConfig,
                     generator: torch.Generator):
        unknown = [n for n in request.impute if n not in schema.names]
        if unknown:
            raise DataError(f"--impute {','.join(unknown)}: not a column of this run; "
                            f"columns: {', '.join(schema.names)}")
        if not request.known:
            raise DataError("--impute needs --known FILE_OR_SPLIT: the rows whose other columns are known")
        free = set(request.impute)
        frame, nums, cats = read_rows(request.known, schema, free)
        if request.rows > 0:
            frame, nums, cats = frame.iloc[: request.rows], nums[: request.rows], cats[: request.rows]
        known_num = torch.tensor([n not in free for n in schema.numerical], dtype=torch.bool)
        known_cat = torch.tensor([c["name"] not in free for c in schema.categorical], dtype=torch.bool)
        result = impute(model, nums, cats, known_num, known_cat, sampler, generator)
        imputed = to_frame(result.numerical, result.categorical, schema)
        out = frame.reset_index(drop=True).copy()
        for name in schema.names:  # known columns stay exactly as read; imputed ones are filled
            if name in free or name not in out.columns:
                out[name] = imputed[name]
        out = out[schema.names + [c for c in out.columns if c not in schema.names]]
        return out, check_rows(result.numerical, result.categorical, None, schema)


def model_deviations(cfg: DictConfig) -> str:
    """This run's departures from the reference's denoiser and loss, "" when there are none."""
    m = cfg.model
    out = [f"model.{name}" for name in ("mid_residual", "extra_norms", "mid_input_silu") if m[name]]
    if m.num_weight_end != 0:
        out.append(f"numerical loss annealed to {m.num_weight_end} (reference: 0)")
    return ", ".join(out)


def deviations(cfg: DictConfig) -> str:
    """Every departure of this run from the reference's model and training (README: "TabDiff vs the
    reference"); the last two are the same for every run."""
    out = [model_deviations(cfg)] if model_deviations(cfg) else []
    out.append("per-column-dropout guidance model (reference: a separate target-only model)")
    out.append("EMA and LR schedule per step (reference: per epoch, ReduceLROnPlateau)")
    return ", ".join(out)


def check_rows(nums: torch.Tensor, cats: torch.Tensor, train_num: torch.Tensor | None,
               schema: Schema) -> dict[str, float]:
    """Schema checks of generated rows: finite numbers (inside the training range when given) and
    category indices the schema has. A violation is a bug, so it raises instead of scoring."""
    if not torch.isfinite(nums).all():
        raise RuntimeError("the sampler produced NaN/inf numbers")
    if train_num is not None and len(schema.numerical):
        low, high = train_num.min(0).values, train_num.max(0).values
        if ((nums < low) | (nums > high)).any():
            raise RuntimeError("the sampler produced numbers outside the training range")
    limits = torch.tensor(schema.categories, dtype=torch.long)
    if len(limits) and ((cats < 0) | (cats >= limits)).any():
        raise RuntimeError("the sampler produced category indices outside the schema")
    return {"rows": float(len(cats))}


JOB = TabDiffJob
