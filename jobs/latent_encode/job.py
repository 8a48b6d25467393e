"""latent_encode: the caching pass. Image shards -> shards of autoencoder latents (and cached
text-encoder embeddings), so a latent diffusion run never decodes a JPEG or runs the VAE or the
text encoder while it trains.

Recipe: config -> source split (scaleyard shards or shards indexed where they lie with `data
index`) -> autoencoder (a local diffusers AutoencoderKL folder: an SD/SDXL/FLUX VAE, or one
exported by the `autoencoder` job) and optionally MiniLM -> one output shard per source shard:
`latent.npy` (fp16, or fp32; not bf16, which .npy cannot hold, and normalised latents are about
unit scale, well inside fp16's range), the caption, labels and json copied, and `text_emb.npy`
(the embeddings of the caption's real tokens only) -> `index.json` with the latent shape and the
autoencoder that made them.

Ranks take source shards round-robin (shard s on rank s % world). A shard is written to a
`.partial` file, renamed when complete, then recorded in `.encoded/`; a killed or preempted pass
run again skips every recorded shard and redoes at most the ones in flight, so no sample is
ever written twice. `scaleyard data encode SOURCE --autoencoder PATH --out DIR [--nproc N]`
launches it (`scaleyard submit latent_encode ...` on SLURM: the tasks split the shards).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig

from scaleyard.data_loaders.decoders import LATENT_FIELD, TEXT_EMBEDDING_FIELD, ImageDecoder, image_member
from scaleyard.data_loaders.index import INDEX_FILE, DataError, ShardIndex, ShardInfo, load_index, sha256_file
from scaleyard.data_loaders.pipeline import shard_samples
from scaleyard.data_loaders.writer import SEEK_EVERY, sample_offsets
from scaleyard.models.autoencoder import AutoencoderError, check_folder, diffusers_missing, load_autoencoder
from scaleyard.platform.config import ConfigError, EngineConfig, RunConfig, bounded, choice
from scaleyard.platform.distributed import barrier
from scaleyard.platform.job import Context, Job

DTYPES = {"float16": np.float16, "float32": np.float32}
PASSED_THROUGH = ("txt", "cls", "json")  # copied byte for byte from the source sample
DONE_DIR = ".encoded"
SKIPPED_EXTRA = ("view", "corrupt", "incomplete", "truncated_shards", "image_stats")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # run.dir: the output split folder
    engine: EngineConfig = field(default_factory=EngineConfig)
    source: str = ""  # a split folder with index.json (image shards)
    shard_base: str = ""  # "{name}" template when the source shards lie elsewhere (pipe:, s3://)
    autoencoder: str = ""  # a local diffusers AutoencoderKL folder
    text_encoder: str = choice("", ("", "minilm"))  # "": captions only; minilm: cache its token embeddings
    text_len: int = bounded(64, 1)  # tokens cached per caption (the paper presets' text_len)
    dtype: str = choice("float16", tuple(DTYPES))
    batch_size: int = bounded(64, 1)


def image_field(index: ShardIndex) -> str:
    field_name = image_member(index.schema)
    if not field_name:
        raise DataError(f"{index.root} holds no images (schema: {', '.join(index.schema)}); give an image split")
    return field_name


def check_sources(cfg: DictConfig) -> tuple[ShardIndex, Any]:
    """The source index and the autoencoder's spec, or a ConfigError naming the key."""
    if not cfg.source:
        raise ConfigError("config key 'source': give the image split to encode (a folder with index.json)")
    try:
        index = load_index(cfg.source)
        image_field(index)
    except DataError as err:
        raise ConfigError(f"config key 'source': {err}") from None
    if not cfg.autoencoder:
        raise ConfigError("config key 'autoencoder': give a local diffusers AutoencoderKL folder")
    if diffusers_missing():
        raise ConfigError(f"config key 'autoencoder': {diffusers_missing()}")
    try:
        spec = check_folder(cfg.autoencoder)
        side = int(index.extra.get("image_shape", [0, 0])[-1])
        if side:
            spec.latent_shape(side)
    except (AutoencoderError, ValueError) as err:
        raise ConfigError(f"config key 'autoencoder': {err}") from None
    if Path(cfg.run.dir).resolve() == Path(cfg.source).resolve():
        raise ConfigError("config key 'run.dir': the output folder is the source split; give another --out")
    return index, spec


