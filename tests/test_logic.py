"""Logic-gate networks: gate algebra, tree convolutions, residual init, the discretised network
against its compiled C circuit (exact), config errors, exact resume and `export --format c`."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from scaleyard.jobs.logic.job import Logic, load_logic_net
from scaleyard.models.logic.compiled import C_GATES, CompiledLogicNet, compile_net
from scaleyard.models.logic.conv import LogicConv2d, OrPool2d, TreeDepthError
from scaleyard.models.logic.gates import (
    GATE_NAMES,
    NUM_GATES,
    PASS_THROUGH,
    GroupSum,
    LogicLayer,
    apply_gates,
    gate_coefficients,
    init_gate_logits,
    mixed_coefficients,
)
from scaleyard.models.logic.network import LogicNet, LogicNetConfig, discretised
from scaleyard.platform.config import ConfigError
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.export import ExportError, job_export
from scaleyard.platform.launch import prepare, write_config
from scaleyard.platform.trainer import Trainer

from conftest import FASHION_SOURCE, scaleyard

# truth table of gate g at (a, b) = (0,0), (0,1), (1,0), (1,1): bit 2a + b of g's index, as in difflogic
TRUTH = {name: tuple((g >> (3 - (2 * a + b))) & 1 for a, b in itertools.product((0, 1), repeat=2))
         for g, name in enumerate(GATE_NAMES)}


def test_each_relaxed_gate_is_its_truth_table_on_bits():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([0.0, 1.0, 0.0, 1.0])
    expected = {"false": (0, 0, 0, 0), "a_and_b": (0, 0, 0, 1), "a": (0, 0, 1, 1), "b": (0, 1, 0, 1),
                "a_xor_b": (0, 1, 1, 0), "a_or_b": (0, 1, 1, 1), "a_nor_b": (1, 0, 0, 0), "a_nand_b": (1, 1, 1, 0),
                "not_a": (1, 1, 0, 0), "true": (1, 1, 1, 1)}
    table = gate_coefficients()
    seen = set()
    for g in range(NUM_GATES):
        out = apply_gates(a, b, table[g]).tolist()
        assert out == list(TRUTH[GATE_NAMES[g]]), GATE_NAMES[g]
        seen.add(tuple(out))
    assert len(seen) == 16  # all 16 Boolean functions of two inputs, once each
    for name, row in expected.items():  # the names say what the gates are
        assert TRUTH[name] == row, name


def test_c_gate_expressions_match_the_truth_tables():
    # bits 0..3 of the words hold the four (a, b) cases; numpy's ~ on uint64 is C's
    A, B = np.uint64(0b0011), np.uint64(0b0101)  # noqa: N806 (the names C_GATES uses)
    for g, expr in enumerate(C_GATES):
        value = eval(expr.replace("0ULL", "np.uint64(0)"), {"np": np, "A": A, "B": B})
        bits = tuple(int(value >> np.uint64(3 - i)) & 1 for i in range(4))
        assert bits == TRUTH[GATE_NAMES[g]], (g, expr)


def test_coefficient_mixture_equals_the_mixture_of_the_16_gates_and_gradients_reach_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, NUM_GATES, requires_grad=True)
    a, b = torch.rand(7, 5), torch.rand(7, 5)
    mixed = apply_gates(a, b, mixed_coefficients(logits, discrete=False))
    probs = torch.softmax(logits, -1)
    table = gate_coefficients()
    each = torch.stack([apply_gates(a, b, table[g]) for g in range(NUM_GATES)], -1)  # [7, 5, 16]
    torch.testing.assert_close(mixed, (each * probs).sum(-1))
    mixed.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    hard = apply_gates(a.round(), b.round(), mixed_coefficients(logits, discrete=True))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


def test_residual_init_puts_090_on_pass_through_and_the_layer_starts_as_wires():
    probs = torch.softmax(init_gate_logits((3,), residual=True), -1)
    torch.testing.assert_close(probs[:, PASS_THROUGH], torch.full((3,), 0.9))
    layer = LogicLayer(20, 30, residual_init=True, generator=torch.Generator().manual_seed(1))
    x = (torch.rand(4, 20) > 0.5).float()
    layer.discrete = True
    assert torch.equal(layer(x), x[:, layer.idx_a])
    assert sorted(set(layer.idx_a.tolist()) | set(layer.idx_b.tolist())) == list(range(20))  # every input wired


def test_straight_through_trains_the_discretised_network():
    torch.manual_seed(0)
    net = LogicNet(LogicNetConfig(conv_channels=(3,), tree_depth=2, thresholds=2, fc=(60, 40), tau=2.0,
                                  residual_init=False, straight_through=True)).train()
    images = torch.rand(5, 1, 28, 28)
    out = net(images)
    with torch.no_grad(), discretised(net):
        assert torch.equal(out.detach(), net(images))  # the forward is the Boolean circuit's
    out.sum().backward()
    assert all(m.logits.grad.abs().sum() > 0 for m in net.modules() if hasattr(m, "logits"))
    net.eval()  # evaluation's relaxed metric stays the softmax mixture
    assert not torch.equal(net(images), out.detach())


def test_tree_conv_shape_receptive_field_and_translation_equivariance():
    torch.manual_seed(0)
    conv = LogicConv2d(2, 5, depth=3, generator=torch.Generator().manual_seed(0), residual_init=False)
    conv.discrete = True
    x = (torch.rand(1, 2, 9, 9) > 0.5).float()
    out = conv(x)
    assert out.shape == (1, 5, 9, 9) and conv.logits.shape == (5, 7, 16)
    # flipping one input cell changes outputs only within the 3x3 window around it
    flipped = x.clone()
    flipped[0, :, 4, 4] = 1 - flipped[0, :, 4, 4]
    changed = (conv(flipped) != out).any(1)[0].nonzero().tolist()
    assert all(abs(y - 4) <= 1 and abs(x_ - 4) <= 1 for y, x_ in changed)
    # gates are shared across positions: shifting the input shifts the output (away from the border)
    shifted = torch.zeros_like(x)
    shifted[..., 1:, 1:] = x[..., :-1, :-1]
    assert torch.equal(conv(shifted)[..., 1:-1, 1:-1], out[..., :-2, :-2])
    assert OrPool2d(2)(out).shape == (1, 5, 4, 4)
    with pytest.raises(TreeDepthError, match="tree depth 5 needs 32 distinct leaves.*1 x 3 x 3 has 9"):
        LogicConv2d(1, 4, depth=5)


def test_group_sum_and_bad_inputs():
    assert GroupSum(2, 2.0)(torch.tensor([[1.0, 0.0, 1.0, 1.0]])).tolist() == [[0.5, 1.0]]
    with pytest.raises(ValueError, match="do not split into 3"):
        GroupSum(3, 1.0)(torch.ones(1, 4))
    with pytest.raises(ValueError, match="expects 20 inputs"):
        LogicLayer(20, 10)(torch.ones(2, 21))
    with pytest.raises(ValueError, match="must split into 10 equal class groups"):
        LogicNet(LogicNetConfig(fc=(105,)))


def idx_images(count: int) -> torch.Tensor:
    with gzip.open(FASHION_SOURCE / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16)
    return torch.from_numpy(raw.reshape(-1, 1, 28, 28)[:count].copy())


def check_compiled_equals_discretised(net: LogicNet, folder, real: torch.Tensor) -> None:
    compiled = compile_net(net.eval(), folder)
    noise = torch.randint(0, 256, (130, 1, 28, 28), dtype=torch.uint8)  # 2 full blocks of 64 and a partial one
    for images in (noise, real):
        with torch.no_grad(), discretised(net):
            counts = torch.cat([net.class_counts(chunk.float() / 255.0) for chunk in images.split(500)])
        pred, c_counts = compiled.predict(images, with_counts=True)
        assert torch.equal(torch.from_numpy(c_counts).long(), counts.long())
        assert torch.equal(torch.from_numpy(pred).long(), counts.argmax(-1))  # ties: the first maximum
        assert len(set(pred.tolist())) > 1
    with pytest.raises(ValueError, match="not uint8 pixels"):
        compiled.predict(torch.full((1, 1, 28, 28), 0.5001))


def test_discretised_network_equals_compiled_c_on_random_and_real_images(tmp_path):
    torch.manual_seed(0)
    cfg = LogicNetConfig(thresholds=2, conv_channels=(4,), tree_depth=2, fc=(200, 100), residual_init=False)
    check_compiled_equals_discretised(LogicNet(cfg), tmp_path, idx_images(2000))


@pytest.mark.slow
def test_two_stage_network_equals_compiled_c_on_the_whole_test_set(tmp_path):
    torch.manual_seed(0)
    cfg = LogicNetConfig(thresholds=3, conv_channels=(6, 8), tree_depth=3, fc=(300, 200), residual_init=False)
    check_compiled_equals_discretised(LogicNet(cfg), tmp_path, idx_images(10_000))  # all of Fashion-MNIST's test set


def test_config_errors_name_the_key(fmnist):
    args = [f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test"]
    cases = {
        "model.tree_depth=5": "model.tree_depth.*needs 32 distinct leaves",  # 2 thresholds x 3 x 3 = 18 cells
        "model.fc=[200,105]": "model.fc.*105 neurons must split into 10",
        "model.conv_channels=[4,4,4,4,4]": "model.conv_channels",
        "model.thresholds=0": "model.thresholds",
        "optim.tract=true": "optim.tract.*logic declares no first layer",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            prepare("logic", [*args, override], preset="tiny")


def train(fmnist, run_dir, *overrides):
    args = [f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test", f"run.dir={run_dir}", *overrides]
    prepared = prepare("logic", args, preset="tiny")
    write_config(prepared)
    return Trainer(Logic(), prepared.cfg, DistEnv(), handle_signals=False).run()


@pytest.fixture(scope="module")
def tiny_run(fmnist, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("logic") / "run"
    return run_dir, train(fmnist, run_dir)


def test_tiny_run_reports_both_accuracies_and_resumes_exactly(fmnist, tiny_run, tmp_path):
    run_dir, summary = tiny_run
    evaluated = summary["eval"]
    assert 0 <= evaluated["accuracy_discrete"] <= 1 and 0 <= evaluated["accuracy_relaxed"] <= 1
    assert evaluated["gates_per_image"] == 4 * 3 * 28 * 28 + 300
    assert summary["step"] == 12 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    # resume from the step-8 checkpoint of a copy: the same weights as the uninterrupted run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000012")
    (copy / "summary.json").unlink()
    resumed = train(fmnist, copy)
    assert resumed["weights_sha256"] == summary["weights_sha256"]


def test_export_format_c_predicts_like_the_discretised_run(fmnist, tiny_run):
    run_dir, _ = tiny_run
    done = scaleyard("export", str(run_dir), "--format", "c")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["learned_gates"] == 4 * 3 + 300 and report["out"].endswith("step_00000012.c")
    net = load_logic_net(run_dir)
    compiled = CompiledLogicNet(report["library"], net)
    images = idx_images(2000)
    with torch.no_grad(), discretised(net):
        expected = net(images.float() / 255.0).argmax(-1)
    assert torch.equal(torch.from_numpy(compiled.predict(images)).long(), expected)
    with pytest.raises(ExportError, match="exists"):  # never overwrites
        job_export(run_dir, "c")
    with pytest.raises(ExportError, match="choose one of safetensors, c"):
        job_export(run_dir, "onnx")
