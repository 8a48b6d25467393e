"""`scaleyard export RUN --format safetensors`: one file of full fp32 (or the run's dtype)
weights from any engine's checkpoint, readable without scaleyard, DeepSpeed or megatron.

- single / ddp: the model (or EMA) state in `train_state.pt`;
- deepspeed: DeepSpeed's own consolidation (`zero_to_fp32`) of the ZeRO shards; a ZeRO-3 EMA is
  rebuilt from each rank's partitions (`local_rank<R>.pt`);
- megatron: the tensor-parallel files merged with the sharding layout saved beside them.
Never overwrites: an existing output file is an error.

Other formats belong to a job (the logic job's `--format c`, a compiled circuit): a job lists
them in `Job.export_formats` and writes them in `Job.export`; `export` finds the run's job through
the registry, so this module imports no job.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from scaleyard.platform.checkpoint import Checkpointer, CheckpointRef, weights_sha256
from scaleyard.platform.checkpoint_integrity import safe_load, verify
from scaleyard.platform.engines.activation_checkpointing import plain_names

FORMATS = ("safetensors",)
log = logging.getLogger("scaleyard")


class ExportError(RuntimeError):
    pass


def find_checkpoint(run_dir: Path, step: int | None) -> CheckpointRef:
    """Checkpoint `step`, or the newest intact one (a damaged newer one is skipped with a
    warning); every file is verified against the digests recorded when it was written."""
    found = Checkpointer(run_dir / "checkpoints", keep=1).all()
    if not found:
        raise ExportError(f"{run_dir} has no complete checkpoint (checkpoints/step_*/meta.json)")
    if step is not None:
        chosen = [ref for ref in found if ref.step == step]
        if not chosen:
            raise ExportError(f"{run_dir} has no checkpoint at step {step}; "
                              f"steps: {', '.join(str(r.step) for r in found)}")
        problems = verify(chosen[0].path)
        if problems:
            raise ExportError(f"{chosen[0].path} is damaged or unsafe: {'; '.join(problems)}")
        return chosen[0]
    for ref in reversed(found):
        problems = verify(ref.path)
        if not problems:
            return ref
        log.warning("skipping %s: %s", ref.path, "; ".join(problems))
    raise ExportError(f"{run_dir}: no intact checkpoint (every one failed verification; see the warnings)")


def full_weights(ref: CheckpointRef, ema: bool = False) -> dict[str, torch.Tensor]:
    """Single-device weights under the plain model's names (activation checkpointing's wrapper
    names, which DeepSpeed records, are removed)."""
    return plain_names(_engine_weights(ref, ema))


def _engine_weights(ref: CheckpointRef, ema: bool) -> dict[str, torch.Tensor]:
    meta = json.loads((ref.path / "meta.json").read_text())
    engine, world = meta.get("engine", "single"), int(meta.get("world_size", 1))
    state = safe_load(ref.path / "train_state.pt", map_location="cpu")
    if ema and not state.get("ema") and not (ref.path / "local_rank0.pt").exists():
        raise ExportError(f"{ref.path} holds no EMA weights (train.ema_decay was 0)")
    if engine in ("single", "ddp"):
        return dict(state["ema"] if ema else state["model"])
    if engine == "deepspeed":
        from scaleyard.platform.engines.deepspeed_engine import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = _saved_buffer_dtypes(get_fp32_state_dict_from_zero_checkpoint(str(ref.path), tag="deepspeed"),
                                     ref.path / "deepspeed")
        if not ema:
            return dict(model)
        if state.get("ema"):  # ZeRO 1-2: the EMA is replicated, saved by rank 0
            return dict(state["ema"])
        return _with_buffers(_zero3_ema(ref.path, world, {k: v.shape for k, v in model.items()}), model)
    if engine == "megatron":
        from scaleyard.platform.engines.megatron_engine import merge_ema_files, merge_shard_files

        files = sorted((ref.path / "megatron").glob("tp_rank*.pt"), key=lambda p: int(p.stem[len("tp_rank"):]))
        return merge_ema_files(ref.path, files) if ema else merge_shard_files(files)
    raise ExportError(f"{ref.path}: unknown engine {engine!r} in meta.json")


def _zero3_ema(folder: Path, world: int, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """ZeRO-3 splits each flattened parameter into `world` equal, end-padded partitions."""
    parts = [safe_load(folder / f"local_rank{r}.pt", map_location="cpu")["ema"]
             for r in range(world)]
    full = {}
    for name, shape in shapes.items():
        if name not in parts[0]:
            continue
        flat = torch.cat([p[name].flatten() for p in parts])
        full[name] = flat[: math.prod(shape)].view(shape).clone()
    return full


def _saved_buffer_dtypes(model: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 casts every floating buffer to fp32; a float64 buffer (e.g. a
    fitted quantile transform) would lose precision. The buffers are saved whole, at their own
    dtype, in the model-states file: take them from there."""
    states = sorted(folder.glob("*model_states.pt"))
    if not states:
        return model
    saved = safe_load(states[0], map_location="cpu", mmap=True)
    for name in saved.get("buffer_names", []):
        if name in model and name in saved["module"]:
            model[name] = saved["module"][name].clone()
    return model


