"""Map-style dataset throughput: batches/s of DatasetStream (the resumable, world-size-independent
order the Trainer puts around a plain `torch.utils.data.Dataset`) against torch's own
DataLoader(shuffle=True) over the same dataset and batch size. Alternating rounds in one process.

    python benchmarks/dataset_stream_throughput.py [--size 60000] [--batch 64] [--rounds 3]

Prints JSON: samples/s of both and their ratio (stream / DataLoader; goal >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from scaleyard.data_loaders.dataset_stream import DatasetStream


def timed(batches, steps: int, batch: int) -> float:
    start = time.perf_counter()
    for _, _ in zip(range(steps), batches):
        pass
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Fashion-MNIST-sized samples: a 28x28 image and a label
    data = TensorDataset(torch.rand(args.size, 1, 28, 28), torch.randint(0, 10, (args.size,)))
    steps = args.size // args.batch
    stream_rates, loader_rates = [], []
    for round_ in range(args.rounds):
        stream = DatasetStream(data, batch_per_rank=args.batch, seed=round_)
        stream_rates.append(timed(iter(stream), steps, args.batch))
        loader = DataLoader(data, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(round_))
        loader_rates.append(timed(iter(loader), steps, args.batch))
    stream_best, loader_best = max(stream_rates), max(loader_rates)
    print(json.dumps({"benchmark": "dataset_stream_throughput", "size": args.size, "batch": args.batch,
                      "dataset_stream_samples_per_s": round(stream_best),
                      "dataloader_samples_per_s": round(loader_best),
                      "ratio": round(stream_best / loader_best, 3)}))


if __name__ == "__main__":
    main()
