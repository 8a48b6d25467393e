"""Under torchrun (gloo, 2 or 4 ranks): models split by their declared tensor-parallel plans
against the single-device model on identical inputs: DiT-adaLN, DiT-cross and U-ViT (TP_PLAN in
models/diffusion/transformer.py) and a tiny Hugging Face LlamaForCausalLM (a plan of a few lines
below, with vocabulary-parallel embedding and logits; untied, and tied with a padding token).
Writes, per model, the largest difference of outputs, input gradients and (gathered) weight
gradients to OUT.json (rank 0).

`python -m torch.distributed.run --nproc_per_node 2 tests/engine_jobs/tensor_parallel_probe.py OUT.json TP`
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from scaleyard.models.diffusion.transformer import TP_PLAN, build_model
from scaleyard.models.presets import preset
from scaleyard.platform.engines.tensor_parallel import apply_tp_plan, unshard

# What a job serving a Hugging Face causal LM would declare as its Job.tp_plan
LLAMA_TP_PLAN = {"modules": {
    "model.embed_tokens": "embedding_rowwise",  # vocabulary-parallel embedding
    "model.layers.*.self_attn.[qkv]_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather_output",  # vocabulary-parallel logits, gathered for the model's own loss
}}


def hf_plan(config) -> dict:
    """The same from the plan transformers ships with the config (its style names are ours)."""
    layers = {f"model.{pattern}": style for pattern, style in config.base_model_tp_plan.items()}
    return {"modules": {"model.embed_tokens": "embedding_rowwise", **layers, "lm_head": "colwise_gather_output"}}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize(model: nn.Module) -> None:
    # adaLN-Zero starts every block as the identity; random weights make the check meaningful
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)


def diffusion_case(arch: str) -> tuple[nn.Module, dict, Callable]:
    cfg = preset(f"{arch}-cpu-s")
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(3, generator=g)
    text = torch.randn(3, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.ones(3, cfg.text_len, dtype=torch.bool)
    mask[0, 5:] = False
    target = torch.randn(x.shape, generator=g)

    def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        y = m(xi, t, text, mask)
        ((y - target) ** 2).mean().backward()
        return y.detach(), xi.grad

    return model, TP_PLAN, run


def llama_case(tied: bool) -> tuple[nn.Module, dict, Callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied,
                         pad_token_id=3 if tied else None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (3, 10), generator=g)
    ids[:, -2:] = 3  # padding tokens (the tied model's padding row gets gradient only through the logits)

    def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = []  # the embedding's output: its gradient is the "input gradient" of the layers
        keep = lambda module, args, y: embedded.append(y) or y.retain_grad()  # noqa: E731
        hook = m.get_input_embeddings().register_forward_hook(keep)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        hook.remove()
        return out.logits.detach(), embedded[0].grad

    return model, (hf_plan(config) if tied else LLAMA_TP_PLAN), run


def main(out: str, tp: int) -> None:
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    cases = {arch: (lambda a=arch: diffusion_case(a)) for arch in ("dit_adaln", "dit_cross", "uvit")}
    cases |= {"llama": lambda: llama_case(False), "llama_tied": lambda: llama_case(True)}
    report = {}
    for name, make in cases.items():
        reference, plan, run = make()
        randomize(reference)
        parallel = copy.deepcopy(reference)
        layout = apply_tp_plan(parallel, plan, tp)
        (y_ref, gx_ref), (y_par, gx_par) = run(reference), run(parallel)
        full_grads = {}
        for pname, p in parallel.named_parameters():
            how = layout.get(pname)
            if how is None:
                full_grads[pname] = p.grad
                continue
            shards = [torch.empty_like(p.grad) for _ in range(tp)]
            dist.all_gather(shards, p.grad.contiguous(), group=group)
            full_grads[pname] = unshard(shards, how)
        ref_grads = dict(reference.named_parameters())
        split = [p for n, p in parallel.named_parameters() if n in layout]
        report[name] = {
            "output": float((y_ref - y_par).abs().max()),
            "output_scale": float(y_ref.abs().max()),
            "input_grad": float((gx_ref - gx_par).abs().max()),
            "weight_grad": max(float((ref_grads[n].grad - g_).abs().max()) for n, g_ in full_grads.items()),
            "grad_scale": max(float(p.grad.abs().max()) for p in ref_grads.values()),
            "split_parameters": len(split),
            "marked_split": all(getattr(p, "tensor_model_parallel", False) for p in split),
            "local_share": count(parallel) / count(reference),
            "tied": parallel.get_input_embeddings().weight is parallel.get_output_embeddings().weight
            if name == "llama_tied" else None,
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
