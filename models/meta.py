"""Build a network for its shapes only: on the meta device, with torch.nn.init's fills skipped.

On "meta", torch runs init fills (normal_, trunc_normal_, ...) through its Python
decompositions, whose first use imports torch._dynamo: about 3 s of every process that counts
parameters (the summary of every t2i run, `scaleyard models`, `plan`). The fills change values,
never shapes, so they are skipped. transformers' `no_init_weights` does the same, but importing
transformers costs more than it saves here, hence these few lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_FILLS = tuple(name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_"))


def _skip_fill(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Modules built inside hold meta tensors of the right shapes and no values. Patches
    torch.nn.init for the duration: not for use while another thread initialises a network."""
    saved = {name: getattr(nn.init, name) for name in _FILLS}
    try:
        for name in _FILLS:
            setattr(nn.init, name, _skip_fill)
        with torch.device("meta"):
            yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)
