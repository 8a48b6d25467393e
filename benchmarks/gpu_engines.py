"""bf16 training throughput of the DiT / U-ViT presets under each engine, through the platform's
own engine path (make_engine -> wrap -> set_optimizer -> backward -> clip_and_step): tokens/s,
TFLOP/s per GPU, MFU and peak memory. Prints JSON (one record per preset x engine).

    python benchmarks/gpu_engines.py                                  # one GPU: ddp vs ZeRO-3
    torchrun --nproc_per_node 8 benchmarks/gpu_engines.py --engines ddp,zero3,tp   # + TP over all GPUs
    python benchmarks/gpu_engines.py --smoke                          # CPU, tiny presets, 2 steps

Compare engines within one run (same machine, same moment): the ratio is the result.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from timing import seconds_per_step  # benchmarks/timing.py (run as scripts)

from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import TP_PLAN, build_model, count_parameters, flops_per_sample
from scaleyard.models.presets import preset
from scaleyard.platform.config import TrainingConfig, resolve
from scaleyard.platform.distributed import env_from_os, pick_device
from scaleyard.platform.engines import make_engine
from scaleyard.platform.metrics import peak_tflops
from scaleyard.platform.optim import default_param_groups, make_optimizer

ENGINES = {  # benchmark name -> config overrides
    "ddp": ["engine.name=ddp"],
    "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"],
    "tp": ["engine.name=megatron"],  # tp_size = all GPUs
}
DEFAULT_PRESETS = "dit_adaln-0.3B,dit_cross-0.3B,uvit-0.3B,dit_adaln-1B,uvit-1B,dit_adaln-2.3B"


def measure(name: str, engine_name: str, micro_batch: int, steps: int, warmup: int, checkpointing: bool) -> dict:
    env = env_from_os()
    device = pick_device(env)
    world = env.world_size
    overrides = [*ENGINES[engine_name], f"train.batch_size={micro_batch * world}", "train.precision=bf16",
                 f"train.activation_checkpointing={str(checkpointing).lower()}"]
    if engine_name == "tp":
        overrides += [f"engine.tp_size={world}", f"train.batch_size={micro_batch}"]
    cfg = resolve(TrainingConfig, [], overrides)
    model_cfg = preset(name)
    torch.manual_seed(0)
    engine = make_engine(cfg, env, device)
    engine.wrap(build_model(model_cfg), {}, tp_plan=TP_PLAN)
    optimizer = make_optimizer(default_param_groups(engine.module, 0.0), cfg.optim)
    model = engine.set_optimizer(optimizer)
    batch = micro_batch  # per replica; the TP ranks of one replica share it
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, model_cfg.channels, model_cfg.image_size, model_cfg.image_size, generator=g).to(device)
    text = torch.randn(batch, model_cfg.text_len, model_cfg.text_dim, generator=g).to(device)
    mask = torch.ones(batch, model_cfg.text_len, dtype=torch.bool, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            t = torch.rand(batch, device=device)
            loss = flow.training_loss(model, x, text, mask, t, torch.randn_like(x)).mean()
        engine.backward(loss)
        engine.clip_and_step(1.0)

    seconds = seconds_per_step(step, device, steps, warmup)
    replicas = 1 if engine_name == "tp" else world
    samples_per_s = batch * replicas / seconds
    tokens = model_cfg.image_tokens + (model_cfg.text_len if model_cfg.arch == "uvit" else 0)
    tflops_per_gpu = flops_per_sample(model_cfg) * samples_per_s / world / 1e12
    peak = peak_tflops(device, "bf16")
    planned = planner_estimate_gb(name, engine_name, world, batch, checkpointing)
    return {
        "preset": name, "engine": engine_name, "gpus": world, "params": count_parameters(model_cfg),
        "micro_batch": batch, "activation_checkpointing": checkpointing, "step_s": round(seconds, 4),
        "tokens_per_s": round(samples_per_s * tokens, 1), "tflops_per_gpu": round(tflops_per_gpu, 2),
        "mfu": round(tflops_per_gpu / peak, 4) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        # the planner's `allocated` for the same setting: the GPU check of platform/planner.py
        "planner_estimate_gb": round(planned, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def planner_estimate_gb(name: str, engine_name: str, world: int, micro_batch: int, checkpointing: bool) -> float:
    """What the planner predicts torch.cuda.max_memory_allocated to be (GB, 2**30 bytes) for the
    t2i model with this preset (the benchmark trains its denoiser; the small hashed text encoder is
    within the noise)."""
    from scaleyard.jobs.t2i.job import Config, TextToImageJob
    from scaleyard.platform.planner import Candidate, estimate

    shape = TextToImageJob.memory_shape(resolve(Config, [], [f"model.preset={name}"]))
    engine, stage, tp = {"ddp": ("ddp", 0, 1), "zero2": ("deepspeed", 2, 1), "zero3": ("deepspeed", 3, 1),
                         "tp": ("megatron", 0, world)}[engine_name]
    candidate = Candidate(engine, zero_stage=stage, tp_size=tp, activation_checkpointing=checkpointing)
    return estimate(shape, candidate, world, micro_batch, "bf16").allocated / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--engines", default="ddp,zero3")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the code path: tiny presets, 2 steps")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.micro_batch, args.steps, args.warmup = "dit_adaln-cpu-xs,uvit-cpu-xs", 4, 2, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    records = []
    for name in args.presets.split(","):
        for engine_name in args.engines.split(","):
            try:
                records.append(measure(name, engine_name, args.micro_batch, args.steps, args.warmup,
                                       args.checkpointing))
            except torch.OutOfMemoryError:
                records.append({"preset": name, "engine": engine_name, "error": "out of memory"})
                torch.cuda.empty_cache()
            finally:
                if dist.is_initialized():
                    _reset_groups()
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(records, indent=1))


def _reset_groups() -> None:
    """Each measurement builds its engine from scratch (DeepSpeed and megatron keep global state)."""
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except ImportError:
        pass


if __name__ == "__main__":
    main()
