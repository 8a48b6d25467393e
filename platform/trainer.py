"""The one training loop every job runs through (DESIGN.md, "The Trainer and engines").

`Trainer.run` reads as its steps: start (seeds, device, process group, engine), build (the job's
parts, wrapped and given an optimizer), restore (the newest checkpoint, or fresh per-replica seeds),
then the loop (one optimizer step, metrics, checkpoint or stop, evaluation), then finish (final
checkpoint, final evaluation, summary.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from scaleyard.platform.checkpoint import Checkpointer, CheckpointRef, capture_rng, restore_rng, weights_sha256
from scaleyard.platform.checkpoint_integrity import CheckpointError, set_aside, verify
from scaleyard.platform.config import AUTO_LANES, to_yaml
from scaleyard.platform.distributed import DistEnv, init_process_group, pick_device, preflight
from scaleyard.platform.engines import make_engine
from scaleyard.platform.job import Context, EvalResult, Job, JobParts
from scaleyard.platform.metrics import MetricsWriter, Progress, memory_gb, peak_tflops
from scaleyard.platform.optim import default_param_groups, make_optimizer, make_scheduler
from scaleyard.platform.tract import attach_tract
from scaleyard.platform.train_data import BuildError, train_stream

log = logging.getLogger("scaleyard")
# SLURM's --signal (USR1 by convention, USR2 from submitit) and the TERM sent at the time limit
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 loss scaling skips steps while it searches for a scale; this many in a row means the
# gradients are really non-finite
MAX_SKIPPED_STEPS = 20


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """The run checkpointed and stopped on a signal; the launcher decides whether to requeue."""

    def __init__(self, message: str, signum: int | None):
        super().__init__(message)
        self.signum = signum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Every RNG (python, numpy, torch, CUDA) as it was before the block: evaluation may sample
    freely without changing what training draws next."""
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received %s: will checkpoint after the current step and stop", signal.Signals(signum).name)
        self.signal = signum


@dataclass
class _StepOutcome:
    loss: torch.Tensor
    metrics: dict[str, float]
    grad_norm: torch.Tensor
    lr: float  # the learning rate this step's update used
    stop_requested: bool
    checkpoint_due: bool


