"""A trained t2i run as a model: its config, its text encoder and its weights (EMA by default),
through the one loader that reads every engine's checkpoint (platform/weights.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from scaleyard.jobs.t2i.job import TextToImage, TextToImageJob, model_configs
from scaleyard.models.text_encoder import FrozenMiniLM
from scaleyard.platform.config import ConfigError
from scaleyard.platform.job import saved_config


@dataclass
class LoadedT2I:
    model: TextToImage
    cfg: DictConfig  # the run's resolved config
    step: int
    ema: bool


def t2i_config(run_dir: str | Path, key: str = "source") -> DictConfig:
    """The run's config, or a ConfigError naming `key` when the folder is not a t2i run."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"config key '{key}': {run_dir} is not a run folder (no config.yaml); "
                          "give a folder written by `scaleyard run t2i`")
    summary = Path(run_dir) / "summary.json"
    if summary.exists():
        import json

        job = json.loads(summary.read_text()).get("job")
        if job and job != "t2i":
            raise ConfigError(f"config key '{key}': {run_dir} is a run of job {job!r}, not t2i")
    try:  # a run saved before an architecture default changed is read as it was trained
        return saved_config(TextToImageJob, OmegaConf.load(saved))
    except Exception as err:  # another job's keys: not a t2i run
        raise ConfigError(f"config key '{key}': {run_dir} is not a t2i run ({err})") from None


def load_t2i(run_dir: str | Path, ema: bool | None = None, key: str = "source") -> LoadedT2I:
    from scaleyard.platform.weights import load_run_weights

    cfg = t2i_config(run_dir, key)
    denoiser_cfg, text_cfg = model_configs(cfg)
    frozen = FrozenMiniLM(denoiser_cfg.text_len) if cfg.model.text_encoder == "minilm" else None
    model = TextToImage(denoiser_cfg, text_cfg, frozen)
    loaded = load_run_weights(run_dir, ema=ema)
    model.load_state_dict(loaded.weights)
    return LoadedT2I(model.eval().requires_grad_(False), cfg, loaded.step, loaded.ema)
