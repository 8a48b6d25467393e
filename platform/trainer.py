"""The one training loop every job runs through (DESIGN.md, "The Trainer and engines")."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from scaleyard.platform.checkpoint import Checkpointer, capture_rng, restore_rng, weights_sha256
from scaleyard.platform.config import to_yaml
from scaleyard.platform.distributed import DistEnv, init_process_group, pick_device, preflight
from scaleyard.platform.engines import make_engine
from scaleyard.platform.job import Context, EvalResult, Job
from scaleyard.platform.metrics import MetricsWriter, Progress, memory_gb, peak_tflops
from scaleyard.platform.optim import default_param_groups, make_optimizer, make_scheduler

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


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received %s: will checkpoint after the current step and stop", signal.Signals(signum).name)
        self.signal = signum


class Trainer:
    def __init__(self, job: Job, cfg: DictConfig, env: DistEnv, handle_signals: bool = True):
        self.job, self.cfg, self.env = job, cfg, env
        self.stop = _StopFlag()
        if handle_signals:
            self.stop.install()

    def run(self) -> dict[str, Any]:
        cfg, env, job = self.cfg, self.env, self.job
        run_dir = Path(cfg.run.dir)
        seed_everything(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        device = pick_device(env)
        init_process_group(env, cfg.engine.backend)
        preflight(env, device)
        engine = make_engine(cfg, env, device)
        ctx = Context(env.rank, env.world_size, env.local_rank, device, run_dir,
                      torch.Generator().manual_seed(cfg.run.seed), engine.data_rank, engine.data_world_size)

        parts = job.build(cfg, ctx)
        if parts.model is None or parts.train_data is None:
            raise ValueError(f"job {job.name}: build() must return a model and train_data to train")
        engine.wrap(parts.model, parts.frozen, tp_plan=job.tp_plan(cfg), blocks=parts.blocks)
        groups = (parts.param_groups(engine.module) if parts.param_groups
                  else default_param_groups(engine.module, cfg.optim.weight_decay))
        optimizer = make_optimizer(groups, cfg.optim)
        model = engine.set_optimizer(optimizer)
        scheduler = make_scheduler(optimizer, cfg.train.steps, cfg.optim)
        ema = engine.make_ema(cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        ema_sharded = ema is not None and ema.sharded

        checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, env.rank)
        checkpointer.clean_partial()
        engine.barrier()
        step = 0
        latest = checkpointer.latest()
        if latest is not None:
            state, rng, local = checkpointer.load(latest)
            if engine.replicated:
                engine.load_model_state(state["model"])
                engine.load_optimizer_state(state["optimizer"])
            else:
                _check_same_world(latest.path, env.world_size, engine.name)
                engine.load_state(latest.path)
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(local["ema"] if ema_sharded else state["ema"])
            job.load_state_dict(state["job"])
            parts.train_data.load_state_dict(state["data"])
            step = int(state["step"])
            loss_at_checkpoint = float(state.get("loss", float("nan")))
            if rng is not None:
                restore_rng(rng)
            log.info("resumed from %s (step %d)", latest.path, step)
        else:
            loss_at_checkpoint = float("nan")
            # replicas differ in dropout & co.; tensor-parallel ranks of one replica must draw alike
            seed_everything(cfg.run.seed * 1000 + engine.data_rank)

        main = env.rank == 0
        writer = MetricsWriter(run_dir / "tb" if main else None, purge_step=step + 1 if step else None)
        if main and step == 0:
            writer.text("config", "```yaml\n" + to_yaml(cfg) + "```")
        progress = Progress(cfg.train.steps, step, enabled=main)
        autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.train.precision])
                    if cfg.train.precision in AUTOCAST_DTYPES else contextlib.nullcontext())
        flops_per_sample = job.flops_per_sample(cfg)
        peak = peak_tflops(device, cfg.train.precision)
        accum = cfg.train.grad_accum

        def save(at_step: int) -> None:
            train_state, local_state = None, None
            if ema_sharded:
                local_state = {"ema": ema.state_dict()}
            if main:
                weights = {"model": engine.model_state(), "optimizer": engine.optimizer_state()} \
                    if engine.replicated else {}  # sharded engines: engine.save_state, every rank
                train_state = {
                    **weights,
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None and not ema_sharded else {},
                    "job": job.state_dict(),
                    "data": parts.train_data.state_dict(),
                    "step": at_step,
                    "loss": loss_value,
                    "config": to_yaml(cfg),
                }
            checkpointer.save(at_step, train_state, engine, {"engine": engine.name, "world_size": env.world_size},
                              local_state)
            writer.flush()

        def evaluate(at_step: int) -> dict[str, float]:
            result = EvalResult()
            if main or engine.collective_eval:
                eval_model = ema.shadow if ema is not None else engine.module
                was_training = eval_model.training
                eval_model.eval()
                with torch.no_grad(), autocast:
                    result = job.evaluate(eval_model, at_step)
                eval_model.train(was_training)
            if main:
                writer.scalars({f"eval/{k}": v for k, v in result.metrics.items()}, at_step)
                for tag, images in result.images.items():
                    writer.images(f"eval/{tag}", images, at_step)
                for tag, body in result.text.items():
                    writer.text(f"eval/{tag}", body, at_step)
                log.info("eval step %d %s", at_step, json.dumps(result.metrics))
            engine.barrier()
            return result.metrics

        skipped_in_a_row = 0
        data = iter(parts.train_data)
        window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0
        last_ckpt_time = time.monotonic()
        loss_value = loss_at_checkpoint
        samples_per_step = cfg.train.batch_size
        if step >= cfg.train.steps:
            log.info("checkpoint is at step %d >= train.steps: nothing left to train", step)

        while step < cfg.train.steps:
            step_loss = torch.zeros((), device=device)
            step_metrics: dict[str, float] = {}
            for micro in range(accum):
                waited = time.perf_counter()
                batch = next(data)
                window_wait += time.perf_counter() - waited
                with engine.accumulating(micro == accum - 1), autocast:
                    loss, metrics = job.train_step(model, batch)
                engine.backward(loss / accum)
                step_loss += loss.detach().float() / accum
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / accum
            time_due = (cfg.train.ckpt_every_minutes > 0
                        and time.monotonic() - last_ckpt_time >= 60 * cfg.train.ckpt_every_minutes)
            data_broken = getattr(parts.train_data, "too_many_skips", lambda: False)()
            bad_loss, stop_now, time_due, too_many_skips = engine.any_rank([
                not bool(torch.isfinite(step_loss)), self.stop.signal is not None, time_due, data_broken,
            ])
            if bad_loss:
                raise NonFiniteLossError(self._nonfinite_message(step + 1, "loss", checkpointer, engine, before=True))
            if too_many_skips:
                problems = getattr(parts.train_data, "problems", [])
                raise RuntimeError(
                    f"more than data.max_skip_share={cfg.data.max_skip_share} of samples were unreadable "
                    f"at step {step + 1}; first problems: {problems[:3]}"
                )
            grad_norm = engine.clip_and_step(cfg.train.clip_grad_norm)
            if engine.step_skipped():  # fp16 loss-scale overflow: the engine lowered the scale
                skipped_in_a_row += 1
                log.warning("step %d skipped: fp16 gradients overflowed (%d in a row)", step + 1, skipped_in_a_row)
                if skipped_in_a_row > MAX_SKIPPED_STEPS:
                    raise NonFiniteLossError(self._nonfinite_message(step + 1, "fp16 gradients", checkpointer, engine))
            else:
                skipped_in_a_row = 0
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(self._nonfinite_message(step + 1, "gradient norm", checkpointer, engine))
                scheduler.step()
                if ema is not None:
                    ema.update(engine.module, step)
            step += 1
            window_samples += samples_per_step

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                loss_value = float(engine.all_reduce(step_loss.detach().clone(), "mean"))
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                scalars = {
                    "train/loss": loss_value,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "perf/samples_per_s": window_samples / elapsed,
                    "perf/data_wait_share": window_wait / elapsed,
                    "perf/memory_gb": memory_gb(device),
                    **{f"train/{k}": v for k, v in step_metrics.items()},
                }
                skipped = getattr(parts.train_data, "skipped", None)
                if skipped is not None:
                    scalars["data/skipped_samples"] = float(skipped)
                if flops_per_sample:
                    tflops = flops_per_sample * window_samples / elapsed / env.world_size / 1e12
                    scalars["perf/tflops_per_device"] = tflops
                    if peak:
                        scalars["perf/mfu"] = tflops / peak
                writer.scalars(scalars, step)
                if main:
                    _write_progress(run_dir, step, loss_value)
                progress.update(step, {"loss": loss_value, "lr": scalars["train/lr"],
                                       "samples_per_s": scalars["perf/samples_per_s"]})
                window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0

            finished = step == cfg.train.steps
            if not finished and (stop_now or time_due or (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0)):
                save(step)
                last_ckpt_time = time.monotonic()
            if stop_now and not finished:  # a signal at the last step: finish normally instead
                writer.close()
                message = f"stopped by signal after step {step}; resume with the same command"
                raise Preempted(message, self.stop.signal)
            if not finished and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                evaluate(step)

        final_ref = checkpointer.latest()
        if final_ref is None or final_ref.step != step:
            save(step)
        eval_metrics = evaluate(step)
        samples_seen = step * cfg.train.batch_size
        summary = {
            "job": job.name,
            "step": step,
            "final_loss": loss_value,
            # ds_numel: ZeRO-3 leaves partitioned parameters empty on every rank
            "params": job.model_size(cfg) or sum(getattr(p, "ds_numel", p.numel())
                                                 for p in engine.module.parameters() if p.requires_grad),
            "samples_seen": samples_seen,
            "compute_flops": flops_per_sample * samples_seen,
            "weights_sha256": weights_sha256(engine.model_state()),
            "eval": eval_metrics,
            "world_size": env.world_size,
        }
        if main:
            writer.hparams(_hparams(cfg), {"final_loss": loss_value, **eval_metrics})
            writer.close()
            tmp = run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1))
            tmp.rename(run_dir / "summary.json")
        progress.close()
        engine.barrier()
        return summary

    @staticmethod
    def _nonfinite_message(step: int, what: str, checkpointer: Checkpointer, engine, before: bool = False) -> str:
        latest = checkpointer.latest()
        kept = f"the last good checkpoint is {latest.path}" if latest else "no checkpoint was written yet"
        stopped = ("training stopped before the optimizer step" if before or not engine.steps_before_norm_check
                   else f"{engine.name} had already applied the step; nothing after it was saved")
        return (f"non-finite {what} at step {step}: {stopped}; {kept}. "
                "Lower optim.lr, enable train.clip_grad_norm, or check the data of this step.")


def _check_same_world(checkpoint: Path, world_size: int, engine: str) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    if meta.get("world_size") != world_size:
        raise RuntimeError(
            f"{checkpoint} holds {engine} shards of {meta.get('world_size')} ranks and this run has {world_size}; "
            f"sharded checkpoints resume at the same world size (export full weights with `scaleyard export` "
            f"to start a new run from them)"
        )


def _write_progress(run_dir: Path, step: int, loss: float) -> None:
    """Small, atomically replaced file that `scaleyard status` reads (TensorBoard files are
    too slow to parse for a table of hundreds of runs)."""
    tmp = run_dir / "progress.json.tmp"
    tmp.write_text(json.dumps({"step": step, "loss": loss, "time": time.time()}))
    tmp.rename(run_dir / "progress.json")


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


__all__ = ["NonFiniteLossError", "Preempted", "Trainer", "capture_rng"]
