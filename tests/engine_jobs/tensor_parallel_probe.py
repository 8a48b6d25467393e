"""Under torchrun (gloo, 2 or 4 ranks): tensor-parallel DiT-adaLN, DiT-cross and U-ViT against
the single-device model on identical inputs. Writes, per architecture, the largest difference of
outputs, input gradients and (gathered) weight gradients to OUT.json (rank 0).

`python -m torch.distributed.run --nproc_per_node 2 tests/engine_jobs/tensor_parallel_probe.py OUT.json TP`
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from scaleyard.models.diffusion_transformer import build_model
from scaleyard.models.diffusion_transformer_parallel import parallelize_diffusion_transformer, unshard
from scaleyard.models.presets import preset


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(out: str, tp: int) -> None:
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    report = {}
    for arch in ("dit_adaln", "dit_cross", "uvit"):
        cfg = preset(f"{arch}-cpu-s")
        torch.manual_seed(0)
        reference = build_model(cfg)
        # adaLN-Zero starts every block as the identity; random weights make the check meaningful
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0, 0.05)
        parallel = copy.deepcopy(reference)
        layout = parallelize_diffusion_transformer(parallel, tp)

        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
        t = torch.rand(3, generator=g)
        text = torch.randn(3, cfg.text_len, cfg.text_dim, generator=g)
        mask = torch.ones(3, cfg.text_len, dtype=torch.bool)
        mask[0, 5:] = False
        target = torch.randn(x.shape, generator=g)

        outputs, input_grads = [], []
        for model in (reference, parallel):
            xi = x.clone().requires_grad_(True)
            y = model(xi, t, text, mask)
            ((y - target) ** 2).mean().backward()
            outputs.append(y.detach())
            input_grads.append(xi.grad)
        full_grads = {}
        for name, p in parallel.named_parameters():
            how = layout.get(name)
            if how is None:
                full_grads[name] = p.grad
                continue
            shards = [torch.empty_like(p.grad) for _ in range(tp)]
            dist.all_gather(shards, p.grad.contiguous(), group=group)
            full_grads[name] = unshard(shards, how)
        ref_grads = dict(reference.named_parameters())
        split = sum(1 for name in full_grads if name in layout)
        report[arch] = {
            "output": float((outputs[0] - outputs[1]).abs().max()),
            "output_scale": float(outputs[0].abs().max()),
            "input_grad": float((input_grads[0] - input_grads[1]).abs().max()),
            "weight_grad": max(float((ref_grads[n].grad - g_).abs().max()) for n, g_ in full_grads.items()),
            "split_parameters": split,
            "local_share": count(parallel) / count(reference),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
