"""LoRA adapters through peft, and the decoder layers of a (possibly adapted) causal LM."""

from __future__ import annotations

from torch import nn

# attention and MLP projections of the Llama family (SmolLM2, Llama 3.x, Mistral, Qwen2)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LLAMA_TARGETS) -> nn.Module:
    """`model` with LoRA adapters of `rank` on `targets`; only the adapters train. The adapters
    start at zero (peft's B = 0), so the adapted model equals `model` until it trains."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=list(targets), task_type="CAUSAL_LM"))


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights."""
    return model.merge_and_unload()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers (what activation checkpointing wraps): the first ModuleList named
    `layers`, wherever an adapter wrapper has moved it."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no ModuleList named 'layers'")
