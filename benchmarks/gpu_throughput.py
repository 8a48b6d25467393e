"""bf16 training throughput of the diffusion-transformer presets on one GPU: images/s, achieved
TFLOP/s (from flops_per_sample) and MFU against the device's peak, eager and torch.compile.

    python benchmarks/gpu_throughput.py                      # 0.3B and 1B of each architecture
    python benchmarks/gpu_throughput.py --device cpu --presets uvit-cpu-xs --batch 8 --steps 3   # smoke test

Prints JSON. Goal (issue): >= 50% MFU for U-ViT 1B on one H100.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import seconds_per_step  # benchmarks/timing.py (run as scripts)

from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import build_model, count_parameters, flops_per_sample
from scaleyard.models.presets import preset
from scaleyard.platform.metrics import peak_tflops

DEFAULT_PRESETS = ["uvit-0.3B", "uvit-1B", "dit_cross-0.3B", "dit_cross-1B", "dit_adaln-0.3B", "dit_adaln-1B"]


def measure(name: str, device: torch.device, batch: int, steps: int, compiled: bool) -> dict:
    cfg = preset(name)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compiled else model
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device)
    mask = torch.ones(batch, cfg.text_len, dtype=torch.bool, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            t = torch.rand(batch, device=device)
            loss = flow.training_loss(step_model, x, text, mask, t, torch.randn_like(x)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = seconds_per_step(step, device, steps, 3)
    tflops = flops_per_sample(cfg) * batch / seconds / 1e12
    peak = peak_tflops(device, "bf16")
    return {
        "preset": name, "params": count_parameters(cfg), "compiled": compiled, "batch": batch,
        "images_per_s": round(batch / seconds, 2), "tflops": round(tflops, 2),
        "mfu": round(tflops / peak, 4) if peak else None,
        "memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name in args.presets:
        for compiled in ([False] if args.no_compile else [False, True]):
            try:
                rows.append(measure(name, device, args.batch, args.steps, compiled))
            except torch.OutOfMemoryError:
                rows.append({"preset": name, "compiled": compiled, "error": "out of memory at this batch"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"benchmark": "gpu_throughput", "device": name, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
