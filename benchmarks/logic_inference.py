"""Inference throughput and accuracy on the Fashion-MNIST test set: a logic run's network compiled
to C (bitwise, 64 images per word, one thread) vs the same network discretised in PyTorch vs the
classify CNN, on this CPU, in one process.

    python benchmarks/logic_inference.py --logic RUN [--classify RUN] [--data data/fashion_mnist]
                                         [--samples 10000] [--batch 1000] [--min-seconds 3]

Without --classify the CNN is timed untrained (its accuracy is then null). Prints JSON with
images/s and accuracy of each, and throughput ratios against the PyTorch discretised network
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scaleyard.data_loaders.decoders import Compose, ImageDecoder, LabelDecoder
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import first_samples
from scaleyard.jobs.classify.job import load_classifier
from scaleyard.jobs.logic.job import load_logic_net
from scaleyard.models.classifier import ClassifierConfig, ConvClassifier
from scaleyard.models.logic.compiled import compile_net
from scaleyard.models.logic.network import discretised


def test_set(data: Path, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    decode = Compose((ImageDecoder(), LabelDecoder()))
    batches = list(first_samples(load_index(data / "test"), decode, samples, 1000))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def rate(predict: Callable[[], torch.Tensor], count: int, min_seconds: float) -> tuple[float, torch.Tensor]:
    """Images per second of `predict` (whole passes over `count` images, at least min_seconds)."""
    predictions = predict()  # warm-up
    passes, start = 0, time.perf_counter()
    while True:
        predict()
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return passes * count / elapsed, predictions


def batched(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int) -> Callable:
    def predict() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(chunk).argmax(-1) for chunk in images.split(batch)])
    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logic", required=True, help="a trained logic run folder")
    parser.add_argument("--classify", default=None, help="a trained classify run folder")
    parser.add_argument("--data", default="data/fashion_mnist")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    args = parser.parse_args()
    images, labels = test_set(Path(args.data), args.samples)
    count = len(labels)
    net = load_logic_net(args.logic)
    results: dict[str, dict] = {}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compiled = compile_net(net, Path(tmp))
        compile_seconds = time.perf_counter() - start
        pixels = compiled.to_uint8(images)  # the C side reads uint8 images; converting is not timed
        c_rate, c_pred = rate(lambda: torch.from_numpy(compiled.predict(pixels)), count, args.min_seconds)
    results["logic_compiled_c"] = {"images_per_s": c_rate, "threads": 1, "compile_seconds": compile_seconds}
    with discretised(net):
        d_rate, d_pred = rate(batched(net, images, args.batch), count, args.min_seconds)
    results["logic_pytorch_discretised"] = {"images_per_s": d_rate, "threads": torch.get_num_threads()}
    r_rate, r_pred = rate(batched(net, images, args.batch), count, args.min_seconds)
    results["logic_pytorch_relaxed"] = {"images_per_s": r_rate, "threads": torch.get_num_threads()}
    cnn = load_classifier(args.classify) if args.classify else ConvClassifier(ClassifierConfig()).eval()
    n_rate, n_pred = rate(batched(cnn, images, args.batch), count, args.min_seconds)
    results["classify_cnn"] = {"images_per_s": n_rate, "threads": torch.get_num_threads(),
                               "trained": bool(args.classify)}

    for name, pred in (("logic_compiled_c", c_pred), ("logic_pytorch_discretised", d_pred),
                       ("logic_pytorch_relaxed", r_pred), ("classify_cnn", n_pred)):
        trained = name != "classify_cnn" or args.classify
        results[name]["accuracy"] = float((pred.long() == labels).float().mean()) if trained else None
    baseline = results["logic_pytorch_discretised"]["images_per_s"]
    for entry in results.values():
        entry["speed_vs_pytorch_discretised"] = entry["images_per_s"] / baseline
    report = {"test_images": count, "compiled_equals_pytorch_discretised": bool(torch.equal(c_pred.long(), d_pred)),
              "logic_run": args.logic, "classify_run": args.classify, **net.gate_count(), "results": results}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
