"""train.activation_checkpointing recomputes each repeated block in backward: the same
weights bit for bit (fp32, CPU), the same state-dict keys, and less stored activation memory;
blocks are found by name (DiT/U-ViT `*blocks`, a Hugging Face model's `layers`) or declared by
the job (JobParts.blocks, e.g. a GNN's `convs`), the same way under every engine."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import build_model
from scaleyard.models.presets import preset
from scaleyard.platform.engines.activation_checkpointing import apply_activation_checkpointing, transformer_blocks

from conftest import REPO, scaleyard

PROBE = REPO / "tests" / "engine_jobs" / "checkpointing_probe.py"
_spec = importlib.util.spec_from_file_location("checkpointing_probe", PROBE)
gnn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gnn)


def saved_bytes(loss) -> int:
    """Bytes autograd keeps for backward while `loss()` runs forward (unique storages); runs backward."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss().backward()
    return sum(storages.values())


def saved_activation_bytes(model, batch: int = 8) -> int:
    cfg = model.cfg
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    text, mask = torch.randn(batch, cfg.text_len, cfg.text_dim), torch.ones(batch, cfg.text_len, dtype=torch.bool)
    return saved_bytes(lambda: flow.training_loss(model, x, text, mask, torch.rand(batch), torch.randn_like(x)).mean())


def grads(model) -> dict[str, torch.Tensor]:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


def check_recomputes(model, loss_of, blocks=None, expected_blocks: int = 0) -> None:
    """Wrapping keeps state-dict keys and gradients (bit for bit) and stores less for backward."""
    plain = copy.deepcopy(model)
    full = saved_bytes(lambda: loss_of(plain))
    keys = set(model.state_dict())
    assert apply_activation_checkpointing(model, blocks) == expected_blocks
    assert set(model.state_dict()) == keys
    checkpointed = saved_bytes(lambda: loss_of(model))
    reference, got = grads(plain), grads(model)
    assert reference.keys() == got.keys()
    assert all(torch.equal(reference[k], got[k]) for k in reference)
    assert checkpointed < 0.6 * full, (checkpointed, full)


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
    assert "'train.activation_checkpointing': job classify's memory_shape lists no repeated blocks" in done.stderr
    assert not run_dir.exists()


def test_declared_blocks_of_a_gnn_are_checkpointed():
    torch.manual_seed(0)
    model = gnn.TinyEGNN()
    assert transformer_blocks(model) == []  # `convs` is no name the rule knows: the job declares it
    with pytest.raises(ValueError, match="declare JobParts.blocks"):
        apply_activation_checkpointing(copy.deepcopy(model))
    assert [getattr(p, n) for p, n in transformer_blocks(model, gnn.declared_blocks)] == list(model.convs)
    atoms, x = gnn.inputs(24)
    check_recomputes(model, lambda m: m(atoms, x), gnn.declared_blocks, expected_blocks=3)


def test_hugging_face_layers_are_found_by_the_name_rule():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert [getattr(p, n) for p, n in transformer_blocks(model)] == list(model.model.layers)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    check_recomputes(model, lambda m: m(input_ids=ids, labels=ids).loss, expected_blocks=2)


def test_declared_blocks_must_be_outermost_submodules():
    model = gnn.TinyEGNN()
    with pytest.raises(ValueError, match="not a submodule"):
        apply_activation_checkpointing(model, lambda m: [gnn.EGNNLayer(4)])
    with pytest.raises(ValueError, match="the blocks nest"):
        apply_activation_checkpointing(model, lambda m: [m.convs[0], m.convs[0].edge])
    with pytest.raises(ValueError, match="JobParts.blocks returned no modules"):
        apply_activation_checkpointing(model, lambda m: [])


def test_every_engine_checkpoints_the_declared_blocks():
    """single, ddp, deepspeed and megatron wrap what JobParts.blocks names, the same way."""
    done = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {"single", "ddp", "deepspeed", "megatron"}
    for engine, r in report.items():
        assert r == {"wrapped": 3, "wrapped_convs": True, "grad_difference": 0.0}, engine
