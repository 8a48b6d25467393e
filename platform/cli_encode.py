"""`scaleyard data encode SOURCE --autoencoder PATH --out DIR`: the caching pass (latents and text
embeddings written as new shards), launched as a run of the `latent_encode` job through the
path every run takes (--nproc local ranks; `scaleyard submit latent_encode` on SLURM), so it
shares the run folder, logs, preflight and restarts of every job."""

from __future__ import annotations

import argparse
from typing import Any


def add_encode_parser(data_sub: Any) -> None:
    e = data_sub.add_parser("encode", help="encode image shards into latent shards (+ cached text embeddings) "
                                           "with a diffusers AutoencoderKL; resumable shard by shard")
    e.add_argument("source", help="an image split folder with index.json (scaleyard's, or from `data index`)")
    e.add_argument("--autoencoder", required=True, help="a local diffusers AutoencoderKL folder (SD/SDXL/FLUX VAE "
                                                        "or `scaleyard export AE_RUN --format diffusers`)")
    e.add_argument("--out", required=True, help="output split folder (a run folder of job latent_encode); "
                                                "run again with the same --out to resume")
    e.add_argument("--text-encoder", default="", choices=("", "minilm"), help="also cache MiniLM token embeddings")
    e.add_argument("--text-len", type=int, default=None, help="tokens cached per caption (default 64)")
    e.add_argument("--dtype", default=None, choices=("float16", "float32"), help="latent storage (default float16)")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--shard-base", default=None, help="'{name}' template when the source shards lie elsewhere")
    e.add_argument("--nproc", type=int, default=1, help="local ranks; shard s goes to rank s %% nproc")
    e.add_argument("overrides", nargs="*", help="more latent_encode keys")
    e.set_defaults(func=cmd_data_encode)


def encode_overrides(args: argparse.Namespace) -> list[str]:
    overrides = [f"source={args.source}", f"autoencoder={args.autoencoder}", f"run.dir={args.out}"]
    flags = {"text_encoder": args.text_encoder or None, "text_len": args.text_len, "dtype": args.dtype,
             "batch_size": args.batch_size, "shard_base": args.shard_base}
    return overrides + [f"{key}={value}" for key, value in flags.items() if value is not None] + list(args.overrides)


def cmd_data_encode(args: argparse.Namespace) -> int:
    from scaleyard.platform.cli import cmd_run

    return cmd_run(argparse.Namespace(job="latent_encode", preset=None, nproc=args.nproc,
                                      overrides=encode_overrides(args)))
