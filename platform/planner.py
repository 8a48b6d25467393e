"""Memory and FLOPs planner: per-GPU memory of each way to run a job, and the cheapest one that fits.

Sources of the formulas (each function says which it follows):
- Model states: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", Section 3.1 and Figure 1. Mixed-precision Adam holds 2Ψ bytes of 16-bit
  parameters, 2Ψ of 16-bit gradients and KΨ of optimizer states with K = 12 (fp32 master copy,
  momentum, variance). Stage 1 (P_os) divides the optimizer states by the data-parallel degree
  N_d, stage 2 (P_os+g) also the gradients, stage 3 (P_os+g+p) also the parameters. In fp32 there
  is no master copy: 4Ψ + 4Ψ + 8Ψ.
- Activations: Korthikanti et al. 2022 and what our models keep, per layer (DiT, U-ViT,
  Llama-style language models with their [tokens x vocab] logits): platform/planner_shapes.py.
- Activation checkpointing keeps each layer's input (s·h elements) and recomputes one layer at a
  time in backward (Korthikanti et al., Section 5, "full recomputation").
- Offload: Ren et al. 2021, "ZeRO-Offload": gradients and optimizer states go to CPU memory and
  the optimizer steps there; with ZeRO-3 parameter offload (ZeRO-Infinity) the parameters too.
- A job that declares no shape is measured (platform/planner_measure.py): one forward/backward of
  its model (`Job.build_for_planning`) on real CPU tensors, or fake ones (no memory, no
  arithmetic) for large models, following every storage it allocates and frees.

Checked against the CPU allocator (tests/test_planner.py): for the CPU-ladder t2i models in fp32
the estimate of parameters + gradients + AdamW states + activations is within 4% of the measured
peak of a training step and the activations alone within 10%, with and without activation
checkpointing; under bf16 autocast the activations are within 4%. For tiny Hugging Face
LlamaForCausalLM models (grouped-query or not, tied or untied embeddings, 1000-token vocabulary)
`causal_lm_shape` is within 0.3% in fp32, with and without checkpointing (3% low with a 32-token
vocabulary, where backward's per-layer transients set the peak); under bf16 autocast 1% low
(7% with the 32-token vocabulary). The measured path of a job without a shape is within 0.1%
on real CPU tensors and about 10% high on fake ones for Hugging Face models (an explicit causal
mask). GPU peaks are not yet checked.

Engines are the platform's (platform/engines): `single`/`ddp` train fp32 weights under bf16
autocast (16 bytes/param: fp32 weights, grads, Adam m and v); `deepspeed` holds 16-bit weights
(the ZeRO paper's accounting; fp16 precision runs only there); `megatron` shards the transformer
blocks' weights and most activations over `tp_size` ranks and is otherwise the DDP path (torch DDP
over the replicas, the platform's AdamW: no megatron distributed optimizer).
The EMA (train.ema_decay > 0) is an fp32 copy of the trained weights, partitioned under ZeRO-3
(deepspeed_engine.ShardedEMA) and sharded like the weights under tensor parallelism.
Not modelled: evaluation and sampling memory, pipeline parallelism, host-memory limits of offload.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from scaleyard.platform.config import ConfigError
from scaleyard.platform.metrics import PEAK_TFLOPS
from scaleyard.platform.planner_shapes import (  # noqa: F401 (re-exported: jobs and tests use planner.X)
    BlockStack,
    MeasuredActivations,
    ModelShape,
    autocast_fp32,
    causal_lm_shape,
    causal_lm_shape_from_config,
    layer_activations,
    logits_bytes,
    stack_activations,
)

if TYPE_CHECKING:
    from scaleyard.platform.job import Job

GB = 1e9  # decimal, as the ZeRO paper's figures; an "80 GB" H100 holds 85.5e9 bytes, so this errs safe
# CUDA context (~0.5 GB with lazy module loading), cuBLAS/cuDNN workspaces and NCCL buffers: a fixed
# cost per GPU that torch.cuda.memory_allocated never shows.
FRAMEWORK_BYTES = 1.5 * GB
# The caching allocator reserves more than it hands out when shapes vary (fragmentation): a share
# of everything allocated.
FRAGMENTATION = 0.10
HEADROOM = 0.05  # of the card left free for what the plan does not model (evaluation, checkpoint I/O)
# Model FLOPs utilisation assumed for step times: Megatron-LM reports 41-47% on H100, torchtitan 33-39%.
ASSUMED_MFU = 0.40
# A micro-batch below this many tokens per GPU leaves the GPU's matmuls underfed, so the policy
# prefers an option that reaches it over a cheaper one that would need a smaller micro-batch.
MIN_TOKENS_PER_MICRO = 4096
DS_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size and allgather_bucket_size
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Candidate:
    """One way to run: an engine and its memory-relevant options."""

    engine: str  # single | ddp | deepspeed | megatron
    zero_stage: int = 0
    tp_size: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    sequence_parallel: bool = False

    @property
    def label(self) -> str:
        name = {"deepspeed": f"ZeRO-{self.zero_stage}", "megatron": f"TP{self.tp_size}"}.get(self.engine, self.engine)
        if self.sequence_parallel:
            name += "+SP"
        if self.offload_optimizer:
            name += " +offload opt" + ("+params" if self.offload_params else "")
        return name + (" +ckpt" if self.activation_checkpointing else "")


@dataclass
class MemoryBreakdown:
    """Bytes per GPU. `allocated` is what torch.cuda.max_memory_allocated would report; `total`
    adds the framework's fixed cost and fragmentation and must fit the card. `host`: bytes per
    GPU moved to CPU memory by offload."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0  # DDP gradient buckets, autocast's bf16 weight copies, ZeRO buckets / gathered layers
    host: float = 0.0

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema

    @property
    def allocated(self) -> float:
        return self.states + self.activations + self.buffers

    @property
    def total(self) -> float:
        return self.allocated * (1 + FRAGMENTATION) + FRAMEWORK_BYTES

    def as_gb(self) -> dict[str, float]:
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        parts.update(allocated=self.allocated, total=self.total)
        return {k: round(v / GB, 3) for k, v in parts.items()}


