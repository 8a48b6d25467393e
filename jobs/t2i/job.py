"""t2i: text-to-image diffusion transformers (DiT-adaLN, DiT-cross, U-ViT) on captioned shards.

Recipe: config -> data (Fashion-MNIST or shapes shards: image + caption) -> model (a preset from
models/presets.py, plus a small trainable text encoder) -> loss (flow matching or v-prediction,
captions dropped for classifier-free guidance) -> evaluation (validation loss at fixed times,
sample grid, Frechet distance and caption accuracy in the `classify` network's feature space).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.decoders import TEXT_EMBEDDING_FIELD, Compose
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import ShardStream, first_samples, stack
from scaleyard.jobs.t2i.latents import SplitGeometry, autoencoder_folder, cached_text, decoders, split_geometry
from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import (
    SAVED_BEFORE,
    TP_PLAN,
    DiffusionTransformerConfig,
    build_model,
    count_parameters,
    flops_per_sample,
)  # fmt: skip
from scaleyard.models.meta import shapes_only
from scaleyard.models.presets import preset
from scaleyard.models.text_encoder import (
    FrozenMiniLM,
    TextEncoder,
    TextEncoderConfig,
    text_encoder_flops,
    tokenize,
)  # fmt: skip
from scaleyard.platform.config import (
    ConfigError,
    DataConfig,
    TrainingConfig,
    batch_per_rank,
    bounded,
    choice,
    stream_config,
)
from scaleyard.platform.job import Context, EvalResult, Job, JobParts
from scaleyard.platform.planner import BlockStack, ModelShape

TEXT_ENCODERS = ("hashed", "minilm")
MINILM_FLOPS_PER_TOKEN = 2 * 22_713_216  # forward only, frozen


@dataclass
class ModelConfig:
    preset: str = "uvit-cpu-s"
    text_encoder: str = choice("hashed", TEXT_ENCODERS)  # trainable hashed-word encoder, or frozen MiniLM
    image_size: int = bounded(0, 0)  # 0: the preset's; set for other data (e.g. 32 for shapes)
    channels: int = bounded(0, 0)  # 0: the preset's (1 for Fashion-MNIST, 3 for shapes, 4 for latents)
    # 0: the preset's; smaller values run a paper preset's geometry (tokens, text) at CPU size
    width: int = bounded(0, 0)
    depth: int = bounded(0, 0)
    heads: int = bounded(0, 0)
    autoencoder: str = ""  # latent splits: the VAE folder decoding samples ("": the one their index names)
    text_depth: int = bounded(2, 1)
    text_heads: int = bounded(4, 1)
    process: str = choice("flow", flow.PROCESSES)
    caption_dropout: float = bounded(0.1, 0.0, 1.0)
    # architecture switches; the defaults are the reference code's (models/diffusion/transformer.py)
    qk_norm: bool = False  # LayerNorm of queries and keys in every attention of the denoiser
    cross_norm: bool = False  # dit_cross: a LayerNorm before each cross-attention (PixArt has none)
    conv_out: bool = True  # uvit: the 3x3 conv after unpatchify (on in the reference)
    qkv_bias: bool = False  # uvit: a bias on the q/k/v projection (none in the reference; DiT always has one)
    time_mlp: bool = False  # uvit: time token through DiT's MLP (the reference uses the raw sinusoid)


@dataclass
class EvalConfig:
    samples: int = bounded(256, 0)  # generated images for the metrics (0: validation loss only)
    val_samples: int = bounded(512, 1)
    steps: int = bounded(20, 1)
    sampler: str = choice("euler", flow.SAMPLERS)
    guidance: float = bounded(2.0, 1.0)
    classifier: str = ""  # a finished `classify` run folder: enables Frechet distance and caption accuracy


@dataclass
class Config(TrainingConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/fashion_mnist/train",
                                                                 eval_path="data/fashion_mnist/test"))
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def model_configs(cfg: DictConfig) -> tuple[DiffusionTransformerConfig, TextEncoderConfig]:
    try:
        denoiser = preset(cfg.model.preset)
    except ValueError as err:
        raise ConfigError(f"config key 'model.preset': {err}") from None
    changes: dict = {key: bool(cfg.model[key]) for key in SAVED_BEFORE}  # the architecture switches
    if cfg.model.text_encoder == "minilm":
        changes["text_dim"] = FrozenMiniLM.width
    if cfg.model.image_size:
        changes["image_size"] = cfg.model.image_size
    for key in ("channels", "width", "depth", "heads"):
        if cfg.model[key]:
            changes[key] = cfg.model[key]
    try:
        denoiser = dataclasses.replace(denoiser, **changes)
    except ValueError as err:
        raise ConfigError(f"config keys 'model.image_size|channels|width|depth|heads' / 'model.preset': {err}"
                          ) from None
    text = TextEncoderConfig(width=denoiser.text_dim, depth=cfg.model.text_depth, heads=cfg.model.text_heads,
                             max_len=denoiser.text_len)
    return denoiser, text


class TextToImage(nn.Module):
    """Text encoder + denoiser behind one forward, so DDP/ZeRO see every trainable call. A frozen
    encoder is held outside the module tree: the engine places it (JobParts.frozen) and
    checkpoints leave out weights that come from a package."""

    def __init__(self, denoiser_cfg: DiffusionTransformerConfig, text_cfg: TextEncoderConfig,
                 frozen_text: nn.Module | None = None):
        super().__init__()
        self.text_cfg = text_cfg
        self.text = TextEncoder(text_cfg) if frozen_text is None else None
        object.__setattr__(self, "frozen_text", frozen_text)  # not a submodule: not trained, not saved
        self.denoiser = build_model(denoiser_cfg)

    def encode(self, captions: list[str], device: torch.device,
               cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens and mask; `cached`: the frozen encoder's output stored in the shards, with
        empty (dropped) captions encoded here."""
        if cached is not None and self.frozen_text is not None:
            tokens, mask = cached[0].to(device), cached[1].to(device)
            empty = [i for i, caption in enumerate(captions) if not caption]
            if empty:
                null_tokens, null_mask = self.frozen_text([""], device)
                tokens, mask = tokens.clone(), mask.clone()
                tokens[empty], mask[empty] = null_tokens.to(tokens.dtype), null_mask
            return tokens, mask
        if self.frozen_text is not None:
            return self.frozen_text(captions, device)
        ids, mask = tokenize(captions, self.text_cfg)
        ids, mask = ids.to(device), mask.to(device)
        return self.text(ids, mask), mask

    def forward(self, images: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor,
                process: str, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        tokens, mask = self.encode(captions, images.device, cached)
        return flow.training_loss(self.denoiser, images, tokens, mask, t, noise, process)


class TextToImageJob(Job):
    name = "t2i"
    Config = Config
    sample_job = "image_sample"  # `scaleyard sample RUN`: jobs/image_sample/
    # runs saved before these keys existed trained the old architecture (models/diffusion/transformer.py,
    # SAVED_BEFORE): they resume, sample and fine-tune as that, not as today's defaults
    saved_before = {f"model.{key}": value for key, value in SAVED_BEFORE.items()}

    def check(self, cfg: DictConfig, world_size: int) -> None:
        model_configs(cfg)
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to a split folder with index.json "
                              "(`scaleyard data build fashion_mnist --out data/fashion_mnist`)")

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        self.denoiser_cfg, self.text_cfg = model_configs(cfg)
        index = load_index(cfg.data.path)
        self.geometry = split_geometry(index, cfg, self.denoiser_cfg.text_len)
        self.field = self.geometry.field
        shape = self.geometry.shape
        if [self.denoiser_cfg.channels, self.denoiser_cfg.image_size] != [shape[0], shape[1]]:
            what = "latents" if self.geometry.latent else "px images"
            raise ConfigError(
                f"config key 'model.preset': {cfg.model.preset} expects {self.denoiser_cfg.channels}x"
                f"{self.denoiser_cfg.image_size} inputs, {cfg.data.path} holds {shape[0]}x{shape[1]} {what}: "
                f"set model.channels={shape[0]} model.image_size={shape[1]}"
            )
        self._autoencoder = None
        if self.geometry.latent:
            autoencoder_folder(cfg, index)  # a split that names no VAE fails before step 1
        decode = Compose(decoders(self.geometry, index))
        required = (self.field, "txt", *((TEXT_EMBEDDING_FIELD,) if self.geometry.cached_text else ()))
        stream = ShardStream(index, stream_config(cfg), decode=decode, collate=stack,
                             batch_per_rank=batch_per_rank(cfg, ctx.data_world_size),
                             rank=ctx.data_rank, world_size=ctx.data_world_size, required=required)
        frozen = {}
        if cfg.model.text_encoder == "minilm":
            frozen["text_encoder"] = FrozenMiniLM(self.denoiser_cfg.text_len)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = TextToImage(self.denoiser_cfg, self.text_cfg, frozen.get("text_encoder"))
        self._classifier = None
        return JobParts(model=model, frozen=frozen, train_data=stream)

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.ctx.device
        images = batch["image"].to(device)
        drop = torch.rand(len(images)) < self.cfg.model.caption_dropout
        captions = ["" if dropped else caption for caption, dropped in zip(batch["caption"], drop.tolist())]
        t = flow.sample_timesteps(len(images), None, device)
        noise = torch.randn_like(images)
        loss = model(images, captions, t, noise, self.cfg.model.process, cached_text(batch)).mean()
        return loss, {}

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        from scaleyard.jobs.t2i.evaluation import evaluate

        return evaluate(self, model, step)

    @staticmethod
    def first_layer(cfg: DictConfig) -> str:
        """The denoiser's patch embedding (a strided conv over the noisy image): optim.tract=true
        trains it with TrAct."""
        return "denoiser.patch_embed.proj"

    @staticmethod
    def tp_plan(cfg: DictConfig) -> dict:
        """The denoiser's plan (models/diffusion/transformer.py); it splits the trainable text
        encoder's blocks too, so both head counts must divide engine.tp_size."""
        denoiser, text = model_configs(cfg)
        heads = {"attention heads of model.preset": denoiser.heads}
        if cfg.model.text_encoder == "hashed":  # MiniLM is frozen and outside the model: never split
            heads["attention heads of model.text_heads"] = text.heads
        return {**TP_PLAN, "divisible": heads}

    @staticmethod
    def model_size(cfg: DictConfig) -> int:
        """The denoiser's parameters: the text encoder is the same small network at every size."""
        return count_parameters(model_configs(cfg)[0])

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        denoiser, text = model_configs(cfg)
        if cfg.model.text_encoder == "minilm":
            return flops_per_sample(denoiser) + MINILM_FLOPS_PER_TOKEN * denoiser.text_len
        return flops_per_sample(denoiser) + text_encoder_flops(text)

    @staticmethod
    def memory_shape(cfg: DictConfig) -> ModelShape:
        """For the planner: the denoiser's blocks (what tensor parallelism shards) and the trainable
        text encoder's; a frozen MiniLM runs without gradients and stores no activations."""
        from scaleyard.models.diffusion.transformer import DiTBlock, UViTBlock

        d, text = model_configs(cfg)
        minilm = cfg.model.text_encoder == "minilm"
        with shapes_only():  # counts without allocating; the frozen encoder is only a placeholder
            model = TextToImage(d, text, nn.Identity() if minilm else None)
        blocks = sum(p.numel() for m in model.modules() if isinstance(m, DiTBlock | UViTBlock) for p in m.parameters())
        uvit = d.arch == "uvit"
        tokens = d.image_tokens + (1 + d.text_len if uvit else 0)
        stacks = [BlockStack("denoiser", d.depth, d.width, d.heads, tokens, blocks, d.mlp_ratio, adaln=not uvit,
                             context_tokens=d.text_len if d.arch == "dit_cross" else 0, qk_norm=d.qk_norm,
                             cross_norm=d.cross_norm,
                             skip_layers=d.depth // 2 if uvit else 0)]
        if model.text is not None:
            stacks.append(BlockStack("text encoder", text.depth, text.width, text.heads, text.max_len,
                                     sum(p.numel() for p in model.text.blocks.parameters()), tensor_parallel=False))
        pixels = d.channels * d.image_size**2
        # images, noise, noisy input, target, prediction and loss terms; token embeddings in, head out
        other = 6 * pixels + 4 * tokens * d.width
        trainable = sum(p.numel() for p in model.parameters())
        frozen = MINILM_FLOPS_PER_TOKEN // 2 if minilm else 0  # MiniLM's parameters (2 FLOPs each per token)
        return ModelShape(trainable + frozen, trainable, frozen, tuple(stacks), other)

    @classmethod
    def model_presets(cls) -> list[dict]:
        """`scaleyard models`: the denoiser presets of models/presets.py (the CPU ladder and the
        0.3B-8B paper ladder), with the denoiser's exact parameters (what scaling laws count; the
        text encoder is the same at every size) and training FLOPs per sample."""
        from scaleyard.models.presets import presets

        return [{"name": name, "use": f"model.preset={name}", "params": count_parameters(d),
                 "flops_per_sample": flops_per_sample(d), "width": d.width, "depth": d.depth, "heads": d.heads,
                 "tokens": d.image_tokens} for name, d in presets().items()]


def eval_stream(cfg: DictConfig, geometry: SplitGeometry, count: int, batch: int):
    """The first `count` samples of the eval split in a fixed order (image or latent, caption, label)."""
    index = load_index(cfg.data.eval_path)
    return first_samples(index, Compose(decoders(geometry, index, labels=True)), count, batch)


JOB = TextToImageJob
