"""The memory and FLOPs planner (platform/planner.py): the ZeRO paper's per-stage numbers, estimates
against memory measured on CPU, the recommendation policy, and `scaleyard plan`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile

from scaleyard.jobs.t2i.job import TextToImage, TextToImageJob, model_configs
from scaleyard.platform import planner
from scaleyard.platform.config import ConfigError, check_config, resolve
from scaleyard.platform.engines.activation_checkpointing import apply_activation_checkpointing
from scaleyard.platform.planner_report import load_config

from conftest import scaleyard


def t2i_config(*overrides: str) -> DictConfig:
    return load_config("t2i", list(overrides))[1]


def test_zero_paper_figure_1() -> None:
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, K = 12, model states per GPU."""
    psi, dp = 7.5e9, 64
    shape = planner.ModelShape(parameters=int(psi), trainable=int(psi))
    figure = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.88}
    for stage, gb in figure.items():
        mem = planner.estimate(shape, planner.Candidate("deepspeed", stage), gpus=dp, micro_batch=1, precision="bf16")
        assert (mem.params, mem.grads, mem.optimizer) == planner.zero_model_states(psi, dp, stage)
        assert round(mem.states / 1e9, 2 if stage == 3 else 1) == gb
        assert mem.ema == mem.activations == 0
    # the formulas behind the rounded figures: 2Ψ+2Ψ+KΨ/N_d, 2Ψ+(2+K)Ψ/N_d, (2+2+K)Ψ/N_d
    assert sum(planner.zero_model_states(psi, dp, 1)) == 4 * psi + 12 * psi / dp
    assert sum(planner.zero_model_states(psi, dp, 2)) == 2 * psi + 14 * psi / dp
    assert sum(planner.zero_model_states(psi, dp, 3)) == 16 * psi / dp
    # fp32 Adam has no master copy: 4 + 4 + 8 bytes/param, partitioned the same way
    fp32 = planner.estimate(shape, planner.Candidate("deepspeed", 1), gpus=dp, micro_batch=1, precision="fp32")
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * psi, 4 * psi, 8 * psi / dp)


def _measure_step(cfg: DictConfig, batch: int) -> tuple[int, int, int]:
    """Peak bytes the CPU allocator holds over building the model and two real AdamW steps (fp32,
    gradients kept between steps as under gradient accumulation); parameters + gradients + AdamW
    state bytes counted from the tensors; the peak of the second forward+backward above them."""
    torch.manual_seed(0)
    denoiser, text = model_configs(cfg)
    images = torch.randn(batch, denoiser.channels, denoiser.image_size, denoiser.image_size)
    captions = ["a grey pullover with long sleeves"] * batch
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = TextToImage(denoiser, text)
        if cfg.train.activation_checkpointing:
            assert apply_activation_checkpointing(model) == denoiser.depth + text.depth
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
        for _ in range(2):
            model(images, captions, torch.rand(batch), torch.randn_like(images), "flow").mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    adam = sum(state[k].numel() * state[k].element_size() for state in optimizer.state.values()
               for k in ("exp_avg", "exp_avg_sq"))  # not the scalar step counters
    states = 2 * params + adam
    return peak, states, peak - states


