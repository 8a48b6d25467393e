"""Activation checkpointing applied from outside the model (as torchtitan does): each transformer
block keeps only its input and recomputes its activations in backward.

A model opts in by holding its blocks in `nn.ModuleList`s named `*blocks` (`blocks`, `in_blocks`,
`out_blocks`) or single modules named `*_block` (U-ViT's `mid_block`). torch's checkpoint wrapper
keeps state-dict keys unchanged, so checkpoints load with the option on or off.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


def transformer_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute or index) of every block a model declares, in module order."""
    found: list[tuple[nn.Module, str]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
                found += [(child, str(i)) for i in range(len(child))]
            elif name.endswith("_block") and not isinstance(child, nn.ModuleList):
                found.append((parent, name))
    return found


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block in place; returns how many were wrapped."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"train.activation_checkpointing: {type(model).__name__} declares no transformer blocks "
            "(an nn.ModuleList named '*blocks'); turn the option off for this model"
        )
    for parent, name in blocks:
        block = getattr(parent, name) if not name.isdigit() else parent[int(name)]
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if name.isdigit():
            parent[int(name)] = wrapped
        else:
            setattr(parent, name, wrapped)
    return len(blocks)
