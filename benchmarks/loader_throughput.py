"""Data pipeline throughput: samples/s of ShardStream (ordering, lanes, decode, batch) against a
bare loop that reads the same tars with `tarfile` and decodes and batches the same way.
Alternating rounds in one process.

    python benchmarks/loader_throughput.py [--data data/fashion_mnist/train] [--samples 60000]

Builds a Fashion-MNIST split first if `--data` does not exist. Prints JSON (goal: ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tarfile
import time
from pathlib import Path

from scaleyard.data_loaders.decoders import Compose, ImageDecoder, LabelDecoder
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/fashion_mnist/train")
    parser.add_argument("--samples", type=int, default=60000)  # one epoch of the default data
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
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
