"""ppd: personalised Diffusion-DPO of a trained t2i model, conditioned on a user embedding read from
a few of the user's preference pairs (PPD, Dang et al. 2025).

Recipe: config -> data (`ppd_pairs` shards: a user's pair with prompt, and N other pairs of the same
user) -> model (the base t2i run's model with decoupled user attention in every block, zero-initialised,
plus a user encoder over the frozen attribute reader's features of the N pairs) -> loss (Diffusion-DPO
against the frozen base model, winner and loser sharing t and noise; the user embedding dropped at
random) -> evaluation (held-out users: win rate against the base model by the user's true reward, with
the embedding dropped and with another user's; interpolation between users; report.md/report.json).
With no base run, reader or pair shards given, the run builds them first in RUN/prereqs/
(jobs/ppd/prerequisites.py), so `scaleyard run ppd --preset tiny` is the whole path in one command.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.builders.ppd_users import hard
from scaleyard.data_loaders.index import DataError, load_index
from scaleyard.data_loaders.pipeline import ShardStream, stack
from scaleyard.jobs.attributes.job import load_reader
from scaleyard.jobs.ppd.data import PairDecoder, heldout_users, read_pairs_request
from scaleyard.jobs.ppd.evaluation import Evaluator, metrics_of, write_report
from scaleyard.jobs.ppd.losses import diffusion_dpo_loss
from scaleyard.jobs.ppd.model import PersonalizedT2I, PPDShape
from scaleyard.jobs.ppd.prerequisites import build_prerequisites
from scaleyard.jobs.ppd.sources import base_config, check_run, generate, load_base, pair_sources, save_grid, to_unit
from scaleyard.jobs.t2i.job import TextToImageJob, model_configs
from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import DiffusionTransformerConfig
from scaleyard.models.text_encoder import TextEncoderConfig
from scaleyard.models.user_conditioning import UserEncoderConfig
from scaleyard.platform.config import ConfigError, TrainingConfig, batch_per_rank, bounded, stream_config
from scaleyard.platform.job import Context, EvalResult, Job, JobParts, SampleRequest


@dataclass
class ModelConfig:
    base_run: str = ""  # a finished t2i run; "" = build one in RUN/prereqs/base (prereqs.*)
    reader_run: str = ""  # a finished attributes run; "" = build one in RUN/prereqs/reader
    context_pairs: int = bounded(4, 1)  # N: the user's pairs the encoder reads (the paper: 4)
    user_tokens: int = bounded(4, 1)
    encoder_hidden: int = bounded(128, 1)
    user_dropout: float = bounded(0.1, 0.0, 1.0)  # share of examples trained without the user embedding
    train_base: bool = False  # also train all the base model's weights (default: only the added weights)
    lora_rank: int = bounded(0, 0)  # > 0: also LoRA adapters (peft) of this rank on the base denoiser
    lora_alpha: float = bounded(16.0, 0.0)


@dataclass
class LossConfig:
    # Diffusion-DPO's beta on the diffusion scale: it multiplies the difference of per-element mean
    # squared errors, so it does not depend on the image size (see README, "Personalised diffusion")
    beta: float = bounded(5000.0, 1e-6)


@dataclass
class PairsConfig:
    """`ppd_pairs` builder options, used when data.path is empty (the pairs are built in RUN/prereqs/pairs)."""

    seed: int = 0
    users: int = bounded(300, 1)
    heldout_users: int = bounded(50, 1)
    pairs_per_user: int = bounded(6, 2)
    shots: int = bounded(4, 1)
    samples: int = bounded(4, 2)  # K base samples per user and prompt; the best and worst make the pair
    pool: int = bounded(64, 2)
    steps: int = bounded(20, 1)
    guidance: float = bounded(2.0, 1.0)


@dataclass
class PrereqConfig:
    """How a missing base run and reader are trained (the ordinary t2i / attributes presets)."""

    shapes_limit: int = bounded(20_000, 100)
    # 16 px with the CPU presets' 4 px patches is 16 tokens: a quarter of the attention and MLP cost
    # of 32 px, and colour, size, count and position still readable
    resolution: int = bounded(16, 8)
    partial_captions: float = bounded(0.5, 0.0, 1.0)  # each attribute left out of a caption with this probability
    base_preset: str = "default"
    base_overrides: list[str] = field(default_factory=list)
    reader_preset: str = "default"
    reader_overrides: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    users: int = bounded(50, 0)  # held-out users evaluated; 0 = no evaluation
    samples_per_user: int = bounded(4, 1)
    steps: int = bounded(20, 1)
    guidance: float = bounded(2.0, 1.0)
    interpolation_pairs: int = bounded(4, 0)


@dataclass
class Config(TrainingConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    prereqs: PrereqConfig = field(default_factory=PrereqConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def shape_of(base_cfg: DictConfig, cfg: DictConfig, feature_dim: int) -> PPDShape:
    denoiser, text = model_configs(base_cfg)
    encoder = UserEncoderConfig(feature_dim=feature_dim, width=denoiser.width, tokens=cfg.model.user_tokens,
                                hidden=cfg.model.encoder_hidden)
    return PPDShape(denoiser, text, encoder, str(base_cfg.model.process))


def shape_from_state(state: dict[str, Any]) -> PPDShape:
    # from_saved: a state written before an architecture key existed keeps the architecture it had
    return PPDShape(DiffusionTransformerConfig.from_saved(state["denoiser"]), TextEncoderConfig(**state["text"]),
                    UserEncoderConfig(**state["encoder"]), state["process"])


class PPD(Job):
    name = "ppd"
    Config = Config

    # --- before anything runs ----------------------------------------------------------------
    def check(self, cfg: DictConfig, world_size: int) -> None:
        m = cfg.model
        if m.base_run:
            check_run("model.base_run", m.base_run, "t2i")
            base_config(m.base_run)
        if m.reader_run:
            check_run("model.reader_run", m.reader_run, "attributes")
        if cfg.data.path and not (m.base_run and m.reader_run):
            raise ConfigError("config key 'model.base_run' / 'model.reader_run': the pairs in data.path were made "
                              "by a base run and scored by a reader; give both (or leave data.path empty to build "
                              "all three)")
        for key in ("path", "eval_path"):
            if cfg.data[key]:
                self._check_pairs(f"data.{key}", cfg.data[key], m.context_pairs)
        if not cfg.data.path and cfg.pairs.shots < m.context_pairs:
            raise ConfigError(f"config key 'model.context_pairs': {m.context_pairs} pairs per user asked but "
                              f"pairs.shots={cfg.pairs.shots} gives each user only {cfg.pairs.shots} context pairs")

    @staticmethod
    def _check_pairs(key: str, path: str, context_pairs: int) -> None:
        try:
            index = load_index(path)
        except DataError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
        if index.builder != "ppd_pairs":
            raise ConfigError(f"config key '{key}': {path} was built by {index.builder!r}, not ppd_pairs")
        held = int(index.extra.get("shots", 0))
        if held < context_pairs:
            raise ConfigError(f"config key 'model.context_pairs': {context_pairs} pairs per user asked but each user "
                              f"in {path} has only {held} context pairs; lower model.context_pairs or rebuild with "
                              "`--option shots=N`")

    # --- parts ---------------------------------------------------------------------------------
    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        self.found = build_prerequisites(cfg, ctx.run_dir, ctx.is_main)
        base, self.base_cfg = load_base(self.found["base_run"])
        self.reader = load_reader(self.found["reader_run"])
        feature_dim = self.reader.net.cfg.hidden
        self.model_shape = shape_of(self.base_cfg, cfg, feature_dim)
        self.reference = copy.deepcopy(base).eval().requires_grad_(False)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = PersonalizedT2I(self.model_shape, base.requires_grad_(True), cfg.model.train_base,
                                    cfg.model.lora_rank, cfg.model.lora_alpha)
        self.evaluator = None
        if cfg.eval.users:
            users = heldout_users(self.found["heldout"], cfg.model.context_pairs, cfg.eval.users)
            e = cfg.eval
            self.evaluator = Evaluator(users, e.samples_per_user, e.steps, e.guidance, cfg.run.seed,
                                       e.interpolation_pairs)
        index = load_index(self.found["train"])
        stream = ShardStream(index, stream_config(cfg), decode=PairDecoder(cfg.model.context_pairs), collate=stack,
                             batch_per_rank=batch_per_rank(cfg, ctx.data_world_size), rank=ctx.data_rank,
                             world_size=ctx.data_world_size, required=("preferred.png", "dispreferred.png",
                                                                       "context.png", "json"))
        # frozen parts: placed (and under ZeRO-3 partitioned) by the engine, never stepped
        return JobParts(model=model, frozen={"reference": self.reference, "reader": self.reader}, train_data=stream)

    # --- one step ------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, device = self.cfg, self.ctx.device
        win, lose = batch["preferred"].to(device), batch["dispreferred"].to(device)
        context = batch["context"].to(device)  # [B, N, 2, C, H, W]
        b = len(win)
        with torch.no_grad():
            features = self.reader.features(context.flatten(0, 2)).unflatten(0, context.shape[:3])
        t = flow.sample_timesteps(b, None, device)
        noise = torch.randn_like(win)
        keep = torch.rand(b, device=device) >= cfg.model.user_dropout
        images, captions = torch.cat([win, lose]), list(batch["prompt"]) * 2
        t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])  # winner and loser share t and noise
        errors = model(images, captions, t2, noise2, features, keep)
        with torch.no_grad():
            ref = self.reference(images, captions, t2, noise2, self.model_shape.process)
        loss, inside = diffusion_dpo_loss(errors[:b], errors[b:], ref[:b], ref[b:], cfg.loss.beta)
        inside = inside.detach()
        # elements of the reference this rank holds between uses: all when replicated, about
        # 1/world under ZeRO-3 (which partitions frozen modules too)
        resident = sum(p.numel() for p in self.reference.parameters())
        return loss, {"implicit_accuracy": (inside > 0).float().mean(), "inside": inside.mean(),
                      "policy_margin": (errors[b:] - errors[:b]).detach().mean(),
                      "reference_margin": (ref[b:] - ref[:b]).mean(), "reference_resident_params": float(resident)}

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        if self.evaluator is None:
            return EvalResult()
        result = self.evaluator.run(model, self.reference, self.reader, self.model_shape.process)
        if self.ctx.is_main:
            write_report(self.ctx.run_dir, step, result, self._setup())
        return EvalResult(metrics=metrics_of(result))

    def _setup(self) -> dict[str, Any]:
        cfg = self.cfg
        reader_accuracy = Path(self.found["reader_run"]) / "eval" / "accuracy.json"
        return {"base_run": self.found["base_run"], "reader_run": self.found["reader_run"],
                "train_pairs": self.found["train"], "heldout_pairs": self.found["heldout"],
                "heldout_users": len(self.evaluator.users), "samples_per_user": cfg.eval.samples_per_user,
                "context_pairs": cfg.model.context_pairs, "beta": cfg.loss.beta, "lr": cfg.optim.lr,
                "train_base": cfg.model.train_base, "lora_rank": cfg.model.lora_rank, "steps": cfg.train.steps,
                "batch_size": cfg.train.batch_size,
                "prerequisites_seconds": self.found.get("seconds"),
                "reader_accuracy": json.loads(reader_accuracy.read_text()) if reader_accuracy.exists() else None}

    # --- `scaleyard sample RUN --known REQUEST.json --out IMAGES.png` --------------------------------
    def write_samples(self, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
                      request: SampleRequest) -> dict[str, Any]:
        """Images for a new user: `--known` names {"prompt": "...", "pairs": [{"preferred": PNG,
        "dispreferred": PNG}, ...]} (at least model.context_pairs pairs); `--rows N` samples (default 8)
        from `--seed`, written to `--out` as a PNG grid: the base model's samples on top, the
        personalised ones below (same noise)."""
        user = read_pairs_request(request.known, cfg.model.context_pairs)
        shape = shape_from_state(job_state)
        reader_run = job_state.get("reader_run") or cfg.model.reader_run
        model = PersonalizedT2I(shape, lora_rank=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha)
        model.load_state_dict(weights)
        model.eval()
        reader = load_reader(reader_run)
        prompt = user["prompt"] or "circle shapes"
        rows = request.rows or 8
        noise = torch.randn(rows, shape.denoiser.channels, shape.denoiser.image_size, shape.denoiser.image_size,
                            generator=torch.Generator().manual_seed(request.seed))
        with torch.no_grad():
            tokens = model.user_encoder(reader.features(user["context"].flatten(0, 1)).unflatten(0, (-1, 2))[None])
            base = to_unit(generate(model.denoiser, model.encode, [prompt] * rows, noise, cfg.eval.steps,
                                    cfg.eval.guidance, shape.process))
            model.denoiser.set_user(tokens.expand(rows, -1, -1))
            personal = to_unit(generate(model.denoiser, model.encode, [prompt] * rows, noise, cfg.eval.steps,
                                        cfg.eval.guidance, shape.process))
            model.denoiser.set_user(None)
        request.out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat([base, personal]), request.out, rows)
        return {"prompt": prompt, "samples": rows, "attributes": [hard(a) for a in reader.read(personal)],
                "base_attributes": [hard(a) for a in reader.read(base)]}

    # --- what the platform asks about the model ------------------------------------------------
    @staticmethod
    def builder_networks(builder: str, base: str = "", reader: str = "", steps: int = 20, guidance: float = 2.0):
        """The base model and reader the `ppd_pairs` builder samples and scores with (handed to it by
        the platform: data_loaders/ cannot import jobs/)."""
        return pair_sources(base, reader, steps, guidance)

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        """A pair through the policy (forward + backward, twice) and the reference (forward, twice);
        the added attention and user encoder are small and left out. 0 until the base is known."""
        if not cfg.model.base_run or not (Path(cfg.model.base_run) / "config.yaml").exists():
            return 0.0
        per_image = TextToImageJob.flops_per_sample(base_config(cfg.model.base_run))
        return 2 * per_image + 2 * per_image / 3

    def state_dict(self) -> dict[str, Any]:
        # the architecture and the reader travel with the weights, so `scaleyard sample` needs no base run
        s = self.model_shape
        return {"denoiser": asdict(s.denoiser), "text": asdict(s.text), "encoder": asdict(s.encoder),
                "process": s.process, "reader_run": str(Path(self.found["reader_run"]).absolute()),
                "base_run": str(Path(self.found["base_run"]).absolute())}


JOB = PPD
