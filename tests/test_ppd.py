"""PPD: zero-initialised user attention, the Diffusion-DPO loss by hand, synthetic users and
partial captions, the ppd_pairs builder, bad input refused before anything runs, and the whole
path (`scaleyard run ppd --preset tiny`: shapes, base t2i, reader, pairs, PPD) through the real CLI.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scaleyard.data_loaders.builders import build
from scaleyard.data_loaders.builders.ppd_users import (
    ATTRIBUTES,
    TRAITS,
    describe,
    hard,
    make_persona,
    prompts,
    reward,
    soft,
)
from scaleyard.data_loaders.builders.shapes import caption, splits
from scaleyard.jobs.ppd.losses import diffusion_dpo_loss
from scaleyard.models.diffusion.transformer import build_model
from scaleyard.models.presets import preset
from scaleyard.models.user_conditioning import UserConditionedDenoiser
from scaleyard.platform.config import ConfigError
from scaleyard.platform.job import builder_networks
from scaleyard.platform.launch import prepare

from conftest import scaleyard


@pytest.mark.parametrize("arch", ["uvit", "dit_adaln", "dit_cross"])
def test_user_attention_starts_exactly_at_the_base_model(arch):
    cfg = preset(f"{arch}-cpu-xs", image_size=32, channels=3)
    torch.manual_seed(0)
    base = build_model(cfg)
    with torch.no_grad():
        for p in base.parameters():  # non-zero everywhere, so that nothing is trivially equal
            p.normal_(0, 0.05)
    wrapped = UserConditionedDenoiser(copy.deepcopy(base))
    assert len(wrapped.adapters()) == cfg.depth  # every block
    x, t = torch.randn(3, 3, 32, 32), torch.rand(3)
    text, mask = torch.randn(3, cfg.text_len, cfg.text_dim), torch.ones(3, cfg.text_len, dtype=torch.bool)
    mask[0, 5:] = False
    user = torch.randn(3, 2, cfg.width)
    with torch.no_grad():
        expected = base(x, t, text, mask)
        assert torch.equal(wrapped(x, t, text, mask, user), expected)  # bitwise, with a user
        assert torch.equal(wrapped(x, t, text, mask), expected)  # and without one
        for adapter in wrapped.adapters():
            adapter.to_v.weight.normal_()
        moved = wrapped(x, t, text, mask, user)
        assert (moved - expected).abs().max() > 1e-3  # the added term is live once W'_v moves
        dropped = wrapped(x, t, text, mask, user, torch.tensor([False, True, False]))
        assert torch.equal(dropped[0], expected[0]) and torch.equal(dropped[2], expected[2])  # u dropped
        assert torch.equal(dropped[1], moved[1])
    # at step 0 W'_v (not W'_k) gets the gradient: both starting at zero would never move
    wrapped.adapters()[0].to_v.weight.data.zero_()
    loss = wrapped(x, t, text, mask, user).square().mean()
    loss.backward()
    assert wrapped.adapters()[0].to_v.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lora_rank", [0, pytest.param(4, marks=pytest.mark.slow)])  # slow: peft imports transformers
def test_ppd_model_at_step_zero_is_the_base_model(lora_rank):
    if lora_rank:
        pytest.importorskip("peft")
    from scaleyard.jobs.ppd.model import PersonalizedT2I, PPDShape
    from scaleyard.jobs.t2i.job import TextToImage
    from scaleyard.models.text_encoder import TextEncoderConfig
    from scaleyard.models.user_conditioning import UserEncoderConfig

    d = preset("uvit-cpu-xs", image_size=32, channels=3)
    shape = PPDShape(d, TextEncoderConfig(width=d.text_dim, depth=1, heads=2, max_len=d.text_len),
                     UserEncoderConfig(feature_dim=16, width=d.width, tokens=2, hidden=8), "flow")
    torch.manual_seed(0)
    base = TextToImage(shape.denoiser, shape.text)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    model = PersonalizedT2I(shape, copy.deepcopy(base), lora_rank=lora_rank)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert {"to_k", "to_v"} <= trainable and ("default" in trainable) == bool(lora_rank)  # peft's adapter names
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".attn.base.qkv.weight" in n)
    images, noise, t = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 3, 32, 32), torch.rand(4)
    captions = ["circle shapes", "a square", "", "red triangle shapes"]
    features = torch.randn(2, 4, 2, 16)
    with torch.no_grad():
        expected = base(images, captions, t, noise, "flow")
        got = model(images, captions, t, noise, features, torch.tensor([True, True]))
    assert torch.equal(got, expected)


def test_diffusion_dpo_loss_equals_the_hand_computation():
    pw, pl = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.45])
    rw, rl = torch.tensor([0.35, 0.50]), torch.tensor([0.35, 0.50])
    beta = 100.0
    loss, inside = diffusion_dpo_loss(pw, pl, rw, rl, beta)
    # pair 1: d_policy = -0.10, d_ref = 0 -> inside = -0.5 * 100 * -0.10 = 5
    # pair 2: d_policy = 0.05, d_ref = 0 -> inside = -2.5
    assert inside.tolist() == pytest.approx([5.0, -2.5])
    by_hand = (math.log1p(math.exp(-5.0)) + math.log1p(math.exp(2.5))) / 2
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # the log-sigmoid is per pair, not of the mean (diffusers #6702)
    assert float(loss) != pytest.approx(float(-F.logsigmoid(inside.mean())), rel=1e-3)
    # equal policy and reference: log 2, whatever beta
    same, _ = diffusion_dpo_loss(rw, rl, rw, rl, 5000.0)
    assert float(same) == pytest.approx(math.log(2))


def test_partial_captions_leave_attributes_open_and_defaults_are_unchanged():
    attrs = {"count": 1, "shape": "circle", "color": "red", "size": "large", "position": "top left"}
    assert caption(attrs) == "a large red circle at the top left"
    assert caption({**attrs, "count": 3, "position": None}) == "three large red circles"
    assert caption(attrs, {"count": False, "size": False, "color": False}) == "circle shapes"
    assert caption(attrs, {"color": False, "position": False}) == "a large circle"
    full = [s["txt"] for s in splits(limit=40)[0].samples()]
    partial = list(splits(limit=40, partial_captions=0.5)[0].samples())
    assert [s["image.png"] for s in splits(limit=40)[0].samples()] == [s["image.png"] for s in partial]
    for text, sample in zip(full, partial):
        a = sample["json"]
        assert text == caption(a)  # the default caption of every sample is the full one
        assert a["shape"] in sample["txt"]
    assert sum(s["txt"] != t for s, t in zip(partial, full)) > 20
    assert all(p in {caption({**attrs, "shape": s}, {k: False for k in ("count", "size", "color", "position")})
                     for s in ("circle", "square", "triangle")} | {f"a {s}" for s in ("circle", "square", "triangle")}
               for p in prompts())


def test_synthetic_users_are_deterministic_diverse_and_score_attributes():
    train = [make_persona(0, "train", u) for u in range(300)]
    held = [make_persona(0, "heldout", u) for u in range(50)]
    assert make_persona(0, "train", 7) == train[7]
    assert {p["user"] for p in train}.isdisjoint({p["user"] for p in held})
    patterns = {tuple(int(math.copysign(1, w)) if w else 0 for w in p["weights"].values()) for p in train}
    assert len(patterns) > 60  # diverse: many sign patterns over the five traits
    for p in train:
        assert sum(1 for w in p["weights"].values() if w) >= 2
        if p["favourite"] and p["weights"]["warm"]:  # self-consistent: the favourite colour agrees with warmth
            assert (p["weights"]["warm"] > 0) == (p["favourite"] in ("red", "orange", "yellow"))
    persona = {"user": "x", "weights": {"warm": 1.0, "large": 0.5, "clutter": -1.0, "centred": 0.0, "high": 0.0},
               "favourite": "red", "favourite_weight": 2.0}
    big_red = {"count": 1, "shape": "circle", "color": "red", "size": "large", "position": "center"}
    assert reward(persona, soft(big_red)) == pytest.approx(1.0 + 0.5 + 1.0 + 2.0)
    small_blue_many = {**big_red, "color": "blue", "size": "small", "count": 3, "position": None}
    assert reward(persona, soft(small_blue_many)) == pytest.approx(-1.0 - 0.5 - 1.0)
    half = {a: [(x + y) / 2 for x, y in zip(soft(big_red)[a], soft(small_blue_many)[a])] for a in ATTRIBUTES}
    assert reward(persona, half) == pytest.approx((4.5 - 2.5) / 2)  # the expectation under the reader's probabilities
    assert hard(soft(big_red)) == big_red and set(TRAITS) == set(persona["weights"])
    assert describe(persona).startswith("likes warm colours, large shapes, a single shape")


def test_context_strip_round_trip():
    from scaleyard.jobs.ppd.data import split_strip

    images = torch.rand(8, 3, 32, 32)
    strip = torch.cat(list(images), dim=2)  # [3, 32, 256]: pair 0 preferred, pair 0 dispreferred, ...
    pairs = split_strip(strip, 3)
    assert pairs.shape == (3, 2, 3, 32, 32)
    assert torch.equal(pairs[1, 0], images[2]) and torch.equal(pairs[2, 1], images[5])


# --- the whole path through the real CLI ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """`scaleyard run ppd --preset tiny` from nothing: it builds shapes, a base t2i run, a reader and
    the pairs in RUN/prereqs/, then trains and evaluates PPD."""
    run_dir = tmp_path_factory.mktemp("ppd") / "tiny"
    done = scaleyard("run", "ppd", "--preset", "tiny", f"run.dir={run_dir}", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run_dir


def test_tiny_preset_runs_the_whole_path_and_reports(tiny_run, tmp_path):
    prereqs = json.loads((tiny_run / "prereqs" / "done.json").read_text())
    assert json.loads((Path(prereqs["base_run"]) / "summary.json").read_text())["job"] == "t2i"
    assert json.loads((Path(prereqs["reader_run"]) / "summary.json").read_text())["job"] == "attributes"
    report = json.loads((tiny_run / "report.json").read_text())
    for which in ("own", "dropped", "other"):
        r = report[which]
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1
        assert r["n"] == 2 * report["setup"]["heldout_users"] > 0
    # only the added weights train, so without the embedding the model is the base model: all ties
    assert report["dropped"]["win_rate"] == 0.5 and report["dropped"]["reward"] == report["dropped"]["base_reward"]
    assert len(report["interpolation"]["user_a_reward"]) == 5
    assert "| the user's own embedding |" in (tiny_run / "report.md").read_text()
    assert set(report["setup"]["reader_accuracy"]) >= {f"accuracy/{a}" for a in ATTRIBUTES}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("eval/win_rate/win_rate", "eval/win_rate_other_user/win_rate", "train/implicit_accuracy"):
        assert any(t.endswith(name) for t in tags), (name, sorted(tags))

    # the same command again: everything is cached or finished, nothing is rebuilt
    stamp = (tiny_run / "prereqs" / "pairs" / "train" / "index.json").stat().st_mtime_ns
    again = scaleyard("run", "ppd", "--preset", "tiny", f"run.dir={tiny_run}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tiny_run / "prereqs" / "pairs" / "train" / "index.json").stat().st_mtime_ns == stamp

    # `scaleyard sample RUN --known request.json` for a new user from their example pairs
    from PIL import Image

    shard = Path(prereqs["heldout"])
    from scaleyard.data_loaders.index import load_index
    from scaleyard.jobs.ppd.data import heldout_users

    user = heldout_users(str(shard), 4, 1)[0]
    pairs = []
    for i, pair in enumerate(user["context"]):
        names = {}
        for which, image in zip(("preferred", "dispreferred"), pair):
            names[which] = f"{i}_{which}.png"
            Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / names[which])
        pairs.append(names)
    (tmp_path / "request.json").write_text(json.dumps({"prompt": "circle shapes", "pairs": pairs}))
    sampled = scaleyard("sample", str(tiny_run), "--known", str(tmp_path / "request.json"), "--rows", "3",
                        "--out", str(tmp_path / "out.png"))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    summary = json.loads(sampled.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 3 and len(summary["attributes"]) == 3
    side = load_index(shard).extra["image_shape"][1] + 2  # with the grid's gutter
    assert Image.open(tmp_path / "out.png").size == (3 * side, 2 * side)  # base row, personalised row
    from scaleyard.jobs.ppd.data import read_pairs_request

    (tmp_path / "short.json").write_text(json.dumps({"prompt": "a circle", "pairs": pairs[:2]}))
    with pytest.raises(ConfigError, match="has 2 pairs; this run was trained with model.context_pairs=4"):
        read_pairs_request(str(tmp_path / "short.json"), 4)  # what `scaleyard sample` checks before loading


def test_pair_builder_is_deterministic(tiny_run, tmp_path):
    prereqs = json.loads((tiny_run / "prereqs" / "done.json").read_text())
    options = {"base": prereqs["base_run"], "reader": prereqs["reader_run"], "users": 3, "heldout_users": 2,
               "pairs_per_user": 5, "shots": 4, "pool": 6, "steps": 2, "networks": builder_networks}
    first = build("ppd_pairs", tmp_path / "a", shard_size=4, **options)
    build("ppd_pairs", tmp_path / "b", shard_size=4, **options)
    other = build("ppd_pairs", tmp_path / "c", shard_size=4, **{**options, "seed": 1})
    for split in ("train", "heldout"):
        assert first[split].total == 5 * first[split].extra["users"] > 0
        for shard in first[split].shards:
            a, b = (tmp_path / name / split / shard.name for name in ("a", "b"))
            assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "train" / first["train"].shards[0].name).read_bytes() != \
        (tmp_path / "c" / "train" / other["train"].shards[0].name).read_bytes()
    from scaleyard.data_loaders.index import DataError

    with pytest.raises(DataError, match="pairs_per_user=4.*shots \\+ 1 = 5"):
        build("ppd_pairs", tmp_path / "d", **{**options, "pairs_per_user": 4})
    without = {k: v for k, v in options.items() if k != "networks"}  # the data layer cannot fetch them itself
    with pytest.raises(DataError, match="samples networks trained by job ppd"):
        build("ppd_pairs", tmp_path / "f", **without)
    with pytest.raises(DataError, match="ppd_pairs option .base.*is not a run folder"):
        build("ppd_pairs", tmp_path / "e", **{**options, "base": str(tmp_path / "nothing")})


def test_bad_input_is_refused_before_anything_runs(tiny_run, tmp_path):
    prereqs = json.loads((tiny_run / "prereqs" / "done.json").read_text())
    given = [f"model.base_run={prereqs['base_run']}", f"model.reader_run={prereqs['reader_run']}",
             f"data.path={prereqs['train']}", f"data.eval_path={prereqs['heldout']}"]
    cases = [
        ([f"model.base_run={tmp_path / 'missing'}"], r"model.base_run.*missing.*is not a run folder"),
        ([f"model.base_run={prereqs['reader_run']}"], r"model.base_run.*is a run of job 'attributes', not 't2i'"),
        ([f"model.reader_run={prereqs['base_run']}"], r"model.reader_run.*is a run of job 't2i', not 'attributes'"),
        (["model.context_pairs=5"], r"model.context_pairs.*5 pairs per user asked but each user .* has only 4"),
    ]
    for extra, message in cases:
        run_dir = tmp_path / "run"
        with pytest.raises(ConfigError, match=message):
            prepare("ppd", [*given, *extra, f"run.dir={run_dir}"], preset="tiny")
        assert not run_dir.exists()
    with pytest.raises(ConfigError, match="model.context_pairs.*pairs.shots=3"):
        prepare("ppd", ["pairs.shots=3", f"run.dir={tmp_path / 'run'}"], preset="tiny")
    with pytest.raises(ConfigError, match="model.base_run' / 'model.reader_run"):
        prepare("ppd", [f"data.path={prereqs['train']}", f"run.dir={tmp_path / 'run'}"], preset="tiny")


# --- engines and resume (slow tier) -----------------------------------------------------------------

def _given(run_dir: Path) -> list[str]:
    prereqs = json.loads((run_dir / "prereqs" / "done.json").read_text())
    return [f"model.base_run={prereqs['base_run']}", f"model.reader_run={prereqs['reader_run']}",
            f"data.path={prereqs['train']}", f"data.eval_path={prereqs['heldout']}"]


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_zero3_partitions_the_reference(tiny_run, tmp_path):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "zero3"
    done = scaleyard("run", "ppd", "--preset", "tiny", *_given(tiny_run), "train.steps=2", "engine.name=deepspeed",
                     "engine.zero_stage=3", "--nproc", "2", f"run.dir={run_dir}", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    resident = next(v for t, v in _scalars(run_dir).items() if t.endswith("reference_resident_params"))
    single = tmp_path / "single"
    done = scaleyard("run", "ppd", "--preset", "tiny", *_given(tiny_run), "train.steps=1", "eval.users=0",
                     f"run.dir={single}")
    assert done.returncode == 0, done.stderr[-3000:]
    whole = next(v for t, v in _scalars(single).items() if t.endswith("reference_resident_params"))[0]
    assert max(resident) < 0.6 * whole  # each of 2 ranks holds about half of the reference
    assert (run_dir / "report.json").exists()  # evaluation ran with the partitioned modules


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["engine.name=ddp"], ["engine.name=deepspeed", "engine.zero_stage=2"]])
def test_two_ranks_on_each_engine(tiny_run, tmp_path, engine):
    if "deepspeed" in engine[0]:
        pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    done = scaleyard("run", "ppd", "--preset", "tiny", *_given(tiny_run), "train.steps=2", "eval.users=0", *engine,
                     "--nproc", "2", f"run.dir={run_dir}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and math.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tiny_run, tmp_path):
    import sys

    from test_resume import kill_while_writing

    args = ["run", "ppd", "--preset", "tiny", *_given(tiny_run), "train.steps=6", "train.ckpt_every=2",
            "eval.users=0"]
    reference = tmp_path / "reference"
    done = scaleyard(*args, f"run.dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "interrupted"
    kill_while_writing([sys.executable, "-m", "scaleyard.platform.cli", *args, f"run.dir={run_dir}"],
                       run_dir / "checkpoints", 4)
    assert not (run_dir / "summary.json").exists()
    resumed = scaleyard(*args, f"run.dir={run_dir}")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["weights_sha256"] == expected["weights_sha256"]
    assert summary["final_loss"] == expected["final_loss"]
