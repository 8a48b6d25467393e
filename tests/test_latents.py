"""The latent path (issue #15): the `autoencoder` job trains a KL autoencoder and exports it as a
diffusers folder, `scaleyard data encode` writes latent shards (resumable after a kill, no sample
twice), and t2i trains a paper preset (at a reduced width) on them, decoding its samples."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import scaleyard, scaleyard_in_process

SIDE = 64  # kl-f2-tiny: 64 px -> 4 x 32 x 32, the paper presets' latent geometry
AE_STEPS = 60


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from scaleyard.data_loaders.builders import build

    out = tmp_path_factory.mktemp("shapes64")
    build("shapes", out, shard_size=32, limit=128, resolution=SIDE)
    return out


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory) -> Path:
    """Trained on 32 px shapes (4x cheaper): the network is convolutional, so it encodes the 64 px
    ones as well."""
    from scaleyard.data_loaders.builders import build

    small = tmp_path_factory.mktemp("shapes32")
    build("shapes", small, shard_size=64, limit=128, resolution=32)
    run = tmp_path_factory.mktemp("ae") / "run"
    done = scaleyard("run", "autoencoder", "--preset", "tiny", f"run.dir={run}", f"data.path={small}/train",
                     f"data.eval_path={small}/test", f"train.steps={AE_STEPS}", "train.eval_every=30",
                     f"train.ckpt_every={AE_STEPS}", "optim.lr=3e-3", "eval.samples=32", "export.stats_samples=64")
    assert done.returncode == 0, done.stdout + done.stderr
    return run


@pytest.fixture(scope="module")
def vae(autoencoder_run) -> Path:
    out = autoencoder_run.parent / "vae"
    done = scaleyard("export", str(autoencoder_run), "--format", "diffusers", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def latents(shapes, vae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "train"
    code, err = scaleyard_in_process("data", "encode", f"{shapes}/train", "--autoencoder", str(vae), "--out",
                                     str(out), "--text-encoder", "minilm", "--batch-size", "16")
    assert code == 0, err
    return out


def psnr_curve(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("eval/psnr")]


def test_the_autoencoder_learns_and_exports_a_folder_diffusers_loads(autoencoder_run, vae):
    from scaleyard.models.autoencoder import check_folder, load_autoencoder

    curve = psnr_curve(autoencoder_run)
    assert len(curve) == 2 and curve[1] > curve[0], curve  # evaluated at steps 30 and 60
    stats = json.loads((vae / "scaleyard_export.json").read_text())
    spec = check_folder(vae)
    assert spec.scaling_factor == pytest.approx(1 / stats["latent_std"]) and spec.downsample == 2
    assert spec.shift_factor == pytest.approx(stats["latent_mean"])
    loaded = load_autoencoder(vae)
    images = torch.rand(2, 3, SIDE, SIDE) * 2 - 1
    assert loaded.encode(images).shape == (2, 4, 32, 32)


def _read_shards(folder: Path) -> list[dict]:
    import webdataset as wds

    from scaleyard.data_loaders.index import load_index

    index = load_index(folder)
    samples = []
    for shard in index.shards:
        samples += list(wds.WebDataset(str(folder / shard.name), shardshuffle=False))
    return samples


def test_latent_shards_decode_back_to_their_images(shapes, vae, latents):
    from scaleyard.data_loaders.index import load_index
    from scaleyard.models.autoencoder import load_autoencoder

    index, source = load_index(latents), _read_shards(shapes / "train")
    assert index.total == 128 and index.extra["latent_shape"] == [4, 32, 32]
    assert index.extra["text_encoder"] == {"name": "minilm", "text_len": 64}
    encoded = _read_shards(latents)
    assert [s["__key__"] for s in encoded] == [s["__key__"] for s in source]  # same samples, same order
    assert [s["txt"] for s in encoded] == [s["txt"] for s in source]
    stored = torch.from_numpy(np.stack([np.load(io.BytesIO(s["latent.npy"])) for s in encoded[:32]]))
    assert stored.dtype == torch.float16
    from PIL import Image

    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(s["image.png"])))).permute(2, 0, 1)
                          for s in source[:32]]).float() / 127.5 - 1
    autoencoder = load_autoencoder(vae)

    def psnr(decoded):
        mse = ((decoded - images) / 2).pow(2).flatten(1).mean(1)
        return float((-10 * torch.log10(mse)).mean())

    through_shards = psnr(autoencoder.decode(stored.float()))
    in_memory = psnr(autoencoder.decode(autoencoder.encode(images)))
    assert through_shards > 12.0, through_shards  # an untrained autoencoder reaches about 8 dB here
    assert abs(through_shards - in_memory) < 0.05, (through_shards, in_memory)  # fp16 storage costs nothing visible
    tokens = np.load(io.BytesIO(encoded[0]["text_emb.npy"]))  # the caption's real tokens only
    assert tokens.dtype == np.float16 and 2 < len(tokens) < 64 and tokens.shape[1] == 384


def test_a_killed_encode_pass_resumes_without_redoing_or_duplicating(shapes, vae, tmp_path):
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "scaleyard.platform.cli", "data", "encode", f"{shapes}/train", "--autoencoder",
               str(vae), "--out", str(out), "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = out / ".encoded" / "latents-000000.tar.json"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    records = sorted(p.name for p in (out / ".encoded").glob("*.json"))
    assert first.exists() and len(records) < 4, f"killed too late to test a resume: {records}"
    assert not (out / "index.json").exists()  # a killed pass never looks usable
    kept = (out / "latents-000000.tar").stat()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["shards_skipped_here"] == len(records) and metrics["shards_here"] == 4 - len(records)
    assert (out / "latents-000000.tar").stat().st_mtime_ns == kept.st_mtime_ns  # not redone
    keys = [s["__key__"] for s in _read_shards(out)]
    assert keys == [s["__key__"] for s in _read_shards(shapes / "train")]  # each once, in order
    assert not list(out.glob("*.partial"))


def test_t2i_trains_a_paper_preset_on_latents_and_decodes_its_samples(latents, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "t2i"
    done = scaleyard("run", "t2i", "--preset", "tiny", f"run.dir={run}", f"data.path={latents}",
                     f"data.eval_path={latents}", "model.preset=dit_adaln-0.3B", "model.width=64", "model.depth=2",
                     "model.heads=2", "model.text_encoder=minilm", "eval.samples=8", "eval.steps=2")
    assert done.returncode == 0, done.stdout + done.stderr
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    grid = events.Images("eval/samples")[-1]
    image = Image.open(io.BytesIO(grid.encoded_image_string))
    assert image.mode == "RGB" and image.width >= SIDE  # decoded pixels, not 4-channel latents
    sampled = scaleyard("sample", str(run), "--out", str(tmp_path / "samples"), "--prompt", "a red circle",
                        "--n", "1", "--steps", "2")
    assert sampled.returncode == 0, sampled.stderr
    png = Image.open(tmp_path / "samples" / "samples" / "000000.png")
    assert (png.mode, png.size) == ("RGB", (SIDE, SIDE))


def test_cached_text_embeddings_match_the_live_encoder(latents):
    from scaleyard.jobs.t2i.job import Config, TextToImage, model_configs
    from scaleyard.models.text_encoder import FrozenMiniLM
    from scaleyard.platform.config import resolve

    cfg = resolve(Config, [], ["model.preset=dit_adaln-0.3B", "model.width=32", "model.depth=1", "model.heads=1",
                               "model.text_encoder=minilm"])
    denoiser, text = model_configs(cfg)
    model = TextToImage(denoiser, text, FrozenMiniLM(denoiser.text_len))
    from scaleyard.data_loaders.decoders import CaptionDecoder

    sample = _read_shards(latents)[0]
    decoded = CaptionDecoder(embedding_field="text_emb.npy", embedding_len=64)(sample, 0)
    cached = decoded["caption_embedding"][None], decoded["caption_mask"][None]
    caption = decoded["caption"]
    live_tokens, live_mask = model.encode([caption], torch.device("cpu"))
    tokens, mask = model.encode([caption], torch.device("cpu"), cached)
    assert torch.equal(mask, live_mask) and torch.allclose(tokens, live_tokens, atol=2e-2)
    dropped, dropped_mask = model.encode([""], torch.device("cpu"), cached)  # caption dropout: the empty text
    null_tokens, null_mask = model.encode([""], torch.device("cpu"))
    assert torch.equal(dropped, null_tokens) and torch.equal(dropped_mask, null_mask)


def test_bad_inputs_fail_before_anything_is_written(shapes, vae, latents, tmp_path):
    broken = tmp_path / "vae"
    broken.mkdir()
    (broken / "config.json").write_text((vae / "config.json").read_text())
    out = tmp_path / "out"
    code, err = scaleyard_in_process("data", "encode", f"{shapes}/train", "--autoencoder", str(broken), "--out",
                                     str(out))
    assert code == 2 and "'autoencoder'" in err and "diffusion_pytorch_model.safetensors is missing" in err
    assert not out.exists()
    code, err = scaleyard_in_process("data", "encode", str(tmp_path / "nowhere"), "--autoencoder", str(vae),
                                     "--out", str(out))
    assert code == 2 and "'source'" in err and not out.exists()

    from omegaconf import OmegaConf

    from scaleyard.data_loaders.index import load_index
    from scaleyard.jobs.t2i.latents import load_decoder
    from scaleyard.platform.config import ConfigError

    other = tmp_path / "other-vae"
    other.mkdir()
    (other / "config.json").write_text((vae / "config.json").read_text())
    weights = (vae / "diffusion_pytorch_model.safetensors").read_bytes()
    (other / "diffusion_pytorch_model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    cfg = OmegaConf.create({"model": {"autoencoder": str(other)}})
    with pytest.raises(ConfigError, match="'model.autoencoder'.*not the autoencoder that encoded"):
        load_decoder(cfg, load_index(latents), "cpu")


@pytest.mark.slow  # a SLURM job of 2 tasks (about a minute with the queue)
def test_encode_on_slurm_splits_shards_over_tasks(shapes, vae, latents, tmp_path):
    from test_slurm import wait_done

    out = tmp_path / "latents"
    done = scaleyard("submit", "latent_encode", "--cluster", "slurm", "--ntasks-per-node", "2",
                     f"source={shapes}/train", f"autoencoder={vae}", f"run.dir={out}", "batch_size=16",
                     "text_encoder=minilm")
    assert done.returncode == 0, done.stdout + done.stderr
    row = wait_done(out, 600)
    assert row["state"] == "COMPLETED", row
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # the same samples and latents as one local process wrote (rank r took shards r, r + 2); thread
    # counts may differ between the two, so latents agree to fp16 rounding, not bit for bit
    there, here = _read_shards(out), _read_shards(latents)
    assert [s["__key__"] for s in there] == [s["__key__"] for s in here]
    for a, b in zip(there, here):
        assert np.allclose(np.load(io.BytesIO(a["latent.npy"])), np.load(io.BytesIO(b["latent.npy"])), atol=2e-3)


@pytest.mark.parametrize("arch", ["dit_adaln", "dit_cross", "uvit"])
def test_every_paper_preset_shrinks_to_cpu_width_keeping_its_latent_geometry(arch):
    from scaleyard.jobs.t2i.job import Config, TextToImage, model_configs
    from scaleyard.models.diffusion import flow
    from scaleyard.platform.config import resolve

    cfg = resolve(Config, [], [f"model.preset={arch}-8B", "model.width=32", "model.depth=3", "model.heads=2"])
    denoiser, text = model_configs(cfg)
    assert (denoiser.channels, denoiser.image_size, denoiser.patch, denoiser.text_len) == (4, 32, 2, 64)
    model = TextToImage(denoiser, text)
    latents = torch.randn(2, 4, 32, 32)
    loss = model(latents, ["a red circle", ""], torch.rand(2), torch.randn_like(latents), flow.PROCESSES[0])
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_foreign_shards_encode_through_their_index_skipping_the_corrupt_image(tmp_path):
    """img2dataset-style shards (mixed formats and modes, one truncated JPEG, one sample without a
    caption) -> `data index` -> `data encode`: every decodable image becomes a latent, the corrupt
    one is a counted skip, the uncaptioned one is kept without a caption."""
    from diffusers import AutoencoderKL
    from foreign_fixture import make_foreign_folder

    from scaleyard.data_loaders.index import load_index
    from scaleyard.data_loaders.indexer import index_shards
    from scaleyard.models.autoencoder import autoencoder_kl_config

    foreign = make_foreign_folder(tmp_path / "shards", shards=2, per_shard=10)
    index_shards(str(foreign.root), tmp_path / "indexed", size=16, workers=1)
    torch.manual_seed(0)
    AutoencoderKL(**autoencoder_kl_config("kl-f2-tiny")).save_pretrained(str(tmp_path / "vae"))
    out = tmp_path / "latents"
    code, err = scaleyard_in_process("data", "encode", str(tmp_path / "indexed"), "--autoencoder",
                                     str(tmp_path / "vae"), "--out", str(out), "--batch-size", "4")
    assert code == 0, err
    index = load_index(out)
    assert index.total == foreign.total - 1 and index.extra["skipped"] == 1
    assert index.extra["latent_shape"] == [4, 8, 8]
    keys = [s["__key__"] for s in _read_shards(out)]
    assert foreign.corrupt[0].split(".")[0] not in keys and foreign.uncaptioned[0] in keys
    problems = json.loads((out / ".encoded" / "latents-000000.tar.json").read_text())["problems"]
    assert len(problems) == 1 and foreign.corrupt[0].split(".")[0] in problems[0]
