"""Data pipeline throughput: samples/s of ShardStream (ordering, lanes, decode, batch) against a
bare loop that reads the same tars with `tarfile` and decodes and batches the same way.
Alternating rounds in one process.

    python benchmarks/loader_throughput.py [--data data/fashion_mnist/train] [--samples 60000]

Builds a Fashion-MNIST split first if `--data` does not exist. Prints JSON (goal: ratio >= 0.90).

    python benchmarks/loader_throughput.py --jpeg [--jpeg-samples 2000] [--size 256]

Real image decoding instead (issue #15): generates img2dataset-style JPEG shards of assorted sizes
(once, under `--jpeg-data`), times `scaleyard data index` on them (seconds per 1,000 samples), then
the pipeline reading them through the index (JPEG decode, RGB, resize shorter side, centre crop,
tensor, batch) against a bare PIL loop doing the same on the same shards. Goal: ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from scaleyard.data_loaders.decoders import CaptionDecoder, Compose, ImageDecoder, LabelDecoder
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import ShardStream, StreamConfig, stack


def bare(index, decode, samples: int, batch: int) -> float:
    start = time.perf_counter()
    seen, pending = 0, []
    for shard in index.shards:
        with tarfile.open(index.shard_url(shard)) as tar:
            grouped: dict[str, dict] = {}
            for member in tar:
                key, _, field = member.name.partition(".")
                grouped.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
        for position, raw in enumerate(grouped.values()):
            pending.append(decode(raw, position))
            if len(pending) == batch:
                stack(pending)
                pending, seen = [], seen + batch
                if seen >= samples:
                    return seen / (time.perf_counter() - start)
    return seen / (time.perf_counter() - start)


def pipeline(index, decode, samples: int, batch: int, workers: int) -> float:
    stream = ShardStream(index, StreamConfig(lanes=16, shuffle_block=256, num_workers=workers),
                         decode=decode, collate=stack, batch_per_rank=batch)
    start = time.perf_counter()
    for _ in itertools.islice(iter(stream), samples // batch):
        pass
    return (samples // batch) * batch / (time.perf_counter() - start)


def write_jpeg_shards(folder: Path, samples: int, per_shard: int = 500) -> None:
    """img2dataset-style shards (KEY.jpg, KEY.txt, KEY.json) of photo-like JPEGs (smooth gradients
    plus noise, quality 90) whose sizes vary around 512 px, as img2dataset's default resize leaves
    them. Written to a temporary name and renamed, so a half-written folder is never reused."""
    rng = np.random.default_rng(0)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for shard in range((samples + per_shard - 1) // per_shard):
        with wds.TarWriter(str(partial / f"{shard:05d}.tar")) as sink:
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                width, height = int(rng.integers(320, 640)), int(rng.integers(320, 640))
                ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(1, 0.2, height)[:, None, None]
                pixels = ramp * rng.random(3) * 200 + rng.normal(0, 12, (height, width, 3))
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                sink.write({"__key__": f"{shard:05d}{i % per_shard:04d}", "jpg": buffer.getvalue(),
                            "txt": f"picture {i}".encode(), "json": json.dumps({"caption": f"picture {i}"}).encode()})
    partial.rename(folder)


def bare_pil(shards: list[str], size: int, samples: int, batch: int, box: bool = False) -> float:
    """The loop a user would write: open, convert RGB, resize the shorter side, centre crop, to
    tensor, stack. `box`: resize and crop in one `resize(box=...)` call, as the pipeline does."""
    start = time.perf_counter()
    seen, pending = 0, []
    for shard in itertools.cycle(shards):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                if field == "txt":
                    data.decode("utf-8")
                if field != "jpg":
                    continue
                image = Image.open(io.BytesIO(data)).convert("RGB")
                scale = size / min(image.size)
                width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
                left, top = (width - size) // 2, (height - size) // 2
                if box:
                    crop = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
                    image = image.resize((size, size), Image.Resampling.BICUBIC, box=crop)
                else:
                    image = image.resize((width, height), Image.Resampling.BICUBIC)
                    image = image.crop((left, top, left + size, top + size))
                pending.append({"image": torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div_(255.0)})
                if len(pending) == batch:
                    stack(pending)
                    pending, seen = [], seen + batch
                    if seen >= samples:
                        return seen / (time.perf_counter() - start)
    return 0.0


def jpeg_benchmark(folder: Path, samples: int, size: int, batch: int, rounds: int, index_workers: int) -> dict:
    from scaleyard.data_loaders.indexer import index_shards

    if not folder.exists():
        write_jpeg_shards(folder, samples)
    shards = sorted(str(p) for p in folder.glob("*.tar"))
    timings = {}
    for label, check in (("decode_check", True), ("headers_only", False)):
        start = time.perf_counter()
        index = index_shards(str(folder), folder.with_name(folder.name + "-index"), size=size, force=True,
                             workers=index_workers, decode_check=check)
        timings[label] = round((time.perf_counter() - start) / index.total * 1000, 3)
    index = load_index(folder.with_name(folder.name + "-index"))
    decode = Compose((ImageDecoder(), CaptionDecoder()))
    count = min(samples, index.total) // batch * batch
    bare_rates, box_rates, pipe_rates = [], [], []
    for number in range(rounds):  # alternating order, so a slow patch of a shared machine hits both sides
        runs = [lambda: bare_rates.append(bare_pil(shards, size, count, batch)),
                lambda: pipe_rates.append(pipeline(index, decode, count, batch, 0)),
                lambda: box_rates.append(bare_pil(shards, size, count, batch, box=True))]
        for run in runs if number % 2 == 0 else runs[::-1]:
            run()
    return {
        "benchmark": "loader_throughput_jpeg", "samples": count, "batch": batch, "size": size,
        "image_width": index.extra["image_stats"]["width"], "image_height": index.extra["image_stats"]["height"],
        "index_seconds_per_1000_samples": timings, "index_workers": index_workers,
        "bare_pil_samples_per_s": round(max(bare_rates), 1), "pipeline_samples_per_s": round(max(pipe_rates), 1),
        "ratio": round(max(pipe_rates) / max(bare_rates), 4),
        "bare_pil_box_resize_samples_per_s": round(max(box_rates), 1),
        "ratio_vs_box_resize": round(max(pipe_rates) / max(box_rates), 4),
        "ratio_per_round": [round(p / b, 3) for p, b in zip(pipe_rates, bare_rates)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jpeg", action="store_true", help="real JPEG decoding (see the docstring)")
    parser.add_argument("--jpeg-data", default="data/bench_jpeg")
    parser.add_argument("--jpeg-samples", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--index-workers", type=int, default=2)
    parser.add_argument("--data", default="data/fashion_mnist/train")
    parser.add_argument("--samples", type=int, default=60000)  # one epoch of the default data
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    if args.jpeg:
        print(json.dumps(jpeg_benchmark(Path(args.jpeg_data), args.jpeg_samples, args.size, args.batch,
                                        args.rounds, args.index_workers), indent=1))
        return
    if not Path(args.data, "index.json").exists():
        from scaleyard.data_loaders.builders import build

        build("fashion_mnist", Path(args.data).parent)
    index = load_index(args.data)
    decode = Compose((ImageDecoder(), LabelDecoder()))
    bare_rates, pipe_rates = [], []
    for _ in range(args.rounds):
        bare_rates.append(bare(index, decode, args.samples, args.batch))
        pipe_rates.append(pipeline(index, decode, args.samples, args.batch, args.workers))
    print(json.dumps({
        "benchmark": "loader_throughput", "samples": args.samples, "batch": args.batch, "workers": args.workers,
        "bare_samples_per_s": round(max(bare_rates)), "pipeline_samples_per_s": round(max(pipe_rates)),
        "ratio": round(max(pipe_rates) / max(bare_rates), 4),
    }, indent=1))


if __name__ == "__main__":
    main()