@dataclass(frozen=True)
class EncodeInput:
    """Decoder: the image in [-1, 1] plus the members copied unchanged."""

    field: str
    channels: int  # the autoencoder's input channels

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        image = ImageDecoder(field=self.field, symmetric=True)(raw, position)["image"]
        if image.shape[0] == 1 and self.channels == 3:  # grey images through an RGB autoencoder
            image = image.expand(3, -1, -1)
        return {"image": image, "key": raw["__key__"], "kept": {k: raw[k] for k in PASSED_THROUGH if k in raw}}


class LatentEncodeJob(Job):
    name = "latent_encode"
    Config = Config
    trains = False

    def check(self, cfg: DictConfig, world_size: int) -> None:
        check_sources(cfg)

    def sample(self, cfg: DictConfig, ctx: Context) -> dict[str, float]:
        started = time.perf_counter()
        index, _ = check_sources(cfg)
        out = ctx.run_dir
        (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
        autoencoder = load_autoencoder(cfg.autoencoder, ctx.device)
        text = None
        if cfg.text_encoder == "minilm":
            from scaleyard.models.text_encoder import FrozenMiniLM

            text = FrozenMiniLM(cfg.text_len).to(ctx.device)
        mine = [s for s in range(len(index.shards)) if s % ctx.world_size == ctx.rank]
        todo = [s for s in mine if not _finished(out, index, s)]
        samples = 0
        for number in todo:
            samples += self._encode_shard(cfg, index, number, autoencoder, text, ctx.device, out)
        barrier()  # every rank's shards are recorded before rank 0 writes the index
        if ctx.rank == 0:
            write_latent_index(cfg, index, out, autoencoder.spec)
        seconds = time.perf_counter() - started
        return {"shards_here": float(len(todo)), "shards_skipped_here": float(len(mine) - len(todo)),
                "samples_here": float(samples), "seconds_here": seconds,
                "samples_per_second_here": samples / seconds if samples else 0.0}

    @torch.no_grad()
    def _encode_shard(self, cfg: DictConfig, index: ShardIndex, number: int, autoencoder: Any, text: Any,
                      device: torch.device, out: Path) -> int:
        name = shard_name(number)
        partial = out / f"{name}.partial"
        field_name = image_field(index)
        decode = EncodeInput(field_name, int(autoencoder.vae.config.in_channels))
        required = (field_name,)
        dtype = DTYPES[cfg.dtype]
        written, problems, shape = 0, [], []

        def flush(batch: list[dict[str, Any]], sink: wds.TarWriter) -> None:
            images = torch.stack([sample["image"] for sample in batch]).to(device)
            latents = autoencoder.encode(images).float().cpu().numpy().astype(dtype)
            shape[:] = latents.shape[1:]
            embeddings = lengths = None
            if text is not None:
                tokens, mask = text([sample["kept"].get("txt", b"").decode("utf-8") for sample in batch], device)
                embeddings, lengths = tokens.float().cpu().numpy().astype(dtype), mask.sum(1).tolist()
            for i, sample in enumerate(batch):
                record = {"__key__": sample["key"], LATENT_FIELD: latents[i], **sample["kept"]}
                if embeddings is not None:  # the real tokens only (a caption is ~10 of 64): 6x less to store
                    record[TEXT_EMBEDDING_FIELD] = embeddings[i, : lengths[i]]
                sink.write(record)

        pending: list[dict[str, Any]] = []
        with open(partial, "wb") as handle:
            sink = wds.TarWriter(handle, mtime=0, user="scaleyard", group="scaleyard")
            for sample, problem in shard_samples(index, number, decode, required, cfg.shard_base):
                if sample is None:
                    problems.append(problem)
                    continue
                pending.append(sample)
                if len(pending) == cfg.batch_size:
                    flush(pending, sink)
                    written, pending = written + len(pending), []
            if pending:
                flush(pending, sink)
                written += len(pending)
            sink.close()
            handle.flush()
            os.fsync(handle.fileno())
        final = out / name
        os.replace(partial, final)
        record = {"name": name, "count": written, "sha256": sha256_file(final),
                  "offsets": list(sample_offsets(final, SEEK_EVERY)), "source_shard": index.shards[number].name,
                  "source_sha256": index.shards[number].sha256, "skipped": len(problems), "problems": problems[:20],
                  "latent_shape": shape}
        _write_atomic(out / DONE_DIR / f"{name}.json", json.dumps(record, indent=1))
        return written


def shard_name(number: int) -> str:
    return f"latents-{number:06d}.tar"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finished(out: Path, index: ShardIndex, number: int) -> bool:
    """Shard `number` was encoded by an earlier attempt from the same source shard."""
    name = shard_name(number)
    record_file = out / DONE_DIR / f"{name}.json"
    if not record_file.exists() or not (out / name).exists():
        return False
    record = json.loads(record_file.read_text())
    if record["source_sha256"] != index.shards[number].sha256:
        raise DataError(f"{out}/{name} was encoded from another version of {record['source_shard']} (sha256 "
                        f"differs); encode into a new --out folder")
    return (out / name).stat().st_size > 0


def write_latent_index(cfg: DictConfig, source: ShardIndex, out: Path, spec: Any) -> ShardIndex:
    """index.json over every recorded shard (shards whose samples were all unreadable left out)."""
    records = [json.loads((out / DONE_DIR / f"{shard_name(s)}.json").read_text()) for s in range(len(source.shards))]
    shapes = {tuple(r["latent_shape"]) for r in records if r["count"]}
    if len(shapes) != 1:
        raise DataError(f"{out}: the encoded shards hold latents of shapes {sorted(shapes)} (none, or mixed); "
                        "encode into a new --out folder")
    latent_shape = list(shapes.pop())
    schema = {LATENT_FIELD: f"{cfg.dtype}{latent_shape} normalised latents of {spec.folder}"}
    schema.update({k: source.schema[k] for k in PASSED_THROUGH if k in source.schema})
    if cfg.text_encoder:
        schema[TEXT_EMBEDDING_FIELD] = (f"{cfg.dtype}[n,384] {cfg.text_encoder} embeddings of the caption's n <= "
                              f"{cfg.text_len} tokens (pad with zeros to {cfg.text_len}, mask False)")
    extra = {k: v for k, v in source.extra.items() if k not in SKIPPED_EXTRA}
    extra.update(latent_shape=latent_shape, source=str(Path(cfg.source).resolve()),
                 skipped=sum(r["skipped"] for r in records),
                 autoencoder={"path": str(spec.folder.resolve()), "weights_sha256": sha256_file(spec.weights),
                              "scaling_factor": spec.scaling_factor, "shift_factor": spec.shift_factor,
                              "downsample": spec.downsample},
                 text_encoder={"name": cfg.text_encoder, "text_len": cfg.text_len} if cfg.text_encoder else None)
    shards = [ShardInfo(r["name"], r["count"], r["sha256"], tuple(r["offsets"])) for r in records if r["count"]]
    index = ShardIndex(builder="latent_encode", version="1", split=source.split, shards=shards, schema=schema,
                       extra=extra, seek_every=SEEK_EVERY)
    _write_atomic(out / INDEX_FILE, index.to_json())
    index.root = str(out)
    return index


JOB = LatentEncodeJob
