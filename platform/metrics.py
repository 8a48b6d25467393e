"""Rank-0 metrics: TensorBoard scalars/text/images/hparams, throughput and MFU, progress output."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("scaleyard")

# Dense peak TFLOP/s per GPU (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {
    # name fragment: {precision: peak}
    "H200": {"bf16": 989.0, "fp32": 494.5},
    "H100 SXM": {"bf16": 989.0, "fp32": 494.5},
    "H100 NVL": {"bf16": 835.0, "fp32": 417.5},
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp32": 156.0},  # fp32 = TF32 tensor cores
    "L40S": {"bf16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak of the current GPU, or None (CPU, unknown GPU): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks.get(precision)
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsWriter:
    """TensorBoard on rank 0 only; other ranks get a writer that does nothing."""

    def __init__(self, tb_dir: Path | None, purge_step: int | None = None):
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged after its last checkpoint, so a
            # resumed run's curves have neither duplicated nor missing steps.
            self.writer = SummaryWriter(str(tb_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, body, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_images(tag, images.clamp(0, 1), step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer is not None:
            clean = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (SLURM logs, CI)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = {k.split("/")[-1]: v for k, v in values.items()}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
        else:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