@dataclass
class CandidateReport:
    candidate: Candidate
    per_replica_batch: int  # samples per data-parallel replica per optimizer step
    max_micro_batch: int  # 0: does not fit even one sample
    memory: MemoryBreakdown  # at max_micro_batch (at 1 when nothing fits)
    activations_per_sample: float
    note: str = ""


@dataclass
class Plan:
    engine: str
    zero_stage: int
    tp_size: int
    offload_optimizer: bool
    offload_params: bool
    sequence_parallel: bool
    activation_checkpointing: bool
    micro_batch: int  # per GPU
    grad_accum: int
    gpus: int
    gpu_memory_gb: float
    memory: MemoryBreakdown
    step_flops: float  # model FLOPs of one optimizer step (all GPUs)
    step_hardware_flops: float  # with the recomputed forward of checkpointing
    step_seconds: float  # at ASSUMED_MFU of the GPUs' peak
    reasons: list[str] = field(default_factory=list)
    candidates: list[CandidateReport] = field(default_factory=list)


# --- model states (ZeRO paper) ----------------------------------------------------------------


def zero_model_states(psi: float, dp: int, stage: int, param_bytes: float = 2, grad_bytes: float = 2,
                      optimizer_bytes: float = 12) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) bytes per GPU of ZeRO stage 0-3 over `dp` ranks
    (Rajbhandari et al. 2020, Section 3.1 / Figure 1; K = optimizer_bytes)."""
    params, grads, optim = param_bytes * psi, grad_bytes * psi, optimizer_bytes * psi
    return (params / dp if stage >= 3 else params, grads / dp if stage >= 2 else grads,
            optim / dp if stage >= 1 else optim)


def state_bytes(engine: str, precision: str) -> tuple[float, float, float]:
    """Bytes per trainable parameter: (parameters, gradients, optimizer states)."""
    if engine == "deepspeed" and precision != "fp32":
        return 2, 2, 12  # ZeRO paper: 16-bit weights and grads, K = 12 (fp32 master, m, v)
    return 4, 4, 8  # fp32 weights (under autocast in 16-bit runs) and grads, Adam m and v


# --- activations of one candidate (formulas: planner_shapes.py) ------------------------------


def activation_bytes_per_sample(shape: ModelShape, cand: Candidate, precision: str) -> float:
    """Activation bytes per sample at the peak of forward+backward: the layers' kept activations
    plus the larger of two moments, the start of backward (the logits' fp32 log-softmax and its
    gradients) and, with checkpointing, the largest single layer being recomputed (by then the
    loss's tensors are freed). A measured shape (`ModelShape.measured`) gives its measurement,
    scaled by element size if measured at another precision."""
    if shape.measured is not None:
        measured = shape.measured
        per_sample = measured.checkpointed_per_sample if cand.activation_checkpointing else measured.per_sample
        return (per_sample or 0.0) * _element(precision) / _element(measured.precision)
    kept = recompute = 0.0
    for stack in shape.stacks:
        k, r = stack_activations(stack, precision, cand.tp_size, cand.sequence_parallel, cand.activation_checkpointing)
        kept, recompute = kept + k, max(recompute, r)
    logits_kept, logits_transient = logits_bytes(shape, cand.tp_size)
    return kept + max(logits_kept + logits_transient, recompute) + shape.other_activations * _element(precision)


def activation_fixed_bytes(shape: ModelShape, cand: Candidate, precision: str) -> float:
    """Activation bytes that do not grow with the micro-batch (only measured shapes have them)."""
    measured = shape.measured
    if measured is None:
        return 0.0
    fixed = measured.checkpointed_fixed if cand.activation_checkpointing else measured.fixed
    return fixed * _element(precision) / _element(measured.precision)


def _element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# --- per-GPU memory of one candidate ----------------------------------------------------------


def estimate(shape: ModelShape, cand: Candidate, gpus: int, micro_batch: int, precision: str = "bf16",
             ema: bool = False, deepspeed: dict | None = None) -> MemoryBreakdown:
    """Per-GPU memory of `cand` on `gpus` GPUs at `micro_batch` samples per GPU."""
    tp = cand.tp_size
    dp = max(1, gpus // tp)
    sharded = sum(s.parameters for s in shape.stacks if s.tensor_parallel) if tp > 1 else 0
    if tp > 1 and shape.vocab_parallel:
        sharded += shape.embedding_parameters
    psi = shape.trainable - sharded + sharded / tp  # trainable parameters this rank holds
    p_bytes, g_bytes, o_bytes = state_bytes(cand.engine, precision)
    stage = cand.zero_stage if cand.engine == "deepspeed" else 0
    params, grads, optim = zero_model_states(psi, dp, stage, p_bytes, g_bytes, o_bytes)
    frozen = shape.frozen * p_bytes
    frozen /= dp if stage >= 3 else 1  # ZeRO-3 partitions frozen modules too (DESIGN.md, engines)
    ema_bytes = 4 * psi / (dp if stage >= 3 else 1) if ema else 0.0  # the EMA lives beside its parameters
    mem = MemoryBreakdown(params=params + frozen, grads=grads, optimizer=optim, ema=ema_bytes)
    if cand.offload_optimizer:  # ZeRO-Offload: gradient partitions go to the CPU Adam with the states
        mem.host, mem.optimizer, mem.grads = mem.optimizer + mem.grads, 0.0, 0.0
    if cand.offload_params and stage >= 3:
        mem.host += mem.params + mem.ema
        mem.params = mem.ema = 0.0
    mem.buffers = engine_buffers(shape, cand, psi, precision, stage, deepspeed or {})
    mem.activations = (micro_batch * activation_bytes_per_sample(shape, cand, precision)
                       + activation_fixed_bytes(shape, cand, precision))
    return mem


def engine_buffers(shape: ModelShape, cand: Candidate, psi: float, precision: str, stage: int,
                   deepspeed: dict) -> float:
    """Memory an engine allocates beyond the model states."""
    out = 0.0
    if cand.engine != "deepspeed" and precision != "fp32":
        out += 2 * (psi + shape.frozen)  # autocast caches a 16-bit copy of each weight until backward
    if cand.engine in ("ddp", "megatron"):
        out += 4 * psi  # DDP's reducer copies grads into flat buckets (gradient_as_bucket_view=False)
    if cand.engine == "deepspeed":
        zero = deepspeed.get("zero_optimization", {})
        grad_bytes = 4 if precision == "fp32" else 2
        if stage in (1, 2):
            buckets = sum(min(psi, float(zero.get(key, DS_BUCKET_ELEMENTS)))
                          for key in ("reduce_bucket_size", "allgather_bucket_size"))
            out += buckets * grad_bytes
        elif stage == 3:  # gathered full parameters of the running and the prefetched layer, one layer's grads
            # the largest module gathered at once: a layer, or a language model's embedding matrix
            modules = [s.parameters / s.layers for s in shape.stacks if s.layers]
            modules += [shape.embedding_parameters] if shape.embedding_parameters else []
            layer = max(modules, default=min(psi, 5e7))
            out += layer * (2 * grad_bytes + grad_bytes)
    return out


# --- FLOPs -------------------------------------------------------------------------------------


def block_flops_per_sample(shape: ModelShape) -> float:
    """Training FLOPs (6 x forward MACs) of the stacks' layers: linear layers per token, attention
    scores per token pair, adaLN once per sample."""
    macs = 0.0
    for s in shape.stacks:
        h, n = s.hidden, s.tokens
        mlp_matrices = 3 if s.gated_mlp else 2
        per_token = (2 + 2 * s.kv_share + mlp_matrices * s.mlp_share) * h * h + 2 * n * h
        if s.context_tokens:
            per_token += 2 * h * h + 2 * s.context_tokens * h + 2 * h * h * s.context_tokens / n
        layer = n * per_token + (6 * h * h if s.adaln else 0)
        macs += s.layers * layer + s.skip_layers * n * 2 * h * h
    return 6.0 * macs


def step_flops(job_cls: type[Job], cfg: DictConfig, shape: ModelShape | None,
               checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one optimizer step: job.flops_per_sample x global batch;
    checkpointing recomputes the blocks' forward, a third of their forward+backward."""
    per_sample = float(job_cls.flops_per_sample(cfg))
    model = per_sample * cfg.train.batch_size
    if not checkpointing or shape is None:
        return model, model
    blocks = min(per_sample, block_flops_per_sample(shape)) * cfg.train.batch_size
    return model, model + blocks / 3


# --- the policy --------------------------------------------------------------------------------


def candidates(shape: ModelShape, cfg: DictConfig, gpus: int, gpus_per_node: int = GPUS_PER_NODE) -> list[Candidate]:
    """Every option, cheapest first: ddp, ZeRO-1/2/3, the same with activation checkpointing, tensor
    parallelism within a node (tp dividing the heads and the GPUs), then ZeRO-Offload."""
    replace = dataclasses.replace
    base = [Candidate("single")] if gpus == 1 else [Candidate("ddp"), *(Candidate("deepspeed", s) for s in (1, 2, 3))]
    out = [*base, *(replace(c, activation_checkpointing=True) for c in base)]
    heads = [h for s in shape.stacks if s.tensor_parallel for h in (s.heads, s.kv_heads or s.heads)]
    for tp in (2, 4, 8):
        if heads and tp <= min(gpus, gpus_per_node) and gpus % tp == 0 and all(h % tp == 0 for h in heads):
            # without sequence parallelism: the megatron engine refuses it (it needs TE/apex norms)
            tp_cand = Candidate("megatron", tp_size=tp)
            out += [tp_cand, replace(tp_cand, activation_checkpointing=True)]
    for stage, params in ((2, False), (3, False), (3, True)):
        off = Candidate("deepspeed", stage, offload_optimizer=True, offload_params=params)
        out += [off, replace(off, activation_checkpointing=True)]
    if cfg.train.precision == "fp16":  # loss scaling: DeepSpeed only (engines.check_engine)
        out = [c for c in out if c.engine == "deepspeed"]
    if not shape.checkpointable:  # nothing to checkpoint
        out = [c for c in out if not c.activation_checkpointing]
    elif cfg.train.activation_checkpointing:  # the user asked for it
        out = [c for c in out if c.activation_checkpointing]
    return out


def _report(shape: ModelShape, cand: Candidate, cfg: DictConfig, gpus: int, budget: float) -> CandidateReport:
    dp = gpus // cand.tp_size
    batch = int(cfg.train.batch_size)
    precision, ema = str(cfg.train.precision), cfg.train.ema_decay > 0
    extra = dict(cfg.engine.deepspeed)

    def mem(micro: int) -> MemoryBreakdown:
        return estimate(shape, cand, gpus, micro, precision, ema, extra)

    per_sample = activation_bytes_per_sample(shape, cand, precision)
    if batch % dp:
        return CandidateReport(cand, 0, 0, mem(1), per_sample,
                               f"global batch {batch} does not split over {dp} data-parallel replicas")
    per_replica = batch // dp
    for micro in sorted((m for m in range(1, per_replica + 1) if per_replica % m == 0), reverse=True):
        if mem(micro).total <= budget:
            return CandidateReport(cand, per_replica, micro, mem(micro), per_sample)
    return CandidateReport(cand, per_replica, 0, mem(1), per_sample,
                           f"needs {mem(1).total / GB:.1f} GB at micro-batch 1")


def job_shape(job_cls: type[Job], cfg: DictConfig) -> ModelShape:
    """The job's declared `memory_shape`, else one measured from its `build_for_planning`
    model (platform/planner_measure.py); ConfigError naming the job and both hooks when it has
    neither."""
    shape = job_cls.memory_shape(cfg)
    if shape is not None:
        return shape
    from scaleyard.platform.planner_measure import measure_shape

    return measure_shape(job_cls, cfg)


def recommend(job_cls: type[Job], cfg: DictConfig, gpus: int, gpu_memory_gb: float, *, gpu: str = "H100",
              gpus_per_node: int = GPUS_PER_NODE, headroom: float = HEADROOM) -> Plan:
    """The cheapest option that fits `gpus` GPUs of `gpu_memory_gb` GB each with `headroom`, at the
    largest micro-batch that divides the per-replica batch (global batch = micro x gpus/tp x
    grad_accum). An option is taken when its micro-batch reaches MIN_TOKENS_PER_MICRO tokens (or
    the whole per-replica batch); if none does, the one with the largest micro-batch. Raises
    ConfigError naming the smallest memory needed when nothing fits."""
    if gpus < 1 or gpu_memory_gb <= 0:
        raise ConfigError(f"plan: need at least one GPU with memory > 0 (got {gpus} GPUs of {gpu_memory_gb} GB)")
    shape = job_shape(job_cls, cfg)
    budget = gpu_memory_gb * GB * (1 - headroom)
    options = candidates(shape, cfg, gpus, gpus_per_node)
    if job_cls.tp_plan(cfg) is None:  # megatron refuses a job without a tensor-parallel plan
        options = [c for c in options if c.engine != "megatron"]
    reports = [_report(shape, c, cfg, gpus, budget) for c in options]
    fitting = [r for r in reports if r.max_micro_batch]
    if not fitting:
        least = min(reports, key=lambda r: r.memory.total)
        raise ConfigError(
            f"nothing fits {gpus} GPU(s) of {gpu_memory_gb:g} GB ({budget / GB:.1f} GB usable after {headroom:.0%} "
            f"headroom): the smallest option, {least.candidate.label}, needs at least {least.memory.total / GB:.1f} GB "
            f"per GPU (micro-batch 1{'; ' + least.note if least.per_replica_batch == 0 else ''}); "
            f"use more or larger GPUs or a smaller model"
            + (", or train.precision=bf16" if cfg.train.precision == "fp32" else ""))

    def wanted(r: CandidateReport) -> int:
        return min(r.per_replica_batch, math.ceil(MIN_TOKENS_PER_MICRO / shape.tokens) if shape.tokens else 10**9)

    good = [r for r in fitting if r.max_micro_batch >= wanted(r)]
    chosen = good[0] if good else max(fitting, key=lambda r: r.max_micro_batch)  # max keeps the first of ties
    return _plan(job_cls, cfg, shape, gpus, gpu_memory_gb, gpu, budget, reports, chosen, bool(good))


def _plan(job_cls: type[Job], cfg: DictConfig, shape: ModelShape, gpus: int, gpu_memory_gb: float, gpu: str,
          budget: float, reports: list[CandidateReport], chosen: CandidateReport, efficient: bool) -> Plan:
    cand, micro = chosen.candidate, chosen.max_micro_batch
    precision = str(cfg.train.precision)
    dp = gpus // cand.tp_size
    flops, hardware = step_flops(job_cls, cfg, shape, cand.activation_checkpointing)
    peak = next((p.get(precision) for name, p in PEAK_TFLOPS.items() if name.lower() in gpu.lower()), None)
    seconds = hardware / (gpus * peak * 1e12 * ASSUMED_MFU) if peak else 0.0
    p, g, k = state_bytes("deepspeed", precision)
    reasons = [
        f"{_count(shape.trainable)} trainable + {_count(shape.frozen)} frozen parameters; {precision} Adam "
        f"model states {p:g}+{g:g}+{k:g} bytes/param = {(p + g + k) * shape.trainable / GB:.1f} GB before partitioning",
        f"usable per GPU: {budget / GB:.1f} GB ({gpu_memory_gb:g} GB less {1 - budget / (gpu_memory_gb * GB):.0%} "
        f"headroom); each estimate adds "
        f"{FRAMEWORK_BYTES / GB:g} GB CUDA context/NCCL and {FRAGMENTATION:.0%} allocator fragmentation",
    ]
    for r in reports:
        if r is chosen:
            break
        if r.max_micro_batch:
            reasons.append(f"not {r.candidate.label}: fits only micro-batch {r.max_micro_batch} "
                           f"({r.max_micro_batch * shape.tokens} tokens < {MIN_TOKENS_PER_MICRO} per GPU)")
        else:
            reasons.append(f"not {r.candidate.label}: {r.note}")
    accum = chosen.per_replica_batch // micro
    reasons.append(f"chosen {cand.label}: {chosen.memory.total / GB:.1f} GB per GPU at micro-batch {micro} "
                   f"x {dp} data-parallel replicas x grad_accum {accum} = global batch {cfg.train.batch_size}")
    lanes = cfg.data.lanes if "data" in cfg else 0
    if lanes and lanes % dp:
        reasons.append(f"also set data.lanes={math.lcm(lanes, dp)}: the {lanes} reader lanes must split evenly over "
                       f"the {dp} data-parallel replicas")
    if shape.measured is not None:
        reasons.append(f"activations {shape.measured.how}: {chosen.activations_per_sample / GB:.3g} GB per sample")
    elif not shape.stacks and not shape.logits:
        reasons.append(f"activations not modelled: job {job_cls.name!r} declares no transformer stacks "
                       f"(Job.memory_shape), so the micro-batch is limited by model states only")
    if not efficient:
        reasons.append(f"no option reaches {MIN_TOKENS_PER_MICRO} tokens per micro-batch; this one allows the largest")
    if cand.activation_checkpointing:
        without = dataclasses.replace(cand, activation_checkpointing=False)
        reasons.append(f"activation checkpointing on: {chosen.activations_per_sample / GB:.3g} GB of activations "
                       f"per sample instead of {activation_bytes_per_sample(shape, without, precision) / GB:.3g}, "
                       f"for one recomputed forward of the blocks")
    if cand.tp_size > 1:
        reasons.append(f"megatron tensor parallelism over {cand.tp_size} GPUs of a node shards the blocks' weights "
                       f"and activations; the micro-batch is per tensor-parallel group")
    if chosen.memory.host:
        reasons.append(f"offload: {chosen.memory.host / GB:.1f} GB per GPU in CPU memory; the optimizer step runs "
                       f"on the CPU and slows each step")
    reasons.append(f"step: {flops:.3g} model FLOPs" + (f" ({hardware:.3g} with recomputation)" if hardware > flops
                                                       else "")
                   + (f", ~{seconds:.3g} s on {gpus} {gpu} at {ASSUMED_MFU:.0%} MFU of {peak:g} TFLOP/s {precision}"
                      if peak else f"; no peak known for GPU {gpu!r}"))
    return Plan(engine=cand.engine, zero_stage=cand.zero_stage, tp_size=cand.tp_size,
                offload_optimizer=cand.offload_optimizer, offload_params=cand.offload_params,
                sequence_parallel=cand.sequence_parallel, activation_checkpointing=cand.activation_checkpointing,
                micro_batch=micro, grad_accum=accum, gpus=gpus, gpu_memory_gb=gpu_memory_gb, memory=chosen.memory,
                step_flops=flops, step_hardware_flops=hardware, step_seconds=seconds, reasons=reasons,
                candidates=reports)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _override_items(plan: Plan) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [("engine.name", plan.engine)]
    if plan.engine == "deepspeed":
        items += [("engine.zero_stage", plan.zero_stage), ("engine.offload_optimizer", plan.offload_optimizer),
                  ("engine.offload_params", plan.offload_params)]
    if plan.engine == "megatron":
        items += [("engine.tp_size", plan.tp_size), ("engine.sequence_parallel", plan.sequence_parallel)]
    return [*items, ("train.grad_accum", plan.grad_accum),
            ("train.activation_checkpointing", plan.activation_checkpointing)]


def overrides(plan: Plan) -> list[str]:
    """The plan as a dotlist to paste after `scaleyard run/submit JOB`."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in _override_items(plan)]


def resolve_auto(job_cls: type[Job], cfg: DictConfig, world_size: int, gpu_memory_gb: float | None) -> dict[str, Any]:
    """What `engine.name=auto` becomes, as {dotted key: value} to merge into the config before
    anything is built. With no GPU memory known (CPU runs): single for one process, ddp for
    several. On GPUs: the planner's recommendation (engine, ZeRO stage / TP size, offload,
    grad_accum, activation checkpointing) for the job's declared or measured shape; raises
    ConfigError when nothing fits, and when the job can be neither described nor measured:
    refusing before anything is queued, as for any other impossible config, beats a run that
    runs out of GPU memory after its wait in the queue, or wastes GPUs, on a silent DDP (the fix
    is one override, engine.name=ddp, or one hook in the job)."""
    if gpu_memory_gb is None:
        return {"engine.name": "ddp" if world_size > 1 else "single"}
    return dict(_override_items(recommend(job_cls, cfg, world_size, gpu_memory_gb)))


def device_memory_gb(device: Any) -> float | None:
    """Memory of a CUDA device in GB (the planner's unit); None on CPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GB
