"""FSPO: loss masks, IPO/DPO losses, synthetic users and their data, the job through the real CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from scaleyard.data_loaders.builders import build
from scaleyard.data_loaders.builders.fspo import ASSISTANT_PREFIX, example, fspo_prompt
from scaleyard.data_loaders.builders.fspo_users import QUESTIONS, heldout_pattern, measure, reward
from scaleyard.jobs.fspo.losses import log_ratio_margin, preference_loss, sft_loss
from scaleyard.models.lm import LMSpec, encode_pairs, gpt2_tokenizer, sequence_logprobs, tiny_llama
from scaleyard.models.lm.logprobs import PromptTooLong, format_prompt
from scaleyard.platform.config import ConfigError
from scaleyard.platform.launch import prepare

from conftest import scaleyard

# a run small enough for tests: 1 shot, short context, a narrow tiny Llama
FAST = ["prompt.shots=1", "synthetic.users=8", "synthetic.heldout_users=4", "synthetic.pairs_per_user=3",
        "synthetic.examples_per_user=2", "model.hidden=32", "model.max_tokens=512", "train.batch_size=4",
        "eval.examples=2", "eval.max_new_tokens=8", "train.log_every=1", 'model.sft_stage=""']


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_masks_token_by_token(tokenizer):
    prompts = ["Hello there, how are you today?", "Hi"]
    completions = ["Fine.", "I am doing very well, thank you for asking!"]
    batch = encode_pairs(tokenizer, prompts, completions, max_tokens=64, assistant_prefix="\nA: ")
    P = batch.prompt_len
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        p = tokenizer(prompt + "\nA: ")["input_ids"]
        c = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        ids, att = batch.input_ids[row].tolist(), batch.attention_mask[row].tolist()
        # prompt left-padded to P, completion right-padded after it
        assert ids[P - len(p):P] == p and ids[P:P + len(c)] == c
        assert att == [0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (len(ids) - P - len(c))
        assert batch.targets[row, :len(c)].tolist() == c
        # the loss counts exactly the completion tokens and its end-of-sequence, never prompt or padding
        assert batch.loss_mask[row].tolist() == [1.0] * len(c) + [0.0] * (batch.targets.shape[1] - len(c))
        real = [pos for pos, a in zip(batch.position_ids[row].tolist(), att) if a]
        assert real == list(range(len(p) + len(c)))

    # padded, masked log-probs equal the log-probs of each row alone, summed by hand over its completion
    model = tiny_llama(LMSpec(hidden=32, layers=2, heads=4, kv_heads=2, mlp_hidden=64, max_tokens=64), tokenizer)
    model.eval()
    with torch.no_grad():
        padded = sequence_logprobs(model, batch)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            p = tokenizer(prompt + "\nA: ")["input_ids"]
            c = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
            logp = torch.log_softmax(logits, -1)
            by_hand = sum(float(logp[len(p) - 1 + k, token]) for k, token in enumerate(c))
            assert float(padded[row]) == pytest.approx(by_hand, abs=1e-4)


def test_chat_template_wraps_the_prompt_and_long_rows_are_refused(tokenizer):
    templated = gpt2_tokenizer()
    templated.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert format_prompt(templated, "Q?", "## Preferred Response\n") == "<|user|>Q?<|assistant|>## Preferred Response\n"
    assert format_prompt(tokenizer, "Q?", "X") == "Q?X"
    with pytest.raises(PromptTooLong, match="row 1: prompt of .* exceeds the context of 8 tokens"):
        encode_pairs(tokenizer, ["a", "a b c d e f g"], ["x", "y"], max_tokens=8)


def test_ipo_and_dpo_losses_by_hand():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -18.0]), torch.tensor([-11.5, -16.0])
    h = log_ratio_margin(pc, pr, rc, rr)
    assert h.tolist() == [1.5, -3.0]  # (-10 + 12) - (-11 + 11.5), (-20 + 15) - (-18 + 16)
    ipo = preference_loss("ipo", 0.01, h)  # (h - 1 / (2 beta))^2 with 1 / (2 beta) = 50
    assert ipo.tolist() == pytest.approx([(1.5 - 50) ** 2, (-3 - 50) ** 2])
    dpo = preference_loss("dpo", 0.1, h)  # -log sigmoid(beta h) = log(1 + exp(-beta h))
    assert dpo.tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.3))])
    assert float(sft_loss(torch.tensor([-6.0, -4.0]), torch.tensor([3.0, 2.0]))) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="loss.kind"):
        preference_loss("kto", 0.1, h)


def test_win_rate_counts_ties_half_and_its_interval_is_wilsons():
    from scipy.stats import binomtest

    from scaleyard.jobs.fspo.evaluation import wilson_interval, win_rate

    low, high = wilson_interval(0.8, 10)
    expected = binomtest(8, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-6)
    persona = {"length": 1.0, "bullets": 0.0, "formality": 0.0, "examples": 0.0, "summary": 0.0}
    items = [{"persona": persona}] * 3
    short, long = "Yes.", " ".join(["word"] * 80)
    rate = win_rate(items, [long, short, short], [short, short, long])  # win, tie, loss
    assert rate["win_rate"] == pytest.approx(0.5) and rate["n"] == 3


def test_synthetic_users_scorer_and_prompt_format():
    assert len(QUESTIONS) >= 50 and len({q[0] for q in QUESTIONS}) >= 20
    long_bullets = "Certainly.\n- one two three four five six.\n- seven eight nine ten eleven twelve.\n" \
                   "- a b c d e f g h i j k l m n o p q r s t u v w x y z.\nFor example, this.\nIn summary, done."
    short_casual = "Hey! it's easy, don't worry."
    m1, m2 = measure(long_bullets), measure(short_casual)
    assert m1["bullets"] == 0.5 and m1["examples"] == 1 and m1["summary"] == 1 and m1["formality"] == 1.0
    assert m2["bullets"] == 0 and m2["formality"] == 0.0 and m2["length"] == 0.0 and m2["examples"] == 0
    persona = {"length": -1.0, "bullets": 0.0, "formality": -1.0, "examples": 0.0, "summary": 0.0}
    assert reward(persona, short_casual) > reward(persona, long_bullets)
    # a non-answer or a loop loses to any real answer, even for a user who wants short answers
    looping = "Hey! it's easy.\nHey! it's easy.\nHey! it's easy."
    assert max(reward(persona, ""), reward(persona, looping)) < reward(persona, long_bullets)

    train = [example(0, "train", i, shots=4, pairs_per_user=6, examples_per_user=3) for i in range(60)]
    held = [example(0, "heldout", i, shots=4, pairs_per_user=6, examples_per_user=3) for i in range(30)]
    assert example(0, "train", 7, 4, 6, 3) == train[7]  # a pure function of (seed, split, index)
    assert {e["user"] for e in train}.isdisjoint({e["user"] for e in held})
    patterns = lambda exs: {tuple(int(math.copysign(1, w)) if w else 0 for w in e["persona"].values()) for e in exs}  # noqa: E731
    assert not any(heldout_pattern(p) for p in patterns(train)) and all(heldout_pattern(p) for p in patterns(held))
    for e in train + held:
        assert e["chosen_reward"] > e["rejected_reward"]
        assert reward(e["persona"], e["chosen"]) == pytest.approx(e["chosen_reward"])
        assert len(e["shots"]) == 4 and e["question"] not in {s["question"] for s in e["shots"]}
    prompt = fspo_prompt(train[0]["shots"], train[0]["question"])
    assert prompt.startswith("# Example 1\n## Question\n") and "## Dispreferred Response\n" in prompt
    assert prompt.count("# Example") == 4 and prompt.endswith(f"## Question\n{train[0]['question']}\n")
    assert ASSISTANT_PREFIX == "## Preferred Response\n"


def test_builder_is_deterministic_and_refuses_too_few_pairs(tmp_path):
    options = {"users": 6, "heldout_users": 3, "shots": 2, "pairs_per_user": 3, "examples_per_user": 2}
    first = build("fspo", tmp_path / "a", shard_size=5, **options)
    build("fspo", tmp_path / "b", shard_size=5, **options)
    assert first["train"].total == 12 and first["heldout"].total == 6
    for split in ("train", "heldout"):
        for shard in first[split].shards:
            a, b = (tmp_path / name / split / shard.name for name in ("a", "b"))
            assert a.read_bytes() == b.read_bytes()
    assert first["train"].extra["shots"] == 2
    from scaleyard.data_loaders.pipeline import first_samples

    written = next(first_samples(first["heldout"], lambda raw, pos: {"ex": json.loads(raw["json"])}, 6, 6))["ex"]
    expected = [example(0, "heldout", i, shots=2, pairs_per_user=3, examples_per_user=2) for i in range(6)]
    assert sorted(map(json.dumps, written)) == sorted(map(json.dumps, expected))  # read in shuffled shard order
    from scaleyard.data_loaders.index import DataError

    with pytest.raises(DataError, match="fewer shots than asked"):
        build("fspo", tmp_path / "c", users=2, shots=4, pairs_per_user=4)


def _weights(run_dir: Path):
    from scaleyard.platform.weights import load_run_weights

    return load_run_weights(run_dir, ema=False)


def test_ipo_run_through_the_cli_raises_the_chosen_log_prob(tmp_path, tokenizer):
    # from shards written by the fspo builder (the other tests use the same examples generated on the fly)
    data = tmp_path / "data"
    build("fspo", data, shard_size=8, users=8, heldout_users=4, shots=1, pairs_per_user=3, examples_per_user=2)
    run_dir = tmp_path / "ipo"
    done = scaleyard("run", "fspo", "--preset", "tiny", *FAST, "train.steps=6", "optim.lr=3e-3",
                     "eval.temperature=1.0", f"data.path={data}/train", f"data.eval_path={data}/heldout",
                     "data.lanes=2", f"run.dir={run_dir}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # the policy's log-probs on training examples, before (the seeded initial model) and after
    from omegaconf import OmegaConf

    from scaleyard.jobs.fspo.data import SyntheticExamples
    from scaleyard.jobs.fspo.job import build_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    items = [SyntheticExamples(cfg)[i] for i in range(8)]  # the same examples as the shards hold
    batch = encode_pairs(tokenizer, [i["prompt"] for i in items] * 2, [i["chosen"] for i in items]
                         + [i["rejected"] for i in items], 512, ASSISTANT_PREFIX)
    model = build_model(cfg, tokenizer).eval()
    with torch.no_grad():
        before = sequence_logprobs(model, batch)
        model.load_state_dict(_weights(run_dir).weights)
        after = sequence_logprobs(model, batch)
    n = len(items)
    assert after[:n].mean() > before[:n].mean() + 1.0  # chosen responses became more likely
    margin = (after[:n] - after[n:]) - (before[:n] - before[n:])  # h against the reference (= initial model)
    assert margin.mean() > 0
    report = (run_dir / "eval" / "report.md").read_text()
    for row in ("| the user's own (greedy) |", "| a different user's (greedy) |", "| the user's own (sampled, T=1) |"):
        assert row in report
    record = json.loads((run_dir / "eval" / "step_6.json").read_text())
    assert 0 <= record["own_shots"]["ci_low"] <= record["own_shots"]["win_rate"] <= record["own_shots"]["ci_high"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("reward_margin", "accuracy", "chosen_logp", "rejected_logp"):
        assert any(t.endswith(name) for t in tags), (name, sorted(tags))
    assert any("win_rate" in t for t in tags)

    # a personalised answer from the trained run: `scaleyard sample RUN --shots FILE --question TEXT`
    held = example(0, "heldout", 0, shots=1, pairs_per_user=3, examples_per_user=2)
    (tmp_path / "shots.json").write_text(json.dumps(held["shots"]))
    sampled = scaleyard("sample", str(run_dir), "--shots", str(tmp_path / "shots.json"), "--question",
                        held["question"], "--rows", "2", "--out", str(tmp_path / "answers.json"))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert answers[0]["question"] == held["question"] and len(answers[0]["answers"]) == 2


@pytest.mark.parametrize("override, message", [
    ("model.name_or_path=/nonexistent/model", "model.name_or_path.*/nonexistent/model.*does not exist"),
    ("model.max_tokens=64", "model.max_tokens.*exceeds the context of 64 tokens"),
    ("prompt.shots=3", "fewer shots than asked"),
    ("model.init_from=/nonexistent/run", "model.init_from"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, override, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        prepare("fspo", [*FAST, override, f"run.dir={run_dir}"], preset="tiny")
    assert not run_dir.exists()


def test_shards_with_fewer_shots_than_asked_are_refused(tmp_path):
    build("fspo", tmp_path / "data", users=2, heldout_users=2, shots=1, pairs_per_user=2, examples_per_user=1)
    with pytest.raises(ConfigError, match=r"prompt.shots.*2 shots asked but the examples in .* hold 1"):
        prepare("fspo", ["prompt.shots=2", f"data.path={tmp_path}/data/train", f"run.dir={tmp_path}/run"],
                preset="tiny")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smollm2_gguf_conversion_is_cached_and_reloads(tmp_path):
    pytest.importorskip("gguf")
    from scaleyard.models.lm.load import smollm2_folder

    folder = smollm2_folder(tmp_path)
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert smollm2_folder(tmp_path) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert AutoTokenizer.from_pretrained(folder).chat_template


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_zero3_partitions_the_reference(tmp_path):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "zero3"
    done = scaleyard("run", "fspo", "--preset", "tiny", *FAST, "train.steps=3", "engine.name=deepspeed",
                     "engine.zero_stage=3", "--nproc", "2", f"run.dir={run_dir}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    scalars = _scalars(run_dir)
    resident = next(v for t, v in scalars.items() if t.endswith("reference_resident_params"))
    total = _summary(run_dir)["params"]  # trainable parameters = the reference's size
    assert max(resident) < 0.6 * total  # each of 2 ranks holds about half of the reference
    assert (run_dir / "eval" / "report.md").exists()  # evaluation ran with the partitioned model gathered
    single = tmp_path / "single"
    done = scaleyard("run", "fspo", "--preset", "tiny", *FAST, "train.steps=1", f"run.dir={single}")
    assert done.returncode == 0, done.stderr[-3000:]
    replicated = next(v for t, v in _scalars(single).items() if t.endswith("reference_resident_params"))
    assert replicated[0] == total


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tmp_path):
    import sys

    from test_resume import kill_while_writing

    args = ["run", "fspo", "--preset", "tiny", *FAST, "train.steps=6", "train.ckpt_every=2", "eval.examples=0"]
    reference = tmp_path / "reference"
    done = scaleyard(*args, f"run.dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "interrupted"
    kill_while_writing([sys.executable, "-m", "scaleyard.platform.cli", *args, f"run.dir={run_dir}"],
                       run_dir / "checkpoints", 4)
    assert not (run_dir / "summary.json").exists()
    resumed = scaleyard(*args, f"run.dir={run_dir}")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr[-3000:]
    assert _summary(run_dir)["weights_sha256"] == _summary(reference)["weights_sha256"]
    assert _summary(run_dir)["final_loss"] == _summary(reference)["final_loss"]


def test_one_command_trains_the_sft_stage_then_ipo_from_its_weights(tmp_path):
    """`--preset tiny` names its SFT stage (model.sft_stage=tiny_sft): with model.init_from empty the
    platform trains it into <run.dir>/stages/sft first, then IPO starts from its weights."""
    ipo = tmp_path / "ipo"
    args = ["run", "fspo", "--preset", "tiny", *FAST[:-1], "train.steps=2", "stages.sft.train.steps=4",
            "stages.sft.train.log_every=1", "stages.sft.eval.examples=0", f"run.dir={ipo}"]
    done = scaleyard(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    sft = ipo / "stages" / "sft"
    from omegaconf import OmegaConf

    from scaleyard.jobs.fspo.job import build_model

    config = OmegaConf.load(ipo / "config.yaml")
    assert config.model.init_from == str(sft) and OmegaConf.load(sft / "config.yaml").loss.kind == "sft"
    assert json.loads((sft / "summary.json").read_text())["step"] == 4
    # the IPO run starts from the SFT run's weights (policy and reference alike: at step 1 they are
    # equal, h = 0 and the loss is (1 / (2 beta))^2)
    start = build_model(config, gpt2_tokenizer()).state_dict()
    trained = _weights(sft).weights
    assert all(torch.equal(start[k], trained[k]) for k in trained)
    assert _scalars(ipo)["train/loss"][0] == pytest.approx(2500.0)
    # `scaleyard status RUN` lists the run and its stage
    rows = json.loads(scaleyard("status", str(ipo), "--json").stdout)
    assert [(r["run"], r["state"]) for r in rows] == [(str(ipo), "COMPLETED"), (str(sft), "COMPLETED")], rows
    # the same command again: both finished, nothing retrained
    again = scaleyard(*args)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr[-2000:]
    # a stage override for a stage the run does not have is refused, naming the stages it has
    bad = scaleyard("run", "fspo", "--preset", "tiny", *FAST[:-1], "stages.rm.train.steps=1",
                    f"run.dir={tmp_path / 'x'}")
    assert bad.returncode != 0 and "stages.rm.train.steps=1" in bad.stderr and "sft" in bad.stderr
    assert not (tmp_path / "x").exists()
    assert _scalars(sft)["train/loss"][-1] < _scalars(sft)["train/loss"][0]


def test_memory_shape_and_flops_of_a_3b_llama_from_its_config_alone(tmp_path):
    from omegaconf import OmegaConf

    from scaleyard.jobs.fspo.job import FSPO, Config

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 128}))  # Llama-3.2-3B's shape, no weights
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": {"name_or_path": str(tmp_path), "max_tokens": 2048}})
    shape = FSPO.memory_shape(cfg)
    assert 3.1e9 < shape.trainable < 3.3e9 and shape.frozen == shape.trainable  # the reference is a full copy
    assert FSPO.flops_per_sample(cfg) == pytest.approx(2 * 8 * shape.trainable * 2048)
    cfg.loss.kind = "sft"
    assert FSPO.memory_shape(cfg).frozen == 0


def test_lora_trains_only_adapters_and_starts_equal_to_the_base(tokenizer):
    pytest.importorskip("peft")
    from scaleyard.models.lm.lora import add_lora, decoder_layers, merge_lora

    spec = LMSpec(hidden=32, layers=2, heads=4, kv_heads=2, mlp_hidden=64, max_tokens=64)
    base = tiny_llama(spec, tokenizer)
    ids = torch.tensor([tokenizer("the adapters start at zero")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    adapted = add_lora(tiny_llama(spec, tokenizer), rank=4, alpha=8.0)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(decoder_layers(adapted)) == 2
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, before)
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
        changed = adapted(input_ids=ids).logits
        assert not torch.allclose(changed, before)
        assert torch.allclose(merge_lora(adapted)(input_ids=ids).logits, changed, atol=1e-5)


@pytest.mark.slow
def test_lora_run_through_the_cli(tmp_path):
    pytest.importorskip("peft")
    run_dir = tmp_path / "lora"
    done = scaleyard("run", "fspo", "--preset", "tiny", *FAST, "train.steps=3", "model.lora_rank=4",
                     f"run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    weights = _weights(run_dir).weights
    assert any("lora_B" in k for k in weights) and any(float(v.abs().sum()) > 0 for k, v in weights.items()
                                                        if "lora_B" in k)
    # an IPO run can start from it: its adapters are merged into a plain model
    done = scaleyard("run", "fspo", "--preset", "tiny", *FAST, "train.steps=1", f"model.init_from={run_dir}",
                     "eval.examples=0", f"run.dir={tmp_path / 'next'}")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["engine.name=ddp"], ["engine.name=deepspeed", "engine.zero_stage=2"],
                                    ["engine.name=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=true"]])
def test_two_ranks_on_each_engine(tmp_path, engine):
    if "deepspeed" in engine[0]:
        pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    done = scaleyard("run", "fspo", "--preset", "tiny", *FAST, "train.steps=2", "eval.examples=0", *engine,
                     "--nproc", "2", f"run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _summary(run_dir)["world_size"] == 2 and math.isfinite(_summary(run_dir)["final_loss"])


def test_sample_requests_are_checked_before_a_model_loads(tmp_path):
    from scaleyard.jobs.fspo.job import read_requests

    shot = {"question": "Q?", "chosen": "A.", "rejected": "B."}
    (tmp_path / "shots.json").write_text(json.dumps([shot, shot]))
    assert read_requests(str(tmp_path / "shots.json"), 2, question="Why?") == [{"shots": [shot, shot],
                                                                               "question": "Why?"}]
    with pytest.raises(ConfigError, match="has 2 shots; this run was trained with prompt.shots=4"):
        read_requests(str(tmp_path / "shots.json"), 4, question="Why?")
    (tmp_path / "bad.json").write_text(json.dumps({"shots": [{"question": "Q?"}], "question": "Why?"}))
    with pytest.raises(ConfigError, match="request 0 needs"):
        read_requests(str(tmp_path / "bad.json"), 1)
    with pytest.raises(ConfigError, match="--known FILE"):
        read_requests("", 1)
    with pytest.raises(ConfigError, match="--shots FILE needs --question"):
        read_requests(str(tmp_path / "shots.json"), 2, shots_only=True)
    with pytest.raises(ConfigError, match="--question needs --shots FILE"):
        read_requests("", 2, question="Why?")


@pytest.mark.slow
def test_stages_on_two_ranks_under_zero3_stop_and_resume(tmp_path):
    """The SFT stage and IPO on 2 gloo ranks under ZeRO-3 in one command; the SFT stage is stopped by
    SIGKILL part-way and the same command resumes it, then runs IPO."""
    from test_resume import kill_while_writing

    ipo = tmp_path / "ipo"
    args = ["run", "fspo", "--preset", "tiny", "--nproc", "2", *FAST[:-1], "train.steps=2",
            "engine.name=deepspeed", "engine.zero_stage=3", "stages.sft.train.steps=6",
            "stages.sft.train.ckpt_every=2", "stages.sft.eval.examples=0", f"run.dir={ipo}"]
    sft = ipo / "stages" / "sft"
    kill_while_writing([sys.executable, "-m", "scaleyard.platform.cli", *args], sft / "checkpoints", 4)
    assert (sft / "checkpoints" / "step_00000002").is_dir() and not (ipo / "summary.json").exists()
    done = scaleyard(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert json.loads((sft / "summary.json").read_text())["step"] == 6
    assert json.loads((ipo / "summary.json").read_text())["step"] == 2
    from omegaconf import OmegaConf

    assert OmegaConf.load(sft / "config.yaml").engine.zero_stage == 3
