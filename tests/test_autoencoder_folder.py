"""`models/autoencoder.py`: a local diffusers AutoencoderKL folder with its latent normalisation;
folders that cannot load fail before diffusers is imported, naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from scaleyard.models.autoencoder import AutoencoderError, check_folder, load_autoencoder

CONFIG = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "latent_channels": 4,
          "scaling_factor": 0.5, "shift_factor": 0.1}


def test_folders_without_the_expected_files_fail_naming_them(tmp_path):
    with pytest.raises(AutoencoderError, match="nowhere does not exist"):
        check_folder(tmp_path / "nowhere")
    pipeline = tmp_path / "sd"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "vae" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(AutoencoderError, match=r"sd/config.json is missing \(it holds a pipeline: point at .*sd/vae"):
        check_folder(pipeline)
    with pytest.raises(AutoencoderError, match=r"vae/diffusion_pytorch_model.safetensors is missing"):
        load_autoencoder(pipeline / "vae")
    (pipeline / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (pipeline / "vae" / "config.json").write_text(json.dumps({**CONFIG, "_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderError, match="not AutoencoderKL"):
        check_folder(pipeline / "vae")
    (pipeline / "vae" / "config.json").write_text(json.dumps(CONFIG))
    spec = check_folder(pipeline / "vae")
    assert (spec.downsample, spec.scaling_factor, spec.shift_factor) == (2, 0.5, 0.1)
    assert spec.latent_shape(32) == (4, 16, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        spec.latent_shape(33)


@pytest.mark.slow  # imports diffusers (seconds) and builds a small VAE
def test_a_saved_vae_loads_with_its_scaling_and_shift(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, scaling_factor=0.5,
                        shift_factor=0.1).eval()
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(tmp_path / "vae")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = loaded.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
        assert torch.allclose(latents, (z - 0.1) * 0.5, atol=1e-5)
        assert torch.allclose(loaded.decode(latents), vae.decode(z).sample.clamp(-1, 1), atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())
