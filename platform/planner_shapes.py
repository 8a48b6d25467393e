"""What a model looks like to the planner (platform/planner.py), and the activations it keeps.

A job describes its model as a `ModelShape`: parameter counts and its stacks of identical
transformer layers (`BlockStack`); language models also their output logits and embeddings
(`causal_lm_shape`, or `causal_lm_shape_from_config` from a Hugging Face config). The formulas
below turn a shape into bytes per sample. Sources:
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
- Under bf16/fp16 autocast (the trainer's, for every engine) norms run in fp32, so the
  residual stream they read is stored in fp32: `autocast_fp32` adds those bytes.
- Language models (Llama-style: RMSNorm, rotary q/k, grouped-query attention, SwiGLU MLP, output
  logits over the vocabulary; `causal_lm_shape`): every tensor a layer keeps was listed from
  autograd's saved tensors of Hugging Face's LlamaForCausalLM (fp32 and bf16 autocast). The
  [tokens x vocab] logits are often the largest activation of a language model: the loss keeps
  their fp32 log-softmax (Hugging Face upcasts with `logits.float()`; autocast runs log_softmax
  in fp32), and backward holds two more fp32 [tokens x vocab] tensors at its start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockStack:
    """A stack of identical transformer layers, as far as memory is concerned.

    tokens: sequence length of one sample (U-ViT: time + text + image tokens).
    parameters: trainable parameters inside these layers (what tensor parallelism divides).
    kv_heads: key/value heads (grouped-query attention when fewer than `heads`); 0 = heads.
    mlp_hidden: the MLP's intermediate width; 0 = mlp_ratio x hidden.
    gated_mlp: SwiGLU-style MLP (gate, up and down matrices: Llama) instead of fc1 -> GELU -> fc2.
    norm: "layer" (a fused LayerNorm) or "rms" (Hugging Face's RMSNorm, written out in fp32 ops).
    fused_qkv: q, k and v come from one matmul (DiT), not three (Llama); matters under autocast,
        where each matmul keeps its own 16-bit copy of the normalised input.
    rope: rotary position embedding on q and k (Llama).
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
    cross_norm: bool = True  # a norm before the cross-attention (off in PixArt-alpha)
    skip_layers: int = 0
    tensor_parallel: bool = True
    kv_heads: int = 0
    mlp_hidden: int = 0
    gated_mlp: bool = False
    norm: str = "layer"
    fused_qkv: bool = True
    rope: bool = False

    @property
    def kv_share(self) -> float:
        """Width of k (and of v) relative to q."""
        return (self.kv_heads or self.heads) / self.heads

    @property
    def mlp_share(self) -> float:
        """The MLP's intermediate width relative to hidden."""
        return self.mlp_hidden / self.hidden if self.mlp_hidden else self.mlp_ratio


@dataclass(frozen=True)
class MeasuredActivations:
    """Activation bytes of a job's model measured by running it (platform/planner_measure.py):
    the peak above parameters and gradients of one forward/backward, as bytes per sample plus a
    fixed part, at `precision`; `checkpointed_*` with its repeated blocks checkpointed (None: it
    has none to checkpoint)."""

    precision: str
    per_sample: float
    fixed: float = 0.0
    checkpointed_per_sample: float | None = None
    checkpointed_fixed: float = 0.0
    how: str = ""  # how it was measured, for the plan's reasons


@dataclass(frozen=True)
class ModelShape:
    """What a job tells the planner about its model (`Job.memory_shape`).

    parameters = trainable + frozen. other_activations: elements per sample stored outside the
    stacks (inputs, embeddings, output head, loss), counted once. logits: elements per sample of
    the output logits ([tokens x vocab] of a language model), whose softmax/cross-entropy run in
    fp32. embedding_parameters: the token embedding and an untied output head (inside
    `parameters`); vocab_parallel: the tensor-parallel plan shards them and the logits.
    measured: activations measured by running the model instead of the stacks' formulas.
    """

    parameters: int
    trainable: int
    frozen: int = 0
    stacks: tuple[BlockStack, ...] = ()
    other_activations: int = 0
    logits: int = 0
    embedding_parameters: int = 0
    vocab_parallel: bool = False
    measured: MeasuredActivations | None = None

    @property
    def tokens(self) -> int:
        return max((s.tokens for s in self.stacks), default=0)

    @property
    def checkpointable(self) -> bool:
        """Whether activation checkpointing has blocks to recompute."""
        if self.measured is not None:
            return self.measured.checkpointed_per_sample is not None
        return bool(self.stacks)


def causal_lm_shape(*, layers: int, hidden: int, heads: int, tokens: int, vocab: int, mlp_hidden: int,
                    kv_heads: int = 0, tied_embeddings: bool = False, attention_bias: bool = False,
                    mlp_bias: bool = False, frozen: int = 0, vocab_parallel: bool = False) -> ModelShape:
    """A Llama-style decoder-only language model trained on `tokens` tokens per sample: token
    embedding, `layers` x (RMSNorm, attention with rotary q/k and `kv_heads` key/value heads,
    RMSNorm, SwiGLU MLP of width `mlp_hidden`), a final RMSNorm and an output head over `vocab`
    (sharing the embedding when `tied_embeddings`). `frozen`: parameters of frozen modules (a
    DPO reference model) that store no activations. Parameter counts are exact for Hugging Face's
    Llama and Mistral layouts (tests/test_planner.py checks Llama's)."""
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden}, heads {heads}, kv_heads {kv_heads}: the heads must divide the "
                         f"hidden size and the key/value heads the heads")
    kv_width = kv_heads * hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_width + ((2 * hidden + 2 * kv_width) if attention_bias else 0)
    mlp = 3 * hidden * mlp_hidden + ((2 * mlp_hidden + hidden) if mlp_bias else 0)
    layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embedding = vocab * hidden * (1 if tied_embeddings else 2)
    trainable = layers * layer + embedding + hidden
    stack = BlockStack("decoder", layers, hidden, heads, tokens, layers * layer, qk_norm=False, kv_heads=kv_heads,
                       mlp_hidden=mlp_hidden, gated_mlp=True, norm="rms", fused_qkv=False, rope=True)
    # the final RMSNorm keeps its input, normalised input and output
    return ModelShape(trainable + frozen, trainable, frozen, (stack,), other_activations=3 * tokens * hidden,
                      logits=tokens * vocab, embedding_parameters=embedding, vocab_parallel=vocab_parallel)


