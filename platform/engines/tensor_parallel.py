"""Tensor parallelism from a plan the model declares (torchtitan's `parallelize_module` plans,
spelled with Hugging Face's `tp_plan` style names), applied with megatron-core's parallel layers.

A plan is plain data, so it can sit beside a model in models/ without importing the platform:

    {"modules": {                               # fnmatch pattern over model.named_modules() -> style
        "*.attn.qkv": {"style": "colwise", "parts": 3},   # fused q|k|v: each part split separately
        "*.attn.proj": "rowwise",
        "*.ada.1": "colwise_gather_output",               # split, then gathered for replicated use
        "model.embed_tokens": "embedding_rowwise",        # vocabulary-parallel embedding
     },
     "divide": {"*.attn": ["heads"]},           # module attributes that count what a rank now holds
     "divisible": {"attention heads of model.preset": 8}}   # numbers tp_size must divide (checked at launch)

Styles (Megatron's split of a transformer block): `colwise` (an nn.Linear's outputs split, no
communication in forward), `colwise_gather_output` (alias `colwise_rep`; the split output is
all-gathered, e.g. vocabulary-parallel logits for a loss over the whole vocabulary), `rowwise`
(inputs split, one all-reduce in forward), `embedding_rowwise` (an nn.Embedding's vocabulary
split, one all-reduce), `packed_colwise` (= colwise with 2 fused parts, HF's gate|up). A dict
spells options: {"style": "colwise", "parts": 3, "gather": True}. Anything else (sequence
parallelism, embedding_colwise, replicated_with_grad_allreduce, ...) is refused by name.

Weights are sliced from the single-device model, so a parallelized model computes exactly what
the original computes (tests/test_engines_megatron.py). Returned with the model: the sharding of
every split parameter by its state-dict name, from which full weights are rebuilt (`unshard`).
Parameters tied across modules (an LM's embedding and logits) stay tied if both entries split
them alike, and are refused otherwise.

megatron-core's parallel linears run on CPU (gloo) and GPU. GPU-only parts are not used here:
sequence parallelism inside blocks needs TE/apex norms, the distributed optimizer and megatron's
grad clipping need CUDA tensors; data parallelism and clipping come from the platform instead.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from scaleyard.platform.config import ConfigError

log = logging.getLogger("scaleyard")

PLAN_KEYS = ("modules", "divide", "divisible")
STYLES = {  # style name -> (kind, fused parts, gather output)
    "colwise": ("colwise", 1, False),
    "colwise_gather_output": ("colwise", 1, True),
    "colwise_rep": ("colwise", 1, True),
    "packed_colwise": ("colwise", 2, False),
    "rowwise": ("rowwise", 1, False),
    "embedding_rowwise": ("embedding", 1, False),
}
UNSUPPORTED = {  # styles other plan vocabularies know, and why they are refused here
    "embedding_colwise": "an embedding split along its width; use embedding_rowwise (vocabulary-parallel)",
    "sequence_parallel": "sequence parallelism needs megatron's fused norms (Transformer Engine/apex, GPU only)",
    "rowwise_rep": "a row-parallel layer fed a replicated input; feed it a colwise output",
    "rowwise_split_input": "a row-parallel layer fed a replicated input; feed it a colwise output",
    "packed_rowwise": "a row-parallel layer with fused inputs",
    "replicated_with_grad_allreduce": "gradients all-reduced over tensor-parallel ranks (parameters acting on "
                                      "split heads, e.g. per-head q/k norms with weights)",
}


@dataclass(frozen=True)
class Sharding:
    """How a parameter is split over tensor-parallel ranks: along `dim`, with `parts` fused
    blocks (q|k|v = 3) each split separately so that every rank holds matching slices."""

    dim: int
    parts: int = 1


def shard(full: torch.Tensor, how: Sharding, rank: int, size: int) -> torch.Tensor:
    pieces = full.chunk(how.parts, dim=how.dim)
    return torch.cat([piece.chunk(size, dim=how.dim)[rank] for piece in pieces], dim=how.dim).contiguous()


def unshard(shards: list[torch.Tensor], how: Sharding) -> torch.Tensor:
    """Inverse of `shard` given every rank's slice in rank order."""
    per_rank = [s.chunk(how.parts, dim=how.dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=how.dim) for i in range(how.parts)], dim=how.dim)


# --- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    pattern: str
    kind: str  # colwise | rowwise | embedding
    parts: int = 1
    gather: bool = False


