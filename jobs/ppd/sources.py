"""The trained runs PPD builds on: the base text-to-image model (a `t2i` run) and the attribute
reader (an `attributes` run), loaded through platform/weights.py (any engine's checkpoint), plus
`PairSources`, what the `ppd_pairs` builder samples and scores with.

Images cross between the two as the builder stores them: the base model's samples in [-1, 1] are
quantised to 8 bits (as a PNG would) before the reader sees them, so a user's reward of an image
is the same whether it was computed at build time, in evaluation, or from the shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scaleyard.jobs.attributes.job import AttributeReader, load_reader
from scaleyard.jobs.t2i.job import TextToImage, TextToImageJob, model_configs
from scaleyard.models.diffusion import flow
from scaleyard.platform.config import ConfigError
from scaleyard.platform.job import saved_config


def run_job(run_dir: Path) -> str | None:
    """The job that wrote a finished run (its summary.json), None when it has none."""
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("job") if summary.exists() else None


def check_run(key: str, run_dir: str, job: str) -> Path:
    """A finished run of `job`, or a ConfigError naming `key`."""
    path = Path(run_dir)
    if not (path / "config.yaml").exists() or not (path / "checkpoints").is_dir():
        raise ConfigError(f"config key '{key}': {run_dir!r} is not a run folder (no config.yaml and checkpoints/); "
                          f"give a finished `scaleyard run {job}` folder, or leave it empty to have one built")
    found = run_job(path)
    if found is None:
        raise ConfigError(f"config key '{key}': {run_dir!r} has no summary.json: finish training that run first")
    if found != job:
        raise ConfigError(f"config key '{key}': {run_dir!r} is a run of job {found!r}, not {job!r}")
    return path


def base_config(run_dir: str | Path) -> DictConfig:
    """The t2i run's resolved config (its model architecture, process and sampling settings)."""
    # a run saved before an architecture default changed is read as it was trained (saved_before)
    cfg = saved_config(TextToImageJob, OmegaConf.load(Path(run_dir) / "config.yaml"))
    if cfg.model.text_encoder != "hashed":
        raise ConfigError(f"config key 'model.base_run': {run_dir} uses model.text_encoder={cfg.model.text_encoder}; "
                          "ppd fine-tunes t2i runs with the trainable hashed text encoder")
    return cfg


def load_base(run_dir: str | Path) -> tuple[TextToImage, DictConfig]:
    """The base model (its EMA weights when the run kept them) and the run's config."""
    from scaleyard.platform.weights import load_run_weights

    cfg = base_config(run_dir)
    denoiser_cfg, text_cfg = model_configs(cfg)
    model = TextToImage(denoiser_cfg, text_cfg)
    model.load_state_dict(load_run_weights(run_dir).weights)
    return model.eval().requires_grad_(False), cfg


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] -> [0, 1], quantised to 8 bits as the shards store them."""
    return torch.round((images.float().clamp(-1, 1) + 1) * 127.5) / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, C]."""
    return (images * 255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def generate(denoiser: Any, encode: Any, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
             process: str) -> torch.Tensor:
    """Samples in [-1, 1] from `noise` (classifier-free guidance against the empty caption)."""
    text, mask = encode(prompts, noise.device)
    null_text, null_mask = encode([""] * len(prompts), noise.device)
    return flow.sample(denoiser, noise, text, mask, null_text, null_mask, steps=steps, sampler="euler",
                       guidance=guidance, process=process)


@dataclass
class PairSources:
    """What the ppd_pairs builder needs: base samples and the reader's view of them."""

    base: TextToImage
    reader: AttributeReader
    base_cfg: DictConfig
    steps: int
    guidance: float
    batch: int = 64

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        d = self.base.denoiser.cfg
        return d.channels, d.image_size, d.image_size

    def sample(self, prompt: str, noise: torch.Tensor) -> torch.Tensor:
        """Base samples of one prompt, one per noise, in [0, 1] (8-bit levels)."""
        out = []
        for chunk in noise.split(self.batch):
            images = generate(self.base.denoiser, self.base.encode, [prompt] * len(chunk), chunk, self.steps,
                              self.guidance, self.base_cfg.model.process)
            out.append(to_unit(images))
        return torch.cat(out)

    def read(self, images: torch.Tensor) -> list[dict[str, Any]]:
        return [a for chunk in images.split(256) for a in self.reader.read(chunk)]


def pair_sources(base: str, reader: str, steps: int = 20, guidance: float = 2.0) -> PairSources:
    for key, run, job in (("base", base, "t2i"), ("reader", reader, "attributes")):
        if not run:
            raise ConfigError(f"ppd_pairs option {key}: give a finished `scaleyard run {job}` folder "
                              f"(--option {key}=RUN_DIR)")
        try:
            check_run(key, run, job)
        except ConfigError as err:
            raise ConfigError(str(err).replace("config key", "ppd_pairs option")) from None
    model, cfg = load_base(base)
    return PairSources(model, load_reader(reader), cfg, steps, guidance)


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """[B, C, H, W] in [0, 1] -> one PNG, `columns` images per row, 2-pixel grey gutters."""
    from PIL import Image

    b, c, h, w = images.shape
    rows = -(-b // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), c), 128, dtype=np.uint8)
    for i, image in enumerate(to_uint8(images)):
        r, k = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, k * (w + 2):k * (w + 2) + w] = image
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)
