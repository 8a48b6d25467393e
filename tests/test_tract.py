"""TrAct (platform/tract.py): the first layer's weight gradient against a hand computation
(Linear, both the direct and the Woodbury form, and Conv2d patches), its lambda -> infinity limit,
untouched input and bias gradients, config errors that name the key, and exact resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from scaleyard.jobs.classify.job import Classify
from scaleyard.platform.config import ConfigError
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.launch import check_run_dir, prepare, write_config
from scaleyard.platform.tract import attach_tract
from scaleyard.platform.trainer import Trainer

from conftest import scaleyard


def hand_tract(grad_out: np.ndarray, rows: np.ndarray, lam: float) -> np.ndarray:
    """G^T X (X^T X / b + lambda I)^-1, written out in float64 numpy."""
    b, n = rows.shape
    return grad_out.T @ rows @ np.linalg.inv(rows.T @ rows / b + lam * np.eye(n))


def grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weight, bias and input gradients of sum(layer(x) * upstream)."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    (layer(x) * upstream).sum().backward()
    return layer.weight.grad.clone(), layer.bias.grad.clone(), x.grad.clone()


@pytest.mark.parametrize("batch", [7, 3], ids=["b>=n", "woodbury b<n"])
def test_linear_weight_gradient_equals_the_closed_form(batch):
    torch.manual_seed(0)
    plain = nn.Linear(5, 2).double()
    tract = nn.Linear(5, 2).double()
    tract.load_state_dict(plain.state_dict())
    attach_tract(nn.Sequential(tract), "0", 0.1)
    x, upstream = torch.randn(batch, 5, dtype=torch.float64), torch.randn(batch, 2, dtype=torch.float64)
    w_plain, b_plain, x_plain = grads(plain, x, upstream)
    w_tract, b_tract, x_tract = grads(tract, x, upstream)
    expected = hand_tract(upstream.numpy(), x.numpy(), 0.1)
    np.testing.assert_allclose(w_tract.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(w_tract, w_plain)
    assert torch.equal(b_tract, b_plain) and torch.equal(x_tract, x_plain)  # only the weight gradient changes


def test_conv_weight_gradient_uses_unfolded_patches_and_tends_to_the_plain_gradient():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x, upstream = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w_plain, b_plain, _ = grads(conv, x, upstream)
    attach_tract(nn.Sequential(conv), "0", 0.5)
    w_tract, b_tract, _ = grads(conv, x, upstream)
    # the patches by hand: one row per (image, y, x), the 2 x 3 x 3 window around it (zero padded)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = np.array([padded[i, :, y:y + 3, x_:x_ + 3].reshape(-1) for i in range(2) for y in range(4)
                     for x_ in range(4)])
    g = upstream.numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    np.testing.assert_allclose(w_tract.reshape(3, -1).numpy(), hand_tract(g, rows, 0.5), rtol=1e-9, atol=1e-12)
    assert torch.equal(b_tract, b_plain)
    # lambda -> infinity: lambda x the TrAct gradient -> the plain gradient
    conv.tract_lambda = 1e7
    w_big, _, _ = grads(conv, x, upstream)
    torch.testing.assert_close(w_big * 1e7, w_plain, rtol=1e-5, atol=1e-6)


def test_float32_and_unsupported_layers():
    layer = nn.Linear(4, 3)
    attach_tract(nn.Sequential(layer), "0", 0.1)
    x = torch.randn(8, 4)
    layer(x).sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    with torch.no_grad():  # no gradient: the plain forward, nothing saved
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(ConfigError, match="optim.tract.*LayerNorm.*nn.Linear and nn.Conv2d"):
        attach_tract(nn.Sequential(nn.LayerNorm(4)), "0", 0.1)
    with pytest.raises(ConfigError, match="optim.tract.*groups=2"):
        attach_tract(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "0", 0.1)
    with pytest.raises(ConfigError, match="optim.tract.*'stem' is not a submodule"):
        attach_tract(nn.Sequential(layer), "stem", 0.1)


def test_bad_settings_fail_before_anything_runs(classify_args, tmp_path):
    base = [*classify_args, f"run.dir={tmp_path / 'never'}"]
    with pytest.raises(ConfigError, match="'optim.tract_lambda': -1.0 is below the minimum"):
        prepare("classify", [*base, "optim.tract=true", "optim.tract_lambda=-1"], preset="tiny")
    with pytest.raises(ConfigError, match="'optim.tract_lambda': 0.0 must be > 0"):
        prepare("classify", [*base, "optim.tract=true", "optim.tract_lambda=0"], preset="tiny")
    prepare("classify", [*base, "optim.tract=true"], preset="tiny")  # classify declares its first conv
    assert not (tmp_path / "never").exists()


def train(classify_args, run_dir, *overrides):
    prepared = prepare("classify", [*classify_args, f"run.dir={run_dir}", "optim.tract=true", *overrides],
                       preset="tiny")
    write_config(prepared)
    return Trainer(Classify(), prepared.cfg, DistEnv(), handle_signals=False).run()


def test_classify_with_tract_resumes_exactly_and_differs_from_plain(classify_args, tmp_path):
    reference = train(classify_args, tmp_path / "ref")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "ref", copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000012")
    (copy / "summary.json").unlink()
    assert train(classify_args, copy)["weights_sha256"] == reference["weights_sha256"]
    plain = train(classify_args, tmp_path / "plain", "optim.tract=false", "train.steps=2")
    partial = train(classify_args, tmp_path / "two", "train.steps=2")
    assert plain["weights_sha256"] != partial["weights_sha256"]  # the option really changes training


def test_a_run_from_before_the_option_still_resumes(classify_args, tmp_path):
    """config.yaml written before optim.tract existed: the new keys at their defaults are no change."""
    run_dir = tmp_path / "old"
    prepared = prepare("classify", [*classify_args, f"run.dir={run_dir}"], preset="tiny")
    write_config(prepared)
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "meta.json").write_text("{}")
    saved = OmegaConf.load(run_dir / "config.yaml")
    del saved.optim["tract"], saved.optim["tract_lambda"]
    OmegaConf.save(saved, run_dir / "config.yaml")
    assert check_run_dir(prepare("classify", [*classify_args, f"run.dir={run_dir}"], preset="tiny")) == "resume"
    with pytest.raises(ConfigError, match="different config.*optim.tract"):
        check_run_dir(prepare("classify", [*classify_args, f"run.dir={run_dir}", "optim.tract=true"], preset="tiny"))


@pytest.mark.slow
def test_two_ddp_ranks_train_with_tract_and_resume_exactly(classify_args, tmp_path):
    """Under ddp each rank preconditions its own gradient before DDP averages it; the run
    completes, differs from plain DDP, and a copy resumed from step 8 ends with the same weights."""
    def run(run_dir, *extra):
        done = scaleyard("run", "classify", "--preset", "tiny", "--nproc", "2", *classify_args,
                         f"run.dir={run_dir}", *extra)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((run_dir / "summary.json").read_text())

    reference = run(tmp_path / "tract", "optim.tract=true")
    plain = run(tmp_path / "plain")
    assert reference["weights_sha256"] != plain["weights_sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "tract", copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000012")
    (copy / "summary.json").unlink()
    saved = OmegaConf.load(copy / "config.yaml")
    saved.run.dir = str(copy)  # the copy is its own run folder
    OmegaConf.save(saved, copy / "config.yaml")
    assert run(copy, "optim.tract=true")["weights_sha256"] == reference["weights_sha256"]


def test_t2i_declares_its_patch_embedding_and_it_trains_with_tract():
    from scaleyard.jobs.t2i.job import TextToImage, TextToImageJob, model_configs
    from scaleyard.platform.config import resolve

    job = TextToImageJob
    cfg = resolve(job.Config, [job.presets_dir() / "tiny.yaml"], [])
    denoiser, text = model_configs(cfg)
    model = TextToImage(denoiser, text)
    layer = attach_tract(model, job.first_layer(cfg), 0.1)
    assert isinstance(layer, nn.Conv2d) and layer.stride == layer.kernel_size  # a ViT-style patch embedding
    images = torch.randn(2, denoiser.channels, denoiser.image_size, denoiser.image_size)
    loss = model(images, ["a", "b"], torch.rand(2), torch.randn_like(images), cfg.model.process)
    loss.mean().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