@dataclass(frozen=True)
class TensorParallelPlan:
    rules: tuple[Rule, ...]
    divide: dict[str, tuple[str, ...]] = field(default_factory=dict)
    divisible: dict[str, int] = field(default_factory=dict)

    def check(self, tp_size: int) -> None:
        """What can be checked before the model exists: the numbers the plan says must split."""
        for what, number in self.divisible.items():
            if number % tp_size:
                raise ConfigError(f"config key 'engine.tp_size': {tp_size} does not divide the {number} {what}; "
                                  f"choose a tp_size dividing {number}")

    def rule_for(self, name: str) -> Rule | None:
        matches = [rule for rule in self.rules if fnmatchcase(name, rule.pattern)]
        if len(matches) > 1:
            raise ConfigError(f"tensor-parallel plan: module {name!r} matches several entries "
                              f"({', '.join(repr(r.pattern) for r in matches)}); make the patterns disjoint")
        return matches[0] if matches else None


def parse_plan(plan: Any, owner: str = "Job.tp_plan") -> TensorParallelPlan:
    """Validate a declared plan (plain data) and return it typed; errors name the entry."""
    if isinstance(plan, TensorParallelPlan):
        return plan
    if not isinstance(plan, dict) or "modules" not in plan:
        raise ConfigError(f"{owner}: a tensor-parallel plan is a dict with 'modules' (pattern -> style) and "
                          f"optionally 'divide' and 'divisible'; got {type(plan).__name__}")
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise ConfigError(f"{owner}: unknown plan keys {unknown}; known: {', '.join(PLAN_KEYS)}")
    rules = tuple(_rule(pattern, spec, owner) for pattern, spec in dict(plan["modules"]).items())
    if not rules:
        raise ConfigError(f"{owner}: the plan's 'modules' is empty")
    divide = {}
    for pattern, attrs in dict(plan.get("divide") or {}).items():
        attrs = (attrs,) if isinstance(attrs, str) else tuple(attrs)
        if not all(isinstance(a, str) for a in attrs):
            raise ConfigError(f"{owner}: 'divide' entry {pattern!r} must list attribute names, got {attrs!r}")
        divide[pattern] = attrs
    divisible = {}
    for what, number in dict(plan.get("divisible") or {}).items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"{owner}: 'divisible' entry {what!r} must be a positive integer, got {number!r}")
        divisible[str(what)] = number
    return TensorParallelPlan(rules, divide, divisible)


def _rule(pattern: str, spec: Any, owner: str) -> Rule:
    options = dict(spec) if isinstance(spec, dict) else {"style": spec}
    style = options.pop("style", None)
    if style in UNSUPPORTED:
        raise ConfigError(f"{owner}: plan entry {pattern!r}: style {style!r} is not supported by engine.name=megatron "
                          f"({UNSUPPORTED[style]})")
    if style not in STYLES:
        raise ConfigError(f"{owner}: plan entry {pattern!r}: unknown style {style!r}; supported: "
                          f"{', '.join(STYLES)}")
    kind, parts, gather = STYLES[style]
    parts, gather = options.pop("parts", parts), options.pop("gather", gather)
    if options:
        raise ConfigError(f"{owner}: plan entry {pattern!r}: unknown options {sorted(options)}; known: parts, gather")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ConfigError(f"{owner}: plan entry {pattern!r}: 'parts' must be a positive integer, got {parts!r}")
    if kind != "colwise" and (parts != 1 or gather):
        raise ConfigError(f"{owner}: plan entry {pattern!r}: 'parts' and 'gather' apply to colwise layers only")
    return Rule(pattern, kind, parts, bool(gather))


