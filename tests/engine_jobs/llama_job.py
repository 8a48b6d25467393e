"""A tiny Hugging Face LlamaForCausalLM trained on counting sequences: a job written the way an
outside user would (only this file; registered through the `scaleyard.jobs` entry point).

What it declares to the platform, and nothing else: a map-style Dataset (the platform makes it a
resumable stream), its tensor-parallel plan (vocabulary-parallel embedding and logits,
column/row-parallel projections, in Hugging Face's style names), and its memory shape for the
planner (read from the Hugging Face config). Activation checkpointing finds `model.layers` by
the platform's name rule. Each sequence counts up from a random start by a stride from STRIDES
(modulo the vocabulary), so after two tokens the rest is determined and the loss falls fast.

`train/layer_calls` (a metric for tests): decoder-layer forward calls made by the previous
micro-batch's forward and backward, so 2 x layers when the layers are recomputed in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from scaleyard.platform.config import TrainingConfig, bounded
from scaleyard.platform.job import Context, EvalResult, Job, JobParts

STRIDES = (1, 2, 3, 5)
EVAL_SEQUENCES = 64

# Tensor parallelism over the model's own module names (engine.name=megatron applies it)
TP_PLAN = {"modules": {
    "model.embed_tokens": "embedding_rowwise",  # vocabulary-parallel embedding
    "model.layers.*.self_attn.[qkv]_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather_output",  # vocabulary-parallel logits, gathered for Hugging Face's own loss
}}


@dataclass
class ModelConfig:
    hidden: int = bounded(64, 8)
    layers: int = bounded(2, 1)
    heads: int = bounded(4, 1)
    kv_heads: int = bounded(2, 1)
    mlp_hidden: int = bounded(128, 1)
    vocab: int = bounded(512, 8)
    tokens: int = bounded(32, 3)  # sequence length of one sample


@dataclass
class CorpusConfig:
    sequences: int = bounded(4096, 1)


@dataclass
class Config(TrainingConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def llama_config(cfg: DictConfig):
    from transformers import LlamaConfig

    m = cfg.model
    # use_cache=False: a key/value cache filled during forward would be filled again when
    # activation checkpointing recomputes a layer (Hugging Face turns it off for its own checkpointing)
    return LlamaConfig(hidden_size=m.hidden, intermediate_size=m.mlp_hidden, num_hidden_layers=m.layers,
                       num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, vocab_size=m.vocab,
                       max_position_embeddings=m.tokens, tie_word_embeddings=False, use_cache=False)


class CountingSequences(Dataset):
    """Sequence i: start + stride * [0, tokens) modulo vocab, drawn from (seed, i) alone."""

    def __init__(self, size: int, tokens: int, vocab: int, seed: int):
        self.size, self.tokens, self.vocab, self.seed = size, tokens, vocab, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = int(torch.randint(0, self.vocab, (), generator=g))
        stride = STRIDES[int(torch.randint(0, len(STRIDES), (), generator=g))]
        return (start + stride * torch.arange(self.tokens)) % self.vocab


class LlamaJob(Job):
    name = "llama_probe"
    Config = Config

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        from transformers import LlamaForCausalLM

        self.ctx = ctx
        torch.manual_seed(cfg.run.seed)  # every rank builds the same model before the engine splits or shards it
        model = LlamaForCausalLM(llama_config(cfg))
        self.layer_calls = 0
        for layer in model.model.layers:  # a pre-hook: recomputation stops early, before forward hooks run
            layer.register_forward_pre_hook(self._count_call)
        m = cfg.model
        self.eval_ids = torch.stack([CountingSequences(EVAL_SEQUENCES, m.tokens, m.vocab, cfg.run.seed + 1)[i]
                                     for i in range(EVAL_SEQUENCES)])
        return JobParts(model=model, train_data=CountingSequences(cfg.corpus.sequences, m.tokens, m.vocab,
                                                                  cfg.run.seed))

    def _count_call(self, module: nn.Module, args: tuple) -> None:
        self.layer_calls += 1

    def train_step(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        calls, self.layer_calls = self.layer_calls, 0
        ids = batch.to(self.ctx.device)
        loss = model(input_ids=ids, labels=ids).loss
        return loss, {"layer_calls": calls}

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        ids = self.eval_ids.to(self.ctx.device)
        return EvalResult(metrics={"loss": float(model(input_ids=ids, labels=ids).loss)})

    @staticmethod
    def tp_plan(cfg: DictConfig) -> dict:
        return TP_PLAN

    @staticmethod
    def memory_shape(cfg: DictConfig):
        from scaleyard.platform.planner import causal_lm_shape_from_config

        return causal_lm_shape_from_config(llama_config(cfg), tokens=cfg.model.tokens, vocab_parallel=True)

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        """6 x parameters x tokens, plus attention's 6 x layers x tokens^2 x hidden (Kaplan et al. 2020)."""
        m = cfg.model
        return 6.0 * LlamaJob.memory_shape(cfg).trainable * m.tokens + 6.0 * m.layers * m.tokens ** 2 * m.hidden


JOB = LlamaJob
