"""Shared by the GPU benchmarks: seconds per call of a training step, after warm-up, with the GPU
synchronised around the timed window and its peak-memory counter reset at the start."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds_per_step(step: Callable[[], None], device: torch.device, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