# --- applying it ------------------------------------------------------------------------------------
def apply_tp_plan(model: nn.Module, plan: Any, tp_size: int) -> dict[str, Sharding]:
    """Replace, in place, every module the plan names with megatron-core's parallel layer holding
    this rank's slice, and divide the attributes it lists. Needs megatron's model-parallel groups
    (`parallel_state.initialize_model_parallel`). Returns the sharding of every split parameter by
    its name in `model.state_dict()`."""
    from megatron.core import parallel_state

    plan = parse_plan(plan)
    plan.check(tp_size)
    rank = parallel_state.get_tensor_model_parallel_rank()
    layout: dict[str, Sharding] = {}
    replaced: dict[int, tuple[nn.Parameter, Sharding, str]] = {}  # original parameter -> its slice
    originals: list[nn.Parameter] = []  # keeps ids unique while `replaced` is in use
    modules = list(model.named_modules())
    owners = {id(child): (parent, attr) for _, parent in modules for attr, child in parent.named_children()}
    matched = 0
    for name, module in modules:
        rule = plan.rule_for(name)
        if rule is None:
            continue
        if name == "":
            raise ConfigError(f"tensor-parallel plan entry {rule.pattern!r} matches the whole model")
        layer, sharding = _parallel_layer(name, module, rule, tp_size, rank)
        for pname, how in sharding.items():
            original = getattr(module, pname)
            tied = replaced.get(id(original))
            if tied is not None:  # e.g. an LM's logits reuse its embedding: keep them one parameter
                if tied[1] != how:
                    raise ConfigError(f"tensor-parallel plan: {name}.{pname} is tied to {tied[2]} but the plan "
                                      f"splits them differently; give both the same split")
                setattr(layer, pname, tied[0])
            else:
                replaced[id(original)] = (getattr(layer, pname), how, f"{name}.{pname}")
                originals.append(original)
            layout[f"{name}.{pname}"] = how
        parent, attr = owners[id(module)]
        setattr(parent, attr, layer)
        matched += 1
    if not matched:
        raise ConfigError(f"tensor-parallel plan: no entry matches a module of {type(model).__name__} "
                          f"(patterns: {', '.join(r.pattern for r in plan.rules)})")
    _check_untied(model, replaced)
    _divide_attributes(model, plan, tp_size)
    _mark_split(model, layout)
    log.info("tensor parallelism: %d modules split over %d ranks", matched, tp_size)
    return layout


def _check_untied(model: nn.Module, replaced: dict[int, tuple[nn.Parameter, Sharding, str]]) -> None:
    """A whole parameter left in a module the plan does not name, while a tied copy was split,
    would silently untie them."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in replaced:
            raise ConfigError(f"tensor-parallel plan: {name} is tied to {replaced[id(param)][2]}, which the plan "
                              f"splits; add {name.rsplit('.', 1)[0]!r} to the plan with the same split")


def _divide_attributes(model: nn.Module, plan: TensorParallelPlan, tp_size: int) -> None:
    for name, module in model.named_modules():
        for pattern, attrs in plan.divide.items():
            if not fnmatchcase(name, pattern):
                continue
            for attr in attrs:
                value = getattr(module, attr, None)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"tensor-parallel plan 'divide' entry {pattern!r}: {name} "
                                      f"({type(module).__name__}) has no integer attribute {attr!r}")
                if value % tp_size:
                    raise ConfigError(f"config key 'engine.tp_size': {tp_size} does not divide {name}.{attr} = "
                                      f"{value}; choose a tp_size dividing {value}")
                setattr(module, attr, value // tp_size)


def _mark_split(model: nn.Module, layout: dict[str, Sharding]) -> None:
    """megatron marks split parameters only when it initialises them; the gradient norm
    (MegatronEngine.clip_and_step) needs the mark on every slice."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, how in layout.items():  # megatron's attribute names (set_tensor_model_parallel_attributes)
        params[name].tensor_model_parallel, params[name].partition_dim, params[name].partition_stride = True, how.dim, 1


def _parallel_layer(name: str, module: nn.Module, rule: Rule, tp_size: int,
                    rank: int) -> tuple[nn.Module, dict[str, Sharding]]:
    if rule.kind == "embedding":
        if not isinstance(module, nn.Embedding):
            raise ConfigError(f"tensor-parallel plan entry {rule.pattern!r}: {name} is a {type(module).__name__}, "
                              "embedding_rowwise splits an nn.Embedding")
        return _vocab_parallel_embedding(name, module, tp_size, rank)
    if not isinstance(module, nn.Linear):
        embedding = isinstance(module, nn.Embedding)
        fix = "; use 'embedding_rowwise' for a vocabulary-parallel embedding" if embedding else ""
        raise ConfigError(f"tensor-parallel plan entry {rule.pattern!r}: {name} is a {type(module).__name__}, "
                          f"{rule.kind} splits an nn.Linear{fix}")
    out_features, in_features = module.weight.shape
    split, size = (out_features, tp_size * rule.parts) if rule.kind == "colwise" else (in_features, tp_size)
    if split % size:
        raise ConfigError(f"config key 'engine.tp_size': {name} ({in_features}->{out_features}) cannot be split "
                          f"{rule.kind} into {tp_size} ranks x {rule.parts} parts; choose a tp_size dividing "
                          f"{split // rule.parts}")
    return _parallel_linear(module, rule, tp_size, rank)


