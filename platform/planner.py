"""Memory and FLOPs planner: per-GPU memory of each way to run a job, and the cheapest one that fits.

Sources of the formulas (each function says which it follows):
- Model states: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", Section 3.1 and Figure 1. Mixed-precision Adam holds 2Ψ bytes of 16-bit
  parameters, 2Ψ of 16-bit gradients and KΨ of optimizer states with K = 12 (fp32 master copy,
  momentum, variance). Stage 1 (P_os) divides the optimizer states by the data-parallel degree
  N_d, stage 2 (P_os+g) also the gradients, stage 3 (P_os+g+p) also the parameters. In fp32 there
  is no master copy: 4Ψ + 4Ψ + 8Ψ.
- Megatron without the distributed optimizer: 18 bytes/param in bf16 (bf16 params, fp32 main
  grads, fp32 master + Adam), 16 in fp32 (megatron-core docs, "Distributed Optimizer").
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Section 4: s·h·(34 + 5·a·s/h) bytes per layer and sample in 16-bit, of which 10·s·h
  (layer-norm and dropout inputs) stay whole under tensor parallelism without sequence
  parallelism and the rest divides by t. Our blocks use PyTorch's scaled_dot_product_attention
  (flash / memory-efficient kernels, on CPU too), which never stores the a·s² score matrices, so
  that term is dropped; they have no dropout (its masks drop out); and they store a few tensors
  the GPT layer of the paper does not (q/k norms, adaLN modulation and gates, cross-attention):
  `layer_activations` counts each one.
- Activation checkpointing keeps each layer's input (s·h elements) and recomputes one layer at a
  time in backward (Korthikanti et al., Section 5, "full recomputation").

Engines are the platform's (platform/engines): `single`/`ddp` train fp32 weights under bf16
autocast; `deepspeed` holds 16-bit weights (the ZeRO paper's accounting); `megatron` shards the
transformer blocks' weights and most activations over `tp_size` ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from scaleyard.platform.config import ConfigError
from scaleyard.platform.metrics import PEAK_TFLOPS

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
class BlockStack:
    """A stack of identical transformer layers, as far as memory is concerned.

    tokens: sequence length of one sample (U-ViT: time + text + image tokens).
    parameters: trainable parameters inside these layers (what tensor parallelism divides).
    context_tokens: keys/values of a cross-attention per layer (DiT-cross: text tokens); 0 = none.
    skip_layers: layers that concatenate a long skip before their first matmul (U-ViT out-blocks).
    tensor_parallel: megatron shards this stack (the denoiser), or leaves it whole (a small text encoder).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    tokens: int
    parameters: int = 0
    mlp_ratio: float = 4.0
    adaln: bool = False
    qk_norm: bool = True
    context_tokens: int = 0
    skip_layers: int = 0
    tensor_parallel: bool = True


@dataclass(frozen=True)
class ModelShape:
    """What a job tells the planner about its model (`Job.memory_shape`).

    parameters = trainable + frozen. other_activations: elements per sample stored outside the
    stacks (inputs, embeddings, output head, loss), counted once.
    """

    parameters: int
    trainable: int
    frozen: int = 0
    stacks: tuple[BlockStack, ...] = ()
    other_activations: int = 0

    @property
    def tokens(self) -> int:
        return max((s.tokens for s in self.stacks), default=0)


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

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("memory", "candidates")}
        out["memory_gb"] = self.memory.as_gb()
        out["overrides"] = overrides(self)
        out["candidates"] = [{"candidate": c.candidate.label, **dataclasses.asdict(c.candidate),
                              "max_micro_batch": c.max_micro_batch, "per_replica_batch": c.per_replica_batch,
                              "memory_gb": c.memory.as_gb(), "note": c.note,
                              "activations_per_sample_gb": round(c.activations_per_sample / GB, 4)}
                             for c in self.candidates]
        return out


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
    if precision == "fp32":
        return 4, 4, 8  # fp32 weights and grads, Adam m and v
    if engine == "deepspeed":
        return 2, 2, 12  # ZeRO paper: 16-bit weights and grads, K = 12
    if engine == "megatron":
        return 2, 4, 12  # bf16 weights, fp32 main grads, fp32 master + m + v (18 bytes/param)
    return 4, 4, 8  # single/ddp: fp32 weights under bf16 autocast


# --- activations (Korthikanti et al. 2022) ----------------------------------------------------


def layer_activations(stack: BlockStack) -> tuple[float, float]:
    """Elements stored for backward by one layer, per token and hidden unit: (whole under tensor
    parallelism, divided by it). Korthikanti et al.'s 34 bytes = 17 16-bit elements, less two
    dropout masks, is 4 + (4 + 2r): layer-norm inputs and the inputs of the QKV and fc1 matmuls
    stay whole; q, k, v, the attention output and the MLP's 2r divide."""
    whole, split = 4.0, 4.0 + 2 * stack.mlp_ratio
    split += 1  # SDPA keeps its output for backward and the projection keeps a re-laid-out copy
    if stack.qk_norm:
        split += 2  # normalised q and k beside the raw qkv output
    if stack.adaln:
        whole += 4  # adaLN-Zero: each modulation keeps the norm output, each gate its branch output
    if stack.context_tokens:
        whole += 2  # the cross-attention's layer-norm input and output
        split += 4 + 3 * stack.context_tokens / stack.tokens  # q, normed q, output, copy; k, v, normed k
    return whole, split