def _with_buffers(ema: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA partitions hold parameters only; buffers are the model's (they are not averaged)."""
    return {name: ema.get(name, value) for name, value in model.items()}


def run_job_name(run_dir: Path) -> str:
    """The job of a run folder: its summary.json, else the folder layout runs/<job>/<name>."""
    from scaleyard.platform.job import registry

    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["job"]
    if run_dir.absolute().parent.name in registry():
        return run_dir.absolute().parent.name
    raise ExportError(f"cannot tell which job wrote {run_dir} (no summary.json yet); pass --job NAME")


def job_formats(job_name: str) -> dict[str, str]:
    from scaleyard.platform.job import get_job

    return get_job(job_name).export_formats()


def job_export(run_dir: Path, fmt: str, out: Path | None = None, step: int | None = None, ema: bool = False,
               job_name: str | None = None) -> dict:
    """A job-provided format: the run's weights (any engine) handed to `Job.export`."""
    from scaleyard.platform.job import get_job, saved_config
    from scaleyard.platform.weights import load_run_weights

    job_cls = get_job(job_name or run_job_name(run_dir))
    formats = job_cls.export_formats()
    if fmt not in formats:
        raise ExportError(f"--format {fmt!r} is not supported for runs of job {job_cls.name}; choose one of "
                          f"{', '.join((*FORMATS, *formats))}")
    loaded = load_run_weights(run_dir, step, ema)
    out = out or run_dir / "export" / f"step_{loaded.step:08d}{'_ema' if loaded.ema else ''}.{fmt}"
    if out.exists():
        raise ExportError(f"{out} exists; choose another --out (exports never overwrite)")
    cfg = saved_config(job_cls, loaded.config)  # a run from before a changed default reads as it was trained
    summary = job_cls().export(fmt, cfg, loaded.weights, loaded.job_state, out)
    return {"run": str(run_dir), "step": loaded.step, "ema": loaded.ema, "format": fmt, "out": str(out), **summary}


def export(run_dir: Path, fmt: str = "safetensors", out: Path | None = None, step: int | None = None,
           ema: bool = False) -> tuple[Path, str]:
    """Write the weights; returns the file and the weights' sha256 (as in summary.json)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    ref = find_checkpoint(run_dir, step)
    out = out or run_dir / "export" / f"step_{ref.step:08d}{'_ema' if ema else ''}.safetensors"
    if out.exists():
        raise ExportError(f"{out} exists; choose another --out (exports never overwrite)")
    from safetensors.torch import save_file
    from tqdm import tqdm

    # three stages of similar cost on large models; a bar on stderr only when it is a terminal
    with tqdm(total=3, desc=f"export step {ref.step}", unit="stage", disable=None, dynamic_ncols=True) as bar:
        bar.set_postfix_str("reading and consolidating the checkpoint")
        weights = {k: v.detach().contiguous().clone() for k, v in full_weights(ref, ema).items()}
        bar.update()
        bar.set_postfix_str(f"writing {out.name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        save_file(weights, str(tmp), metadata={"step": str(ref.step), "run": str(run_dir), "ema": str(ema)})
        tmp.rename(out)
        bar.update()
        bar.set_postfix_str("sha256")
        digest = weights_sha256(weights)
        bar.update()
    return out, digest