@pytest.mark.parametrize("preset,batch", [("uvit-cpu-s", 32), ("dit_adaln-cpu-m", 8), ("dit_cross-cpu-m", 16)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_cpu_measurement(preset: str, batch: int, checkpointing: bool) -> None:
    cfg = t2i_config(f"model.preset={preset}", f"train.batch_size={batch}", "train.precision=fp32",
                     "train.ema_decay=0", f"train.activation_checkpointing={checkpointing}")
    peak, states, activations = _measure_step(cfg, batch)
    shape = TextToImageJob.memory_shape(cfg)
    estimate = planner.estimate(shape, planner.Candidate("single", activation_checkpointing=checkpointing),
                                gpus=1, micro_batch=batch, precision="fp32")
    print(f"{preset} batch {batch} checkpointing={checkpointing}: measured {peak / 1e6:.2f} MB "
          f"(states {states / 1e6:.2f}, activations {activations / 1e6:.2f}), estimated "
          f"{estimate.allocated / 1e6:.2f} MB (states {estimate.states / 1e6:.2f}, "
          f"activations {estimate.activations / 1e6:.2f})")
    assert estimate.states == pytest.approx(states, rel=1e-6)  # 16 bytes/param: weights, grads, m, v
    assert estimate.allocated == pytest.approx(peak, rel=0.25)
    assert estimate.activations == pytest.approx(activations, rel=0.25)


def test_tensor_parallelism_shards_blocks_and_activations() -> None:
    shape = TextToImageJob.memory_shape(t2i_config("model.preset=dit_adaln-8B", "train.precision=bf16"))
    denoiser = shape.stacks[0]
    one = planner.estimate(shape, planner.Candidate("megatron", tp_size=1), gpus=8, micro_batch=1)
    four = planner.estimate(shape, planner.Candidate("megatron", tp_size=4), gpus=8, micro_batch=1)
    assert one.params - four.params == pytest.approx(4 * denoiser.parameters * 3 / 4)  # fp32 weights under autocast
    whole, split = planner.layer_activations(denoiser)
    kept = planner.stack_activations(denoiser, "bf16", tp=4)[0] / (denoiser.layers * denoiser.tokens * denoiser.hidden)
    assert kept == pytest.approx(whole * 2 + planner.autocast_fp32(denoiser) * 2 + split * 2 / 4)
    with_sp = planner.stack_activations(denoiser, "bf16", tp=4, sequence_parallel=True)[0]
    assert with_sp == pytest.approx(planner.stack_activations(denoiser, "bf16")[0] / 4)
    # heads 14 (uvit-0.3B): only tp=2 divides them
    uvit = t2i_config("model.preset=uvit-0.3B")
    tps = {c.tp_size for c in planner.candidates(TextToImageJob.memory_shape(uvit), uvit, 8) if c.engine == "megatron"}
    assert tps == {2}


def _check_batch_split(plan: planner.Plan, cfg: DictConfig) -> None:
    assert plan.micro_batch * (plan.gpus // plan.tp_size) * plan.grad_accum == cfg.train.batch_size
    assert plan.memory.total <= plan.gpu_memory_gb * 1e9


def test_recommendations() -> None:
    small = t2i_config("model.preset=dit_adaln-0.3B")
    plan = planner.recommend(TextToImageJob, small, gpus=8, gpu_memory_gb=80)
    assert (plan.engine, plan.tp_size, plan.activation_checkpointing) == ("ddp", 1, False)
    _check_batch_split(plan, small)

    big = t2i_config("model.preset=dit_adaln-8B", "train.precision=bf16")
    plan = planner.recommend(TextToImageJob, big, gpus=8, gpu_memory_gb=80)
    assert plan.engine != "ddp"
    assert (plan.engine, plan.zero_stage) == ("deepspeed", 3) or plan.engine == "megatron"
    assert any(reason.startswith("not ddp: needs") for reason in plan.reasons)
    assert plan.step_flops == TextToImageJob.flops_per_sample(big) * 64 and plan.step_seconds > 0
    _check_batch_split(plan, big)
    # a larger per-GPU batch on smaller cards needs checkpointing; the recompute costs a third of the blocks
    tight = t2i_config("model.preset=dit_adaln-8B", "train.precision=bf16", "train.batch_size=512")
    plan = planner.recommend(TextToImageJob, tight, gpus=8, gpu_memory_gb=40)
    assert plan.activation_checkpointing and plan.engine != "ddp"
    assert plan.step_flops < plan.step_hardware_flops <= plan.step_flops * 4 / 3
    _check_batch_split(plan, tight)

    # the overrides paste into the job's config as they are; resolve_auto returns the same choice
    pasted = resolve(TextToImageJob.Config, [], planner.overrides(plan))
    check_config(pasted, TextToImageJob.Config)
    assert (pasted.engine.name, pasted.train.grad_accum) == (plan.engine, plan.grad_accum)
    auto = planner.resolve_auto(TextToImageJob, tight, 8, 40)
    assert auto["engine.name"] == plan.engine and auto["train.activation_checkpointing"] is True
    assert planner.resolve_auto(TextToImageJob, tight, 2, None) == {"engine.name": "ddp"}
    assert planner.resolve_auto(TextToImageJob, tight, 1, None) == {"engine.name": "single"}


def test_impossible_plan_names_the_minimum() -> None:
    cfg = t2i_config("model.preset=uvit-8B", "train.precision=bf16")
    with pytest.raises(ConfigError, match=r"nothing fits 1 GPU\(s\) of 2 GB") as err:
        planner.recommend(TextToImageJob, cfg, gpus=1, gpu_memory_gb=2)
    needed = float(re.search(r"needs at least ([\d.]+) GB", str(err.value)).group(1))
    shape = TextToImageJob.memory_shape(cfg)
    smallest = min(planner.estimate(shape, c, 1, 1, "bf16", ema=True).total
                   for c in planner.candidates(shape, cfg, 1))
    assert needed == pytest.approx(smallest / 1e9, abs=0.05) and needed > 1.9
    # fp16 runs only under DeepSpeed: the planner offers nothing else
    fp16 = t2i_config("model.preset=uvit-1B", "train.precision=fp16")
    assert {c.engine for c in planner.candidates(TextToImageJob.memory_shape(fp16), fp16, 8)} == {"deepspeed"}


def test_cli_plan_table_and_json() -> None:
    args = ("plan", "t2i", "model.preset=dit_adaln-8B", "train.precision=bf16", "--gpus", "8", "--gpu-memory", "80")
    out = scaleyard(*args)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^ZeRO-3 +[\d.]+", out.stdout, re.M) and "TP8 +ckpt" in out.stdout
    assert "recommended: engine.name=deepspeed, engine.zero_stage=3" in out.stdout
    assert "  - not ddp: needs" in out.stdout
    data = json.loads(scaleyard(*args, "--json").stdout)
    assert data["engine"] == "deepspeed" and data["zero_stage"] == 3
    assert "engine.zero_stage=3" in data["overrides"] and len(data["candidates"]) >= 14
    assert data["memory_gb"]["total"] <= 80
    failed = scaleyard("plan", "t2i", "model.preset=uvit-8B", "--gpus", "1", "--gpu-memory", "2")
    assert failed.returncode == 2 and "needs at least" in failed.stderr


def test_prepare_resolves_engine_auto_with_the_planner_on_gpus() -> None:
    """`engine.name=auto` before launch: the planner's choice when GPU memory is known (from the
    cluster profile or the local GPU), recorded in the config that config.yaml will hold."""
    from scaleyard.platform.launch import prepare

    big = prepare("t2i", ["model.preset=dit_adaln-8B", "train.precision=bf16"], world_size=8, gpu_memory_gb=80)
    assert big.cfg.engine.name == "deepspeed" and big.cfg.engine.zero_stage == 3
    # the choice travels with the overrides: ranks and requeued jobs on other nodes never re-plan
    assert "engine.name=deepspeed" in big.overrides and "engine.zero_stage=3" in big.overrides
    replayed = prepare("t2i", big.overrides, world_size=8, gpu_memory_gb=40)
    assert replayed.cfg.engine == big.cfg.engine and replayed.cfg.train == big.cfg.train
    small = prepare("t2i", ["model.preset=dit_adaln-0.3B", "train.precision=bf16"], world_size=8, gpu_memory_gb=80)
    assert small.cfg.engine.name == "ddp"
    cpu = prepare("t2i", [], world_size=2, gpu_memory_gb=None)
    assert cpu.cfg.engine.name == "auto"  # resolved to ddp at start-up, so resuming on 1 rank stays allowed