def stack_activations(stack: BlockStack, tp: int = 1, sequence_parallel: bool = False,
                      checkpointing: bool = False) -> tuple[float, float]:
    """(kept through the step, one layer's worth live while it is recomputed) elements per sample.
    With checkpointing only each layer's input stays (s·h); without, every layer's activations."""
    tokens_hidden = stack.tokens * stack.hidden
    whole, split = layer_activations(stack) if stack.tensor_parallel else (sum(layer_activations(stack)), 0.0)
    t = tp if stack.tensor_parallel else 1
    per_layer = (whole / (t if sequence_parallel else 1) + split / t) * tokens_hidden
    skips = stack.skip_layers * 2 * tokens_hidden / (t if sequence_parallel else 1)  # the [x, skip] concat
    if not checkpointing:
        return stack.layers * per_layer + skips, 0.0
    return stack.layers * tokens_hidden / (t if sequence_parallel else 1), per_layer + 2 * tokens_hidden


def activation_bytes_per_sample(shape: ModelShape, cand: Candidate, precision: str) -> float:
    """Activation bytes per sample at the peak of forward+backward: all kept activations plus,
    with checkpointing, the largest single layer being recomputed."""
    element = 4 if precision == "fp32" else 2  # Korthikanti et al. count 16-bit activations
    kept = recompute = 0.0
    for stack in shape.stacks:
        k, r = stack_activations(stack, cand.tp_size, cand.sequence_parallel, cand.activation_checkpointing)
        kept, recompute = kept + k, max(recompute, r)
    return (kept + recompute + shape.other_activations) * element


# --- per-GPU memory of one candidate ----------------------------------------------------------


def estimate(shape: ModelShape, cand: Candidate, gpus: int, micro_batch: int, precision: str = "bf16",
             ema: bool = False, deepspeed: dict | None = None) -> MemoryBreakdown:
    """Per-GPU memory of `cand` on `gpus` GPUs at `micro_batch` samples per GPU."""
    tp = cand.tp_size
    dp = max(1, gpus // tp)
    sharded = sum(s.parameters for s in shape.stacks if s.tensor_parallel) if tp > 1 else 0
    psi = shape.trainable - sharded + sharded / tp  # trainable parameters this rank holds
    p_bytes, g_bytes, o_bytes = state_bytes(cand.engine, precision)
    stage = cand.zero_stage if cand.engine == "deepspeed" else 0
    params, grads, optim = zero_model_states(psi, dp, stage, p_bytes, g_bytes, o_bytes)
    frozen = shape.frozen * (p_bytes if cand.engine != "single" and cand.engine != "ddp" else 4)
    frozen /= dp if stage >= 3 else 1  # ZeRO-3 partitions frozen modules too (DESIGN.md, engines)
    ema_bytes = 4 * psi / (dp if stage >= 3 else 1) if ema else 0.0  # the EMA lives beside its parameters
    mem = MemoryBreakdown(params=params + frozen, grads=grads, optimizer=optim, ema=ema_bytes)
    if cand.offload_optimizer:
        mem.host, mem.optimizer = mem.optimizer, 0.0
    if cand.offload_params and stage >= 3:
        mem.host += mem.params + mem.ema
        mem.params = mem.ema = 0.0
    mem.buffers = engine_buffers(shape, cand, psi, precision, stage, deepspeed or {})
    mem.activations = micro_batch * activation_bytes_per_sample(shape, cand, precision)
    return mem


def engine_buffers(shape: ModelShape, cand: Candidate, psi: float, precision: str, stage: int,
                   deepspeed: dict) -> float:
    """Memory an engine allocates beyond the model states."""
    out = 0.0
    if cand.engine in ("single", "ddp") and precision == "bf16":
        out += 2 * (psi + shape.frozen)  # autocast caches a bf16 copy of each weight until backward
    if cand.engine == "ddp":
        out += 4 * psi  # DDP's reducer copies grads into flat buckets (gradient_as_bucket_view=False)
    if cand.engine == "deepspeed":
        zero = deepspeed.get("zero_optimization", {})
        grad_bytes = 4 if precision == "fp32" else 2
        if stage in (1, 2):
            buckets = sum(min(psi, float(zero.get(key, DS_BUCKET_ELEMENTS)))
                          for key in ("reduce_bucket_size", "allgather_bucket_size"))
            out += buckets * grad_bytes
        elif stage == 3:  # gathered full parameters of the running and the prefetched layer, one layer's grads
            layer = max((s.parameters / s.layers for s in shape.stacks if s.layers), default=min(psi, 5e7))
            out += layer * (2 * grad_bytes + grad_bytes)
    return out


# --- FLOPs -------------------------------------------------------------------------------------


def block_flops_per_sample(shape: ModelShape) -> float:
    """Training FLOPs (6 x forward MACs) of the stacks' layers: linear layers per token, attention
    scores per token pair, adaLN once per sample."""
    macs = 0.0
    for s in shape.stacks:
        h, n = s.hidden, s.tokens
        per_token = (4 + 2 * s.mlp_ratio) * h * h + 2 * n * h
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
