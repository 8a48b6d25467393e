"""image_sample: images from a trained t2i run (any engine's checkpoint, EMA weights by default).

Recipe: config -> prompts (command line or file) x n images each -> model (the run's weights
through the common loader) -> sampler (euler / heun / ddim, or SRDS over one of them; optionally
the safe denoiser against a negation set) -> one PNG per image, a grid, settings.json.

Image k is prompt k // n from noise seeded by (seed, k), so the images do not depend on how many
ranks drew them or in which batches. Ranks split the images (k % world == rank), except under
SRDS with several ranks, where every rank works on the same images and the blocks of each
parareal iteration are spread over the ranks. PNGs are written atomically and a restarted run
skips those that exist, so a killed or preempted sampling run resumes where it stopped.
`scaleyard sample RUN --out DIR ...` launches this job; `scaleyard run|submit image_sample` too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scaleyard.jobs.image_sample.images import image_path, to_uint8, write_grid, write_png
from scaleyard.jobs.image_sample.negation import check_negation, load_negation
from scaleyard.jobs.image_sample.readback import ReadbackConfig, check_readback, readback
from scaleyard.jobs.t2i.latents import run_decoder
from scaleyard.jobs.t2i.loading import load_t2i, t2i_config
from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.safe_denoiser import PAPER_SCALE, PAPER_WINDOW, SafeDenoiser
from scaleyard.models.diffusion.srds import srds, srds_pipelined
from scaleyard.platform.config import ConfigError, EngineConfig, RunConfig, bounded, choice
from scaleyard.platform.distributed import barrier
from scaleyard.platform.job import Context, Job
from scaleyard.platform.sampling import SAMPLES_DIR

SAMPLERS = (*flow.SAMPLERS, "srds")


@dataclass
class SrdsConfig:
    base: str = choice("euler", flow.SAMPLERS)  # the serial sampler SRDS refines
    blocks: int = bounded(0, 0)  # 0: round(sqrt(steps))
    # stop when the final state moves less than this between iterations (mean |change| per image,
    # data in [-1, 1]; 0: run to the serial answer, B iterations)
    tolerance: float = bounded(1e-3, 0.0)
    max_iterations: int = bounded(0, 0)  # 0: B
    pipelined: bool = False  # one process only: start each fine solve as soon as its input exists


@dataclass
class SafeConfig:
    negation: str = ""  # a split folder of image shards; empty: the safe denoiser is off
    select: str = ""  # FIELD=VALUE picking the negation images (color=red, label=3); empty: all
    limit: int = bounded(512, 1)  # negation images used
    scale: float = bounded(PAPER_SCALE, 0.0)
    sigma: float = bounded(0.0, 0.0)  # kernel bandwidth; 0: the paper's 3.15 moved to this data's dimension
    window: list[float] = field(default_factory=lambda: list(PAPER_WINDOW))  # [start, end] times, t = 1 noise
    threshold_quantile: float = bounded(0.0, 0.0, 1.0)  # > 0: the threshold variant


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    source: str = ""  # the trained t2i run folder
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""  # one prompt per line (added after `prompts`)
    n: int = bounded(4, 1)  # images per prompt
    seed: int = 0
    steps: int = bounded(30, 1)
    sampler: str = choice("euler", SAMPLERS)
    guidance: float = bounded(0.0, 0.0)  # 0: the source run's eval.guidance
    batch_size: int = bounded(16, 1)
    ema: bool = True  # the run's EMA weights when it kept them
    grid: int = bounded(64, 0)  # images in grid.png
    srds: SrdsConfig = field(default_factory=SrdsConfig)
    safe: SafeConfig = field(default_factory=SafeConfig)
    readback: ReadbackConfig = field(default_factory=ReadbackConfig)


def read_prompts(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise ConfigError(f"config key 'prompts_file': {path} does not exist; give a text file, one prompt a line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("config keys 'prompts' / 'prompts_file': no prompt given "
                          "(scaleyard sample RUN --prompt TEXT, or --prompts FILE)")
    return prompts


def noise_for(indices: list[int], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Each image's own noise, from (seed, its index): independent of ranks and batches. NumPy's
    SeedSequence keeps the seed as entropy and the index as a spawn key, two separate inputs (a
    list [seed, k] would not do: its zero padding makes [2**32, 0] the same seed as [0, 1]); torch's
    CPU generator keeps only 32 bits of a seed, so a packed (seed << 32) | k drew seed 0's images
    for every seed."""
    def draw(k: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    return torch.stack([draw(k) for k in indices])


class ImageSampleJob(Job):
    name = "image_sample"
    Config = Config
    trains = False

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if not cfg.source:
            raise ConfigError("config key 'source': give the trained t2i run to sample from")
        t2i_config(cfg.source)
        checkpoints = Path(cfg.source) / "checkpoints"
        if not checkpoints.exists() or not any(checkpoints.glob("step_*/meta.json")):
            raise ConfigError(f"config key 'source': {cfg.source} holds no complete checkpoint; train it first")
        read_prompts(cfg)
        if cfg.sampler == "srds" and cfg.srds.pipelined and world_size > 1:
            raise ConfigError("config key 'srds.pipelined': the pipelined variant runs on one process; with "
                              f"{world_size} ranks use srds.pipelined=false (blocks spread over the ranks)")
        if cfg.safe.negation:
            check_negation(cfg.safe.negation, cfg.safe.select)
            if len(cfg.safe.window) != 2 or not 0 <= cfg.safe.window[0] <= cfg.safe.window[1] <= 1:
                raise ConfigError(f"config key 'safe.window': {list(cfg.safe.window)} is not [start, end] "
                                  "with 0 <= start <= end <= 1")
        check_readback(cfg)

    def sample(self, cfg: DictConfig, ctx: Context) -> dict[str, float]:
        started = time.perf_counter()
        loaded = load_t2i(cfg.source, ema=None if cfg.ema else False)
        model = loaded.model.to(ctx.device)
        prompts = read_prompts(cfg)
        guidance = cfg.guidance or float(loaded.cfg.eval.guidance)
        adjust = self._safe_denoiser(cfg, ctx.device)
        decoder = run_decoder(loaded.cfg, ctx.device)  # latent runs: generated latents -> images
        if decoder is not None and adjust is not None:
            raise ConfigError(f"config key 'safe.negation': {cfg.source} generates autoencoder latents and the "
                              "safe denoiser compares pixel images; leave safe.negation empty for latent runs")
        out = ctx.run_dir / SAMPLES_DIR
        out.mkdir(parents=True, exist_ok=True)
        total = len(prompts) * cfg.n
        spread_blocks = cfg.sampler == "srds" and ctx.world_size > 1
        todo = [k for k in range(total) if (spread_blocks or k % ctx.world_size == ctx.rank)
                and not image_path(out, k).exists()]
        shape = (model.denoiser.cfg.channels, model.denoiser.cfg.image_size, model.denoiser.cfg.image_size)
        stats: dict[str, float] = {"iterations": 0.0, "sequential_steps": 0.0, "batches": 0.0}
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start: start + cfg.batch_size]
            images = self._draw(cfg, model, [prompts[k // cfg.n] for k in batch], noise_for(batch, cfg.seed, shape),
                                guidance, loaded.cfg.model.process, adjust, ctx, stats)
            if decoder is not None:
                images = decoder.decode(images.float())
            if ctx.rank == 0 or not spread_blocks:
                for k, pixels in zip(batch, to_uint8(images)):
                    write_png(pixels, image_path(out, k))
        barrier()  # every rank's PNGs exist before rank 0 draws the grid
        metrics = {"images": float(total), "drawn_here": float(len(todo)),
                   "seconds_here": time.perf_counter() - started}
        if stats["batches"]:
            metrics.update(srds_iterations=stats["iterations"] / stats["batches"],
                           srds_sequential_steps=stats["sequential_steps"] / stats["batches"])
        if ctx.rank == 0:
            self._write_summary_files(cfg, ctx.run_dir, prompts, total, guidance, loaded)
            if cfg.readback.reader:  # every image of the run, also those drawn before a restart
                metrics.update(readback(cfg, [image_path(out, k) for k in range(total)], ctx.device))
        return metrics

    def _draw(self, cfg: DictConfig, model: Any, captions: list[str], noise: torch.Tensor, guidance: float,
              process: str, adjust: SafeDenoiser | None, ctx: Context, stats: dict[str, float]) -> torch.Tensor:
        tokens, mask = model.encode(captions, ctx.device)
        null_tokens, null_mask = model.encode([""] * len(captions), ctx.device)
        predict = flow.conditioned(model.denoiser, tokens, mask, null_tokens, null_mask, guidance)
        noise = noise.to(ctx.device)
        with torch.no_grad():
            if cfg.sampler != "srds":
                return flow.integrate(predict, noise, cfg.steps, cfg.sampler, process, adjust)
            options = dict(blocks=cfg.srds.blocks, tolerance=cfg.srds.tolerance,
                           max_iterations=cfg.srds.max_iterations, adjust=adjust)
            if cfg.srds.pipelined:
                result = srds_pipelined(predict, noise, cfg.steps, cfg.srds.base, process, **options)
            else:
                from scaleyard.platform.srds_ranks import blocks_over_ranks

                distribute = blocks_over_ranks if ctx.world_size > 1 else None
                result = srds(predict, noise, cfg.steps, cfg.srds.base, process, distribute=distribute, **options)
        stats["iterations"] += result.iterations
        stats["sequential_steps"] += result.sequential_steps
        stats["batches"] += 1
        return result.sample

    @staticmethod
    def _safe_denoiser(cfg: DictConfig, device: torch.device) -> SafeDenoiser | None:
        if not cfg.safe.negation:
            return None
        negation = load_negation(cfg.safe.negation, cfg.safe.select, cfg.safe.limit).to(device)
        return SafeDenoiser(negation, scale=cfg.safe.scale, sigma=cfg.safe.sigma, window=tuple(cfg.safe.window),
                            threshold_quantile=cfg.safe.threshold_quantile)

    @staticmethod
    def _write_summary_files(cfg: DictConfig, run_dir: Path, prompts: list[str], total: int, guidance: float,
                             loaded: Any) -> None:
        out = run_dir / SAMPLES_DIR
        shown = [image_path(out, k) for k in range(min(cfg.grid, total))]
        if shown:
            write_grid(shown, run_dir / "grid.png", columns=cfg.n if cfg.n <= 16 else 8)
        settings = {"source": cfg.source, "source_step": loaded.step, "ema": loaded.ema, "guidance": guidance,
                    "process": loaded.cfg.model.process, "images": total, "image_of": "samples/{k:06d}.png is "
                    "prompts[k // n]", "prompts": prompts, "config": OmegaConf.to_container(cfg, resolve=True)}
        (run_dir / "settings.json").write_text(json.dumps(settings, indent=1))


JOB = ImageSampleJob