def causal_lm_shape_from_config(config: Any, tokens: int, frozen: int = 0, vocab_parallel: bool = False) -> ModelShape:
    """`causal_lm_shape` from a Hugging Face `PretrainedConfig` of a Llama-style causal LM (Llama,
    Mistral, SmolLM2, ...), read by attribute name: the platform imports no model family, and
    a job passes its config in one line."""
    def attr(name: str, default: Any = None) -> Any:
        value = getattr(config, name, default)
        if value is None:
            raise ValueError(f"{type(config).__name__} has no {name!r}: not a Llama-style causal LM config")
        return value

    hidden, heads = int(attr("hidden_size")), int(attr("num_attention_heads"))
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden or getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise ValueError(f"{type(config).__name__}: heads x head_dim != hidden_size or a mixture of experts; "
                         f"causal_lm_shape models neither: describe the model with BlockStack yourself")
    return causal_lm_shape(
        layers=int(attr("num_hidden_layers")), hidden=hidden, heads=heads, tokens=tokens,
        vocab=int(attr("vocab_size")), mlp_hidden=int(attr("intermediate_size")),
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)), frozen=frozen, vocab_parallel=vocab_parallel,
    )  # fmt: skip



# --- activations (Korthikanti et al. 2022) ----------------------------------------------------


def _norm_elements(stack: BlockStack, consumers: int, autocast: bool) -> float:
    """Elements one norm keeps (per token and hidden unit): its input and, for the matmuls that
    read it, its output; Hugging Face's RMSNorm also keeps its normalised input (the weight's
    multiply saves it). Under autocast the norm runs in fp32 and each consuming matmul keeps its
    own 16-bit copy of the output."""
    kept_inside = 2 if stack.norm == "rms" else 1
    return kept_inside + (consumers if autocast else 1)