@dataclass
class _Window:
    """Throughput and data-wait accounting between two metric logs."""

    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    data_wait: float = 0.0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    def __init__(self, job: Job, cfg: DictConfig, env: DistEnv, handle_signals: bool = True):
        self.job, self.cfg, self.env = job, cfg, env
        self.run_dir = Path(cfg.run.dir)
        self.main = env.rank == 0
        self.stop = _StopFlag()
        if handle_signals:
            self.stop.install()
        self.step = 0
        self.loss_value = float("nan")

    def run(self) -> dict[str, Any]:
        # run.deterministic sets a process-wide torch flag; restored afterwards, so that code running
        # later in the same process (stages, a driver, the next in-process run) gets the kernels it chose
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            return self._run()
        finally:
            if getattr(self, "engine", None) is not None:
                self.engine.close()
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])

    def _run(self) -> dict[str, Any]:
        self._start()
        self._build()
        self._restore()
        self._open_metrics()
        if self.step >= self.cfg.train.steps:
            log.info("checkpoint is at step %d >= train.steps: nothing left to train", self.step)
        while self.step < self.cfg.train.steps:
            outcome = self._train_step()
            self.step += 1
            self.window.samples += self.cfg.train.batch_size
            self._log_metrics(outcome)
            finished = self.step == self.cfg.train.steps
            if not finished and (outcome.stop_requested or outcome.checkpoint_due):
                self._save()
            if outcome.stop_requested and not finished:  # a signal at the last step: finish normally
                self.writer.close()
                raise Preempted(f"stopped by signal after step {self.step}; resume with the same command",
                                self.stop.signal)
            if not finished and self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
                self._evaluate()
        return self._finish()

    # --- start-up -----------------------------------------------------------------------------
    def _start(self) -> None:
        cfg, env = self.cfg, self.env
        seed_everything(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = pick_device(env)
        init_process_group(env, cfg.engine.backend)
        preflight(env, self.device)
        self.engine = make_engine(cfg, env, self.device)
        if cfg.data.lanes == 0:  # auto, when not already fixed by the launcher (see launch.choose_lanes)
            cfg.data.lanes = math.lcm(AUTO_LANES, self.engine.data_world_size)
        self.ctx = Context(env.rank, env.world_size, env.local_rank, self.device, self.run_dir,
                           torch.Generator().manual_seed(cfg.run.seed), self.engine.data_rank,
                           self.engine.data_world_size)

    def _build(self) -> None:
        cfg, job, engine = self.cfg, self.job, self.engine
        self.parts = job.build(cfg, self.ctx)
        if not isinstance(self.parts, JobParts):
            raise BuildError(f"job {job.name}: build() must return JobParts, got {type(self.parts).__name__}")
        if self.parts.model is None:
            raise BuildError(f"job {job.name}: build() returned no model; put the trainable module(s) in "
                             "JobParts(model=...)")
        self.train_data = train_stream(self.parts, cfg, self.ctx, job.name)
        if cfg.optim.get("tract", False):  # before wrapping: DDP/ZeRO then reduce the TrAct gradient
            attach_tract(self.parts.model, job.first_layer(cfg), cfg.optim.tract_lambda)
        engine.wrap(self.parts.model, self.parts.frozen, tp_plan=job.tp_plan(cfg), blocks=self.parts.blocks)
        groups = (self.parts.param_groups(engine.module) if self.parts.param_groups
                  else default_param_groups(engine.module, cfg.optim.weight_decay))
        self.optimizer = make_optimizer(groups, cfg.optim)
        self.model = engine.set_optimizer(self.optimizer)
        self.scheduler = make_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        self.ema = engine.make_ema(cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.ema_sharded = self.ema is not None and self.ema.sharded
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, self.env.rank,
                                         self.env.world_size)
        self.autocast = (torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[cfg.train.precision])
                         if cfg.train.precision in AUTOCAST_DTYPES else contextlib.nullcontext())

    def _restore(self) -> None:
        """Resume from the newest intact checkpoint. Every rank verifies its share of each
        candidate (newest first) and all ranks agree before anything is loaded; candidates that
        fail are set aside once an older one has loaded, so a requeued job never meets them again."""
        engine = self.engine
        self.checkpointer.clean_partial()
        engine.barrier()
        candidates = list(reversed(self.checkpointer.all()))
        if not candidates:
            # replicas differ in dropout & co.; tensor-parallel ranks of one replica must draw alike
            seed_everything(self.cfg.run.seed * 1000 + engine.data_rank)
            return
        failed: list[tuple[CheckpointRef, str]] = []
        for ref in candidates:
            problem = self._try_load(ref)
            if problem is None:
                self._set_aside(failed, ref)
                log.info("resumed from %s (step %d)", ref.path, self.step)
                return
            log.warning("checkpoint %s cannot be used: %s", ref.path, problem)
            failed.append((ref, problem))
        tried = "; ".join(f"{ref.path.name}: {why}" for ref, why in failed)
        raise CheckpointError(f"no intact checkpoint in {self.checkpointer.folder} (tried, newest first: {tried}). "
                              "Nothing was set aside or deleted; restore a good copy, or move the folder away to "
                              "start the run anew")

    def _try_load(self, ref: CheckpointRef) -> str | None:
        """None when `ref` verified and loaded on every rank, else the reason (agreed by all). A
        sharded checkpoint its engine cannot lay out for this world size is an error, not a damaged one."""
        problems = verify(ref.path, self.env.rank, self.env.world_size)
        if self.engine.any_rank([bool(problems)])[0]:
            return "; ".join(problems) or "another rank found it damaged (see its log)"
        if not self.engine.replicated:  # written by another world size: the engine lays its shards out anew
            ref = CheckpointRef(ref.step, self.engine.resume_folder(ref.path, _saved_world(ref.path)))
        try:
            self._load(ref)
            error = ""
        except (CheckpointError, RuntimeError, KeyError, EOFError, OSError, ValueError) as err:
            error = f"loading failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
        if self.engine.any_rank([bool(error)])[0]:
            return error or "loading failed on another rank (see its log)"
        return None

    def _load(self, ref: CheckpointRef) -> None:
        engine = self.engine
        state, rng, local = self.checkpointer.load(ref)
        if engine.replicated:
            engine.load_model_state(state["model"])
            engine.load_optimizer_state(state["optimizer"])
        else:
            engine.load_state(ref.path)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(local["ema"] if self.ema_sharded else state["ema"])
        self.job.load_state_dict(state["job"])
        self.train_data.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.loss_value = float(state.get("loss", float("nan")))
        if rng is not None:
            restore_rng(rng)

    def _set_aside(self, failed: list[tuple[CheckpointRef, str]], resumed_from: CheckpointRef) -> None:
        if self.main:
            for ref, why in failed:
                moved = set_aside(ref.path, why, resumed_from.path)
                log.warning("set aside %s as %s (%s); resuming from %s", ref.path.name, moved.name, why,
                            resumed_from.path.name)
        self.engine.barrier()

    def _open_metrics(self) -> None:
        tb_dir = self.run_dir / "tb"
        if self.main and self.step == 0 and tb_dir.exists():
            # a start that died before its first checkpoint left events for steps that will be
            # trained again: without this they would show twice in TensorBoard
            shutil.rmtree(tb_dir)
        self.writer = MetricsWriter(tb_dir if self.main else None, purge_step=self.step + 1 if self.step else None)
        if self.main and self.step == 0:
            self.writer.text("config", "```yaml\n" + to_yaml(self.cfg) + "```")
        self.progress = Progress(self.cfg.train.steps, self.step, enabled=self.main)
        self.flops_per_sample = self.job.flops_per_sample(self.cfg)
        self.peak = peak_tflops(self.device, self.cfg.train.precision)
        self.data = iter(self.train_data)
        self.window = _Window()
        self.last_checkpoint_time = time.monotonic()
        self.skipped_in_a_row = 0

    # --- one step -----------------------------------------------------------------------------
    def _train_step(self) -> _StepOutcome:
        cfg, engine = self.cfg, self.engine
        accum = cfg.train.grad_accum
        step_loss = torch.zeros((), device=self.device)
        step_metrics: dict[str, float] = {}
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(self.data)
            self.window.data_wait += time.perf_counter() - waited
            with engine.accumulating(micro == accum - 1), self.autocast:
                loss, metrics = self.job.train_step(self.model, batch)
            engine.backward(loss / accum)
            step_loss += loss.detach().float() / accum
            for key, value in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / accum
        time_due = (cfg.train.ckpt_every_minutes > 0
                    and time.monotonic() - self.last_checkpoint_time >= 60 * cfg.train.ckpt_every_minutes)
        data_broken = getattr(self.train_data, "too_many_skips", lambda: False)()
        bad_loss, stop_now, time_due, too_many_skips = engine.any_rank([
            not bool(torch.isfinite(step_loss)), self.stop.signal is not None, time_due, data_broken,
        ])
        if bad_loss:
            raise NonFiniteLossError(self._nonfinite_message("loss", before=True))
        if too_many_skips:
            problems = getattr(self.train_data, "problems", [])
            raise RuntimeError(f"more than data.max_skip_share={cfg.data.max_skip_share} of samples were unreadable "
                               f"at step {self.step + 1}; first problems: {problems[:3]}")
        lr = self.scheduler.get_last_lr()[0]  # what this update uses (the scheduler moves on after it)
        grad_norm = engine.clip_and_step(cfg.train.clip_grad_norm)
        self._after_optimizer_step(grad_norm)
        next_step = self.step + 1
        periodic = bool(cfg.train.ckpt_every) and next_step % cfg.train.ckpt_every == 0
        return _StepOutcome(step_loss, step_metrics, grad_norm, lr, stop_now, time_due or periodic)

    def _after_optimizer_step(self, grad_norm: torch.Tensor) -> None:
        """LR schedule and EMA advance only when the optimizer really stepped."""
        if self.engine.step_skipped():  # fp16 loss-scale overflow: the engine lowered the scale
            self.skipped_in_a_row += 1
            log.warning("step %d skipped: fp16 gradients overflowed (%d in a row)", self.step + 1,
                        self.skipped_in_a_row)
            if self.skipped_in_a_row > MAX_SKIPPED_STEPS:
                raise NonFiniteLossError(self._nonfinite_message("fp16 gradients"))
            return
        self.skipped_in_a_row = 0
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(self._nonfinite_message("gradient norm"))
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.engine.module, self.step)

    def _log_metrics(self, outcome: _StepOutcome) -> None:
        cfg, step = self.cfg, self.step
        if step % cfg.train.log_every and step != cfg.train.steps:
            return
        self.loss_value = float(self.engine.all_reduce(outcome.loss.detach().clone(), "mean"))
        elapsed = self.window.elapsed()
        scalars = {
            "train/loss": self.loss_value,
            "train/lr": outcome.lr,
            "train/grad_norm": float(outcome.grad_norm),
            "perf/samples_per_s": self.window.samples / elapsed,
            "perf/data_wait_share": self.window.data_wait / elapsed,
            "perf/memory_gb": memory_gb(self.device),
            **{f"train/{k}": v for k, v in outcome.metrics.items()},
        }
        skipped = getattr(self.train_data, "skipped", None)
        if skipped is not None:
            scalars["data/skipped_samples"] = float(skipped)
        if self.flops_per_sample:
            tflops = self.flops_per_sample * self.window.samples / elapsed / self.env.world_size / 1e12
            scalars["perf/tflops_per_device"] = tflops
            if self.peak:
                scalars["perf/mfu"] = tflops / self.peak
        self.writer.scalars(scalars, step)
        if self.main:
            _write_progress(self.run_dir, step, self.loss_value)
        self.progress.update(step, {"loss": self.loss_value, "lr": scalars["train/lr"],
                                    "samples_per_s": scalars["perf/samples_per_s"]})
        self.window = _Window()

    # --- checkpoints and evaluation -----------------------------------------------------------
    def _save(self) -> None:
        engine, ema = self.engine, self.ema
        train_state, local_state = None, None
        if self.ema_sharded:
            local_state = {"ema": ema.state_dict()}
        if self.main:
            weights = {"model": engine.model_state(), "optimizer": engine.optimizer_state()} \
                if engine.replicated else {}  # sharded engines: engine.save_state, every rank
            train_state = {
                **weights,
                "scheduler": self.scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None and not self.ema_sharded else {},
                "job": self.job.state_dict(),
                "data": self.train_data.state_dict(),
                "step": self.step,
                "loss": self.loss_value,
                "config": to_yaml(self.cfg),
            }
        self.checkpointer.save(self.step, train_state, engine, {"engine": engine.name,
                                                                "world_size": self.env.world_size}, local_state)
        self.writer.flush()
        self.last_checkpoint_time = time.monotonic()

    def _evaluate(self) -> dict[str, float]:
        """The job's evaluation on the EMA (or trained) model, with every RNG isolated so that
        evaluating never changes what training does next."""
        result = EvalResult()
        if self.main or self.engine.collective_eval:
            eval_model = self.ema.shadow if self.ema is not None else self.engine.module
            was_training = eval_model.training
            eval_model.eval()
            with isolated_rng(), torch.no_grad(), self.autocast, self.engine.evaluation(eval_model):
                result = self.job.evaluate(eval_model, self.step)
            eval_model.train(was_training)
        if self.main:
            self.writer.scalars({f"eval/{k}": v for k, v in result.metrics.items()}, self.step)
            for tag, images in result.images.items():
                self.writer.images(f"eval/{tag}", images, self.step)
            for tag, body in result.text.items():
                self.writer.text(f"eval/{tag}", body, self.step)
            log.info("eval step %d %s", self.step, json.dumps(result.metrics))
        self.engine.barrier()
        return result.metrics

    def _finish(self) -> dict[str, Any]:
        cfg, engine = self.cfg, self.engine
        final = self.checkpointer.latest()
        if final is None or final.step != self.step:
            self._save()
        eval_metrics = self._evaluate()
        samples_seen = self.step * cfg.train.batch_size
        summary = {
            "job": self.job.name,
            "step": self.step,
            "final_loss": self.loss_value,
            # ds_numel: ZeRO-3 leaves partitioned parameters empty on every rank
            "params": self.job.model_size(cfg) or _trained_parameters(engine),
            "samples_seen": samples_seen,
            "compute_flops": self.flops_per_sample * samples_seen,
            "weights_sha256": weights_sha256(engine.model_state()),
            "eval": eval_metrics,
            "world_size": self.env.world_size,
        }
        if self.main:
            self.writer.hparams(_hparams(cfg), {"final_loss": self.loss_value, **eval_metrics})
            self.writer.close()
            _write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.progress.close()
        engine.barrier()
        return summary

    def _nonfinite_message(self, what: str, before: bool = False) -> str:
        latest = self.checkpointer.latest()
        kept = f"the last good checkpoint is {latest.path}" if latest else "no checkpoint was written yet"
        stopped = ("training stopped before the optimizer step" if before or not self.engine.steps_before_norm_check
                   else f"{self.engine.name} had already applied the step; nothing after it was saved")
        return (f"non-finite {what} at step {self.step + 1}: {stopped}; {kept}. "
                "Lower optim.lr, enable train.clip_grad_norm, or check the data of this step.")


