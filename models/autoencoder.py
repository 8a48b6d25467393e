"""A latent autoencoder from a local `diffusers.AutoencoderKL` folder (an SD / SDXL / FLUX VAE on
a cluster, or one exported by scaleyard), with the normalisation its diffusion models were
trained with: latents = (z - shift_factor) * scaling_factor (per-channel `latents_mean` /
`latents_std` too, where the config has them).

The folder is checked before diffusers is imported (importing it takes seconds), so a wrong path
fails at once with the name of the missing file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "config.json"
# the weight files `AutoencoderKL.from_pretrained` reads, in its order of preference
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class AutoencoderError(FileNotFoundError):
    """An autoencoder folder that cannot be loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class AutoencoderSpec:
    """What a folder's config.json says about the latent space, read without diffusers."""

    folder: Path
    weights: Path
    latent_channels: int
    downsample: int  # image side / latent side
    scaling_factor: float
    shift_factor: float
    latents_mean: tuple[float, ...] | None
    latents_std: tuple[float, ...] | None

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of {self.folder}'s downsampling factor "
                             f"{self.downsample}")
        side = image_size // self.downsample
        return self.latent_channels, side, side


def check_folder(path: str | Path) -> AutoencoderSpec:
    """The folder's latent geometry and factors; AutoencoderError naming the missing or broken file."""
    folder = Path(path)
    if not folder.is_dir():
        raise AutoencoderError(f"autoencoder folder {folder} does not exist; give a local diffusers AutoencoderKL "
                               "folder (config.json + diffusion_pytorch_model.safetensors)")
    config_file = folder / CONFIG_FILE
    if not config_file.exists():
        hint = f" (it holds a pipeline: point at {folder / 'vae'})" if (folder / "vae" / CONFIG_FILE).exists() else ""
        raise AutoencoderError(f"{config_file} is missing{hint}; an AutoencoderKL folder holds config.json and "
                               "diffusion_pytorch_model.safetensors, as `save_pretrained` writes them")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).exists()), None)
    if weights is None:
        raise AutoencoderError(f"{folder / WEIGHT_FILES[0]} is missing (nor is there {WEIGHT_FILES[1]}); "
                               "copy the VAE's weights into the folder")
    try:
        config = json.loads(config_file.read_text())
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"_class_name is {config['_class_name']!r}, not AutoencoderKL")
        blocks = len(config.get("block_out_channels", [64]))
        mean, std = config.get("latents_mean"), config.get("latents_std")
        return AutoencoderSpec(
            folder=folder, weights=weights, latent_channels=int(config.get("latent_channels", 4)),
            downsample=2 ** (blocks - 1), scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=float(config.get("shift_factor") or 0.0),
            latents_mean=tuple(mean) if mean else None, latents_std=tuple(std) if std else None,
        )
    except (ValueError, TypeError, KeyError) as err:
        raise AutoencoderError(f"{config_file} is not an AutoencoderKL config ({err}); "
                               "re-export the folder with AutoencoderKL.save_pretrained") from err


class LatentAutoencoder(nn.Module):
    """images in [-1, 1] <-> the normalised latents a diffusion model trains on."""

    def __init__(self, vae: nn.Module, spec: AutoencoderSpec):
        super().__init__()
        self.vae, self.spec = vae, spec
        channels = spec.latent_channels
        mean = torch.tensor(spec.latents_mean or [0.0] * channels).view(1, channels, 1, 1)
        std = torch.tensor(spec.latents_std or [1.0] * channels).view(1, channels, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """The posterior mean (or a sample from it) of each image, normalised."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.spec.shift_factor - self.latents_mean) * self.spec.scaling_factor / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.latents_std / self.spec.scaling_factor + self.latents_mean + self.spec.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                     ) -> LatentAutoencoder:
    """A frozen, eval-mode autoencoder from a local folder (never downloads)."""
    spec = check_folder(path)
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("model.autoencoder needs diffusers: pip install 'scaleyard[autoencoder]'") from err
    vae = AutoencoderKL.from_pretrained(str(spec.folder), local_files_only=True, torch_dtype=dtype,
                                        use_safetensors=spec.weights.suffix == ".safetensors")
    model = LatentAutoencoder(vae.eval().requires_grad_(False), spec).to(device)
    return model


# KL autoencoders small enough to train on CPU, in diffusers' AutoencoderKL layout so that a trained
# one exports with `save_pretrained` and loads through `load_autoencoder` like an SD/FLUX VAE.
# name -> (block_out_channels, layers_per_block); downsampling is 2 ** (len(blocks) - 1).
AUTOENCODER_PRESETS: dict[str, tuple[tuple[int, ...], int]] = {
    "kl-f2-tiny": ((16, 16), 1),  # tests: 32 px -> 16 x 16, 64 px -> 32 x 32 (the paper presets' latents)
    # ~1.2 s per step of 32 images at 64 px on 2 CPU cores (full-resolution convolutions dominate)
    "kl-f4-s": ((16, 32, 32), 1),  # shapes at 64 px -> 4 x 16 x 16
    "kl-f8-s": ((16, 32, 64, 64), 1),  # shapes at 64 px -> 4 x 8 x 8
    "kl-f8-sd": ((128, 256, 512, 512), 2),  # Stable Diffusion's VAE shape (GPU)
}


def diffusers_missing() -> str:
    """Why diffusers cannot be used ("" when it can), checked without importing it (seconds)."""
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        return "the autoencoder needs diffusers: pip install 'scaleyard[autoencoder]'"
    return ""


def autoencoder_kl_config(preset: str, channels: int = 3, latent_channels: int = 4) -> dict[str, Any]:
    """AutoencoderKL constructor arguments of a preset; ValueError naming the presets."""
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; known: {', '.join(AUTOENCODER_PRESETS)}")
    blocks, layers = AUTOENCODER_PRESETS[preset]
    return {"in_channels": channels, "out_channels": channels, "latent_channels": latent_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
            "up_block_types": ["UpDecoderBlock2D"] * len(blocks), "block_out_channels": list(blocks),
            "layers_per_block": layers, "norm_num_groups": min(32, blocks[0])}


def build_autoencoder_kl(preset: str, channels: int = 3, latent_channels: int = 4) -> nn.Module:
    """A freshly initialised diffusers AutoencoderKL of a preset's shape (trainable)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**autoencoder_kl_config(preset, channels, latent_channels))