def layer_activations(stack: BlockStack, autocast: bool = False) -> tuple[float, float]:
    """Elements stored for backward by one layer, per token and hidden unit: (whole under tensor
    parallelism, divided by it). Korthikanti et al.'s 34 bytes = 17 16-bit elements, less two
    dropout masks, is 4 + (4 + 2r): layer-norm inputs and the inputs of the QKV and fc1 matmuls
    stay whole; q, k, v, the attention output and the MLP's 2r divide. With grouped-query
    attention k and v are narrower; a gated MLP keeps gate, up, their activation and product (4r).
    `autocast`: the counts of a bf16/fp16 autocast run (see `_norm_elements`)."""
    kv, r = stack.kv_share, stack.mlp_share
    whole = (_norm_elements(stack, 1 if stack.fused_qkv else 3, autocast)
             + _norm_elements(stack, 2 if stack.gated_mlp else 1, autocast))
    split = 1 + 2 * kv + 1  # q, k, v (rotated ones with rope: the raw ones are not kept) and SDPA's output
    if not stack.rope:
        split += 1  # the output projection keeps a re-laid-out copy (rope keeps q in the layout it needs)
    split += 4 * r if stack.gated_mlp else 2 * r
    if stack.qk_norm:
        split += 1 + kv  # normalised q and k beside the raw ones
    if stack.adaln:
        whole += 4  # adaLN-Zero: each modulation keeps the norm output, each gate its branch output
    if stack.context_tokens:
        # the cross-attention's norm, or without one the query projection's input
        whole += _norm_elements(stack, 1, autocast) if stack.cross_norm else 1
        context = stack.context_tokens / stack.tokens
        if stack.qk_norm:  # raw and normed q, output, the projection's re-laid-out copy; k, v, normed k
            split += 4 + 3 * context
        else:  # q and k, v as the projections wrote them: SDPA's output is already in the layout the
            split += 2 + 2 * context  # output projection reads (measured on CPU: no copy)
    return whole, split


def autocast_fp32(stack: BlockStack) -> float:
    """Of the `whole` elements, those autocast keeps in fp32 in a 16-bit run (per token and hidden
    unit): norms run in fp32, so the residual stream they read stays fp32 (and RMSNorm's
    normalised input), and so do the norm outputs that adaLN's elementwise modulation keeps.
    Measured on CPU bf16 autocast, Korthikanti et al.'s all-16-bit count is 7-17% low for our
    blocks without this."""
    per_norm = 2 if stack.norm == "rms" else 1
    return 2 * per_norm + (2 if stack.adaln else 0) + (per_norm if stack.context_tokens and stack.cross_norm else 0)


def stack_activations(stack: BlockStack, precision: str, tp: int = 1, sequence_parallel: bool = False,
                      checkpointing: bool = False) -> tuple[float, float]:
    """(kept through the step, live only while one layer is recomputed) bytes per sample. With
    checkpointing only each layer's input stays (s·h); without, every layer's activations."""
    element = 4 if precision == "fp32" else 2
    upcast = autocast_fp32(stack) * (4 - element)  # extra bytes of the fp32 elements of a 16-bit run
    tokens_hidden = stack.tokens * stack.hidden
    counts = layer_activations(stack, autocast=precision != "fp32")
    whole, split = counts if stack.tensor_parallel else (sum(counts), 0.0)
    t = tp if stack.tensor_parallel else 1
    t_whole = t if sequence_parallel else 1  # sequence parallelism shards the norms' inputs too
    per_layer = ((whole * element + upcast) / t_whole + split * element / t) * tokens_hidden
    if not checkpointing:
        skips = stack.skip_layers * 2 * tokens_hidden * element / t_whole  # U-ViT's [x, skip] concatenation
        return stack.layers * per_layer + skips, 0.0
    kept = stack.layers * tokens_hidden * 4 / t_whole  # each layer's input: the residual stream, fp32 under autocast
    # the recomputed layer plus the gradients flowing through it (two residual-stream tensors, measured)
    return kept, per_layer + 2 * tokens_hidden * element


def logits_bytes(shape: ModelShape, tp: int = 1) -> tuple[float, float]:
    """(kept through the step, live at the start of backward) bytes per sample of the output
    logits: the loss keeps their fp32 log-softmax, and backward first holds its fp32 gradient and
    the gradient of its input (measured on Hugging Face's causal LM loss, fp32 and bf16 autocast
    alike: the loss upcasts). Vocabulary parallelism shards them."""
    share = tp if shape.vocab_parallel else 1
    return 4.0 * shape.logits / share, 8.0 * shape.logits / share
