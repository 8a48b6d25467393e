"""train.activation_checkpointing recomputes each transformer block in backward: the same
weights bit for bit (fp32, CPU), the same state-dict keys, and less stored activation memory."""

import json

import torch

from scaleyard.models import flow
from scaleyard.models.diffusion_transformer import build_model
from scaleyard.models.presets import preset
from scaleyard.platform.engines.activation_checkpointing import apply_activation_checkpointing, transformer_blocks

from conftest import scaleyard


def saved_activation_bytes(model, batch: int = 8) -> int:
    """Bytes autograd keeps for backward during one forward (unique storages)."""
    cfg = model.cfg
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    text, mask = torch.randn(batch, cfg.text_len, cfg.text_dim), torch.ones(batch, cfg.text_len, dtype=torch.bool)
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow.training_loss(model, x, text, mask, torch.rand(batch), torch.randn_like(x)).mean().backward()
    return sum(storages.values())


def test_blocks_found_and_memory_drops():
    for arch in ("dit_adaln", "dit_cross", "uvit"):
        model = build_model(preset(f"{arch}-cpu-s"))
        keys = set(model.state_dict())
        full = saved_activation_bytes(model)
        wrapped = apply_activation_checkpointing(model)
        assert wrapped == len(transformer_blocks(model)) == preset(f"{arch}-cpu-s").depth
        assert set(model.state_dict()) == keys  # checkpoints load with the option on or off
        assert saved_activation_bytes(model) < 0.5 * full, arch


def test_training_with_checkpointing_gives_identical_weights(fmnist, tmp_path):
    digests = []
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        done = scaleyard("run", "t2i", "--preset", "tiny", f"data.path={fmnist}/train",
                         f"data.eval_path={fmnist}/test", "train.steps=4", "eval.samples=0", "eval.val_samples=32",
                         f"train.activation_checkpointing={flag}", f"run.dir={run_dir}")
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(json.loads((run_dir / "summary.json").read_text())["weights_sha256"])
    assert digests[0] == digests[1]


def test_model_without_blocks_is_refused_before_running(classify_args, tmp_path):
    run_dir = tmp_path / "never"
    done = scaleyard("run", "classify", "--preset", "tiny", *classify_args, f"run.dir={run_dir}",
                     "train.activation_checkpointing=true")
    assert done.returncode == 2
    assert "'train.activation_checkpointing': job classify's model has no transformer blocks" in done.stderr
    assert not run_dir.exists()