class _GatherLastDim(torch.autograd.Function):
    """All-gather a column-parallel output along its last dimension; backward keeps this rank's
    slice. megatron's own gather allocates on `torch.cuda.current_device()`, so it cannot run on
    CPU; this one runs on any device and backend."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        pieces = [torch.empty_like(local) for _ in range(ctx.size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


def _cpu_autocast_off(x: torch.Tensor):
    """megatron's linear declares its backward for CUDA autocast only; under CPU autocast the
    backward would mix bf16 gradients with fp32 weights. On CPU these layers run in the weights'
    dtype instead (CPU runs are for development; GPU runs keep autocast)."""
    return torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext()


def _megatron_config(tp_size: int, dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    # weights are copied from the single-device model, so megatron must not initialise them
    # (which would also need its CUDA RNG tracker)
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype)


def _no_init(weight: torch.Tensor) -> None:
    pass


def _copy_slices(layer: nn.Module, original: nn.Module, plan: dict[str, Sharding], rank: int, size: int) -> None:
    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            full = getattr(original, name)
            param.copy_(shard(full, plan[name], rank, size) if name in plan else full)
    layer.to(original.weight.device)


def _parallel_linear(linear: nn.Linear, rule: Rule, tp_size: int, rank: int) -> tuple[nn.Module, dict[str, Sharding]]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    gather = rule.gather

    class Column(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # megatron returns (output, bias)
            with _cpu_autocast_off(x):
                out = super().forward(x.to(self.weight.dtype) if x.device.type == "cpu" else x)[0]
            return _GatherLastDim.apply(out, self.tp_group) if gather else out

    class Row(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _cpu_autocast_off(x):
                return super().forward(x.to(self.weight.dtype) if x.device.type == "cpu" else x)[0]

    config = _megatron_config(tp_size, linear.weight.dtype)
    out_features, in_features = linear.weight.shape
    bias = linear.bias is not None
    if rule.kind == "colwise":
        layer = Column(in_features, out_features, config=config, init_method=_no_init, bias=bias, gather_output=False)
        plan = {"weight": Sharding(0, rule.parts), "bias": Sharding(0, rule.parts)}
    else:
        layer = Row(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                    input_is_parallel=True, skip_bias_add=False)
        plan = {"weight": Sharding(1)}  # the bias is added once, after the all-reduce
    _copy_slices(layer, linear, plan, rank, tp_size)
    return layer, {k: v for k, v in plan.items() if getattr(linear, k, None) is not None}


def _vocab_parallel_embedding(name: str, embedding: nn.Embedding, tp_size: int,
                              rank: int) -> tuple[nn.Module, dict[str, Sharding]]:
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import VocabParallelEmbedding, reduce_from_tensor_model_parallel_region

    class Embedding(VocabParallelEmbedding):
        padding_idx: int | None = None  # this rank's row of nn.Embedding's padding_idx, if it holds it

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if self.padding_idx is None:
                return super().forward(ids)
            # megatron's lookup has no padding_idx (a row no lookup trains); same steps, with it
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local = (ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local, self.weight, padding_idx=self.padding_idx).masked_fill(outside[..., None], 0.0)
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    vocab, width = embedding.weight.shape
    if vocab % tp_size:
        raise ConfigError(f"config key 'engine.tp_size': {tp_size} does not divide the vocabulary of {name} "
                          f"({vocab} rows); choose a tp_size dividing {vocab} or pad the vocabulary")
    if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
        raise ConfigError(f"tensor-parallel plan: {name}: embedding_rowwise does not support max_norm, sparse or "
                          "scale_grad_by_freq")
    layer = Embedding(vocab, width, init_method=_no_init, config=_megatron_config(tp_size, embedding.weight.dtype))
    plan = {"weight": Sharding(0)}
    _copy_slices(layer, embedding, plan, rank, tp_size)
    pad = embedding.padding_idx
    if pad is not None and layer.vocab_start_index <= pad < layer.vocab_end_index:
        layer.padding_idx = pad - layer.vocab_start_index
    return layer, plan


__all__ = ["Sharding", "TensorParallelPlan", "apply_tp_plan", "parse_plan", "shard", "unshard"]