def _saved_world(checkpoint: Path) -> int:
    """The world size that wrote a (verified) checkpoint."""
    return int(json.loads((checkpoint / "meta.json").read_text())["world_size"])


def _trained_parameters(engine) -> int:
    """Trainable parameters of the whole model, whatever this rank holds: ZeRO-3 leaves partitioned
    parameters empty (`ds_numel` is the full count); tensor parallelism leaves a 1/tp slice of
    each split weight (marked `tensor_model_parallel`)."""
    tp = getattr(engine, "tp_size", 1)
    return sum(getattr(p, "ds_numel", p.numel()) * (tp if getattr(p, "tensor_model_parallel", False) else 1)
               for p in engine.module.parameters() if p.requires_grad)


def _write_atomic(path: Path, body: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body)
    tmp.rename(path)


def _write_progress(run_dir: Path, step: int, loss: float) -> None:
    """Small, atomically replaced file that `scaleyard status` reads (TensorBoard files are
    too slow to parse for a table of hundreds of runs)."""
    _write_atomic(run_dir / "progress.json", json.dumps({"step": step, "loss": loss, "time": time.time()}))


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif key != "dir":
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


__all__ = ["BuildError", "NonFiniteLossError", "Preempted", "Trainer", "capture_rng", "isolated_rng", "train_stream"]
