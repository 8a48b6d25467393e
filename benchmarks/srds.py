"""SRDS against the serial sampler on a trained t2i model: wall time (a ratio to serial, measured
in the same process), parareal iterations, sampler steps on the critical path, total model work,
and the largest pixel difference from the serial images.

    python benchmarks/srds.py --run RUN [--steps 25 100] [--images 8] [--rounds 2] [--ranks 2]

RUN is a trained t2i run folder; without --run a tiny one is trained first on data/fashion_mnist
(`make demo` or `scaleyard data build fashion_mnist --out data/fashion_mnist` writes it).

What the numbers mean: SRDS trades more total model work for fewer *sequential* steps. Its wall
time falls below serial only where a batched call of B blocks costs about what one call costs
(a GPU with room to spare) or the blocks run on devices of their own; on a 2-core CPU every
model call is compute bound, so wall time here shows the overhead, and `sequential_steps` is the
latency a parallel machine would see. The 2-rank variant (gloo, one thread per rank) runs the
blocks of each iteration on separate processes, which is the distributed path of the job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scaleyard.jobs.t2i.loading import load_t2i
from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.srds import srds, srds_pipelined

CAPTIONS = ("a shirt", "an ankle boot", "a bag", "a sneaker", "a dress", "a coat", "a pullover", "a sandal")


def train_tiny_run(out: Path) -> Path:
    data = Path("data/fashion_mnist")
    if not (data / "train" / "index.json").exists():
        raise SystemExit(f"{data}/train/index.json missing: run `scaleyard data build fashion_mnist --out {data}` "
                         "or pass --run RUN")
    run = out / "t2i"
    subprocess.run([sys.executable, "-m", "scaleyard.platform.cli", "run", "t2i", "--preset", "tiny",
                    f"data.path={data}/train", "data.eval_path=", "eval.samples=0", "train.steps=300",
                    f"run.dir={run}"], check=True)
    return run


def problem(run: Path, images: int, guidance: float):
    loaded = load_t2i(run)
    model, cfg = loaded.model, loaded.cfg
    captions = [CAPTIONS[k % len(CAPTIONS)] for k in range(images)]
    tokens, mask = model.encode(captions, torch.device("cpu"))
    null_tokens, null_mask = model.encode([""] * images, torch.device("cpu"))
    predict = flow.conditioned(model.denoiser, tokens, mask, null_tokens, null_mask,
                               guidance or float(cfg.eval.guidance))
    d = model.denoiser.cfg
    noise = torch.randn(images, d.channels, d.image_size, d.image_size, generator=torch.Generator().manual_seed(0))
    return predict, noise, cfg.model.process


def timed(fn):
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - start


def _on_rank(rank: int, world: int, store: str, run: str, images: int, guidance: float, steps: int,
             tolerance: float, out: str) -> None:
    import torch.distributed as dist

    from scaleyard.platform.srds_ranks import blocks_over_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        predict, noise, process = problem(Path(run), images, guidance)
        dist.barrier()
        result, seconds = timed(lambda: srds(predict, noise, steps, "euler", process, tolerance=tolerance,
                                             distribute=blocks_over_ranks))
        if rank == 0:
            torch.save({"sample": result.sample, "seconds": seconds, "iterations": result.iterations,
                        "sequential_steps": result.sequential_steps, "total_steps": result.total_steps}, out)
    finally:
        dist.destroy_process_group()


def on_ranks(run: Path, ranks: int, images: int, guidance: float, steps: int, tolerance: float,
             scratch: Path) -> dict:
    import torch.multiprocessing as mp

    store, out = scratch / f"store_{steps}_{tolerance}", scratch / f"ranks_{steps}_{tolerance}.pt"
    store.unlink(missing_ok=True)
    mp.spawn(_on_rank, args=(ranks, str(store), str(run), images, guidance, steps, tolerance, str(out)),
             nprocs=ranks)
    return torch.load(out)


def measure(run: Path, steps: int, args: argparse.Namespace, scratch: Path) -> dict:
    predict, noise, process = problem(run, args.images, args.guidance)
    variants = {
        "srds_exact": lambda: srds(predict, noise, steps, "euler", process, tolerance=0.0),
        "srds_tol": lambda: srds(predict, noise, steps, "euler", process, tolerance=args.tolerance),
        "srds_pipelined_tol": lambda: srds_pipelined(predict, noise, steps, "euler", process,
                                                     tolerance=args.tolerance),
    }
    seconds: dict[str, list[float]] = {"serial": [], **{name: [] for name in variants}}
    results: dict = {}
    serial = None
    for _ in range(args.rounds):  # alternate, so machine noise hits every variant alike
        serial, took = timed(lambda: flow.integrate(predict, noise, steps, "euler", process))
        seconds["serial"].append(took)
        for name, fn in variants.items():
            results[name], took = timed(fn)
            seconds[name].append(took)
    best = {name: min(values) for name, values in seconds.items()}
    row = {"serial": {"seconds": best["serial"], "sequential_steps": steps, "total_steps": steps * args.images}}
    for name, result in results.items():
        row[name] = {"seconds": best[name], "ratio_to_serial": best[name] / best["serial"],
                     "iterations": result.iterations, "sequential_steps": result.sequential_steps,
                     "total_steps": result.total_steps,
                     "max_abs_diff": float((result.sample - serial).abs().max())}
    if args.ranks > 1:
        # serial again right before, so the ratio compares seconds of the same stretch of machine load
        _, serial_now = timed(lambda: flow.integrate(predict, noise, steps, "euler", process))
        got = on_ranks(run, args.ranks, args.images, args.guidance, steps, args.tolerance, scratch)
        row[f"srds_tol_{args.ranks}_ranks"] = {
            "seconds": got["seconds"], "serial_seconds_before": serial_now,
            "ratio_to_serial": got["seconds"] / serial_now,
            "iterations": got["iterations"], "sequential_steps": got["sequential_steps"],
            "total_steps": got["total_steps"], "max_abs_diff": float((got["sample"] - serial).abs().max()),
            "note": "one thread per rank"}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=0.0, help="0: the run's eval.guidance")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2, help="0 or 1: skip the multi-rank variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of the single-process variants (each rank always has one): a core per "
                             "process, as a device per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        run = args.run or train_tiny_run(scratch)
        report = {"run": str(run), "images": args.images, "tolerance": args.tolerance,
                  "threads": torch.get_num_threads(), "by_steps": {}}
        for steps in args.steps:
            report["by_steps"][str(steps)] = measure(run, steps, args, scratch)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
