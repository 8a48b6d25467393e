"""Prompt/completion batches with loss masks, summed completion log-probabilities, generation.

Layout of a batch row: prompts are LEFT-padded to a common length P and completions RIGHT-padded
to C, so every completion starts at column P. The model then only has to produce logits for the
C completion positions (`logits_to_keep`), not for the whole few-shot prompt: with a 50k-150k
vocabulary the full [B, P+C, V] logits would dominate memory. Position ids count real tokens
only, so left padding does not shift the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class PromptTooLong(ValueError):
    """A prompt plus its completion does not fit the model's context."""


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C], 1 = real token
    position_ids: torch.Tensor  # [B, P + C]
    targets: torch.Tensor  # [B, C] completion tokens (pad where loss_mask is 0)
    loss_mask: torch.Tensor  # [B, C] float, 1 = a completion token that counts
    prompt_len: int  # P

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                         self.targets.to(device), self.loss_mask.to(device), self.prompt_len)


def format_prompt(tokenizer, prompt: str, assistant_prefix: str = "") -> str:
    """The prompt as the model expects it: inside its chat template (as the user's turn, with the
    assistant turn opened) when the tokenizer has one, else as plain text."""
    if getattr(tokenizer, "chat_template", None):
        opened = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
        return opened + assistant_prefix
    return prompt + assistant_prefix


def prompt_ids(tokenizer, prompt: str, assistant_prefix: str = "") -> list[int]:
    text = format_prompt(tokenizer, prompt, assistant_prefix)
    # a chat template writes its own special tokens; plain prompts get the tokenizer's usual ones
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def completion_ids(tokenizer, completion: str) -> list[int]:
    """The completion's tokens followed by end-of-sequence (so the model learns to stop)."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_tokens: int,
                 assistant_prefix: str = "") -> PairBatch:
    """Tokenise (prompt, completion) rows into one padded batch; raises PromptTooLong (naming the
    row and the lengths) when a row does not fit `max_tokens`."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows_p = [prompt_ids(tokenizer, p, assistant_prefix) for p in prompts]
    rows_c = [completion_ids(tokenizer, c) for c in completions]
    for i, (p, c) in enumerate(zip(rows_p, rows_c)):
        if len(p) + len(c) > max_tokens:
            raise PromptTooLong(f"row {i}: prompt of {len(p)} tokens + completion of {len(c)} tokens exceeds the "
                                f"context of {max_tokens} tokens")
    P, C = max(map(len, rows_p)), max(map(len, rows_c))
    B, pad = len(prompts), tokenizer.pad_token_id
    input_ids = torch.full((B, P + C), pad, dtype=torch.long)
    attention = torch.zeros(B, P + C, dtype=torch.long)
    loss_mask = torch.zeros(B, C)
    for i, (p, c) in enumerate(zip(rows_p, rows_c)):
        input_ids[i, P - len(p):P] = torch.tensor(p)
        input_ids[i, P:P + len(c)] = torch.tensor(c)
        attention[i, P - len(p):P + len(c)] = 1
        loss_mask[i, :len(c)] = 1.0
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return PairBatch(input_ids, attention, position_ids, input_ids[:, P:].clone(), loss_mask, P)


def sequence_logprobs(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens under `model` ([B]); prompt and
    padding tokens never count. `model` may be engine-wrapped (called, so DDP/ZeRO see it)."""
    P, C = batch.prompt_len, batch.targets.shape[1]
    # logits at column t predict token t + 1: columns P-1 .. P+C-2 predict the completion
    keep = torch.arange(P - 1, P + C - 1, device=batch.input_ids.device)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=keep, use_cache=False)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    token_logp = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return (token_logp * batch.loss_mask).sum(-1)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, sample: bool = False,
             temperature: float = 1.0, seed: int = 0, assistant_prefix: str = "", batch_size: int = 8) -> list[str]:
    """Responses to `prompts` (greedy, or sampled from a fixed seed), decoded without special tokens."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    device = next(model.parameters()).device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            rows = [prompt_ids(tokenizer, p, assistant_prefix) for p in prompts[start:start + batch_size]]
            P = max(map(len, rows))
            ids = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), P, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, P - len(r):], mask[i, P - len(r):] = torch.tensor(r), 1
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else {"do_sample": False}
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **kwargs)[:, P:]
            out.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new)
    model.train(was_training)
    return out
