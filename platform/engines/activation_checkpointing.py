"""Activation checkpointing applied from outside the model (as torchtitan does): each repeated
block keeps only its input and recomputes its activations in backward.

Which modules are blocks: what the job declares (`JobParts.blocks`, a function of the model
returning its block modules, e.g. a GNN's `model.convs`); otherwise the name rule: the members
of every `nn.ModuleList` named `*blocks` (`blocks`, `in_blocks`, `out_blocks`) or `layers` (a
Hugging Face model's `model.layers`), and single modules named `*_block` (U-ViT's `mid_block`).
The rule does not look inside a block it found, so blocks never nest. torch's checkpoint wrapper
keeps state-dict keys unchanged, so checkpoints load with the option on or off.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

NAME_RULE = "an nn.ModuleList named '*blocks' or 'layers', or a module named '*_block'"


def transformer_blocks(model: nn.Module,
                       blocks: Callable[[nn.Module], list[nn.Module]] | None = None) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every block, in module order: the declared ones when `blocks` is
    given, else those the name rule finds."""
    return _declared(model, list(blocks(model))) if blocks is not None else _by_name(model)


def _by_name(module: nn.Module) -> list[tuple[nn.Module, str]]:
    found: list[tuple[nn.Module, str]] = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList) and (name.endswith("blocks") or name == "layers"):
            found += [(child, str(i)) for i in range(len(child))]
        elif name.endswith("_block") and not isinstance(child, nn.ModuleList):
            found.append((module, name))
        else:
            found += _by_name(child)
    return found


def _declared(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[nn.Module, str]]:
    owners = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            owners.setdefault(id(child), (parent, name))
    chosen = {id(b) for b in blocks}
    if len(chosen) != len(blocks):
        raise ValueError("JobParts.blocks: a block is listed twice")
    for block in blocks:
        if id(block) not in owners:
            raise ValueError(f"JobParts.blocks: a {type(block).__name__} it returned is not a submodule of "
                             f"{type(model).__name__} (return modules of the model it is given)")
        if any(id(inner) in chosen for inner in list(block.modules())[1:]):
            raise ValueError(f"JobParts.blocks: the blocks nest (a {type(block).__name__} holds another); "
                             "list only the outermost repeated blocks")
    found = [owners[id(b)] for b in blocks]
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(found, key=lambda owner: order[id(getattr(owner[0], owner[1]))])


def apply_activation_checkpointing(model: nn.Module,
                                   blocks: Callable[[nn.Module], list[nn.Module]] | None = None) -> int:
    """Wrap every block in place; returns how many were wrapped."""
    found = transformer_blocks(model, blocks)
    if not found:
        source = "JobParts.blocks returned no modules" if blocks is not None else f"it declares no blocks ({NAME_RULE})"
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} has nothing to checkpoint: "
                         f"{source}; declare JobParts.blocks or turn the option off for this model")
    for parent, name in found:  # Module.__setattr__ also replaces ModuleList/Sequential items by their index
        setattr(parent, name, checkpoint_wrapper(getattr(parent, name), checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return len(found)


WRAPPED = "_checkpoint_wrapped_module."


def plain_name(name: str) -> str:
    """A parameter's name as the unwrapped model has it. torch's checkpoint wrapper strips its own
    prefix from `state_dict()` keys but not from `named_parameters()`, which DeepSpeed records."""
    return name.replace(WRAPPED, "")


def plain_names(state: dict) -> dict:
    return {plain_name(name): value for name, value in state.items()}
