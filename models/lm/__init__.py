"""Causal language models over Hugging Face transformers: loading (any local folder, the packaged
SmolLM2 GGUF, a tiny Llama from scratch), chat-formatted tokenisation of prompt/completion pairs
with loss masks, and per-sequence log-probabilities."""

from scaleyard.models.lm.load import (
    SMOLLM2,
    LMSpec,
    ModelFolderError,
    gpt2_tokenizer,
    load_causal_lm,
    load_tokenizer,
    smollm2_folder,
    tiny_llama,
)
from scaleyard.models.lm.logprobs import PairBatch, encode_pairs, generate, sequence_logprobs

__all__ = [
    "SMOLLM2", "LMSpec", "ModelFolderError", "PairBatch", "encode_pairs", "generate", "gpt2_tokenizer",
    "load_causal_lm", "load_tokenizer", "sequence_logprobs", "smollm2_folder", "tiny_llama",
]
