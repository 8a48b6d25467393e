"""Queueing speed on the local SLURM cluster: a 100-element job array against 100 separate
submissions of the same trivial task (both through submitit), in one run.

    python benchmarks/submit_rate.py [--count 100]

Needs a cluster (`bash slurm/cluster/start.sh`). Prints JSON: seconds until all are queued and
until all have finished, for both ways. Goal: the array queues in <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from scaleyard.slurm.launch import make_executor
from scaleyard.slurm.profiles import ClusterProfile


def trivial(index: int) -> int:
    return index * index


def wait_all(jobs, timeout_s: float) -> float:
    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    for job in jobs:
        while not job.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not finished after {timeout_s} s")
            time.sleep(0.5)
    return time.perf_counter() - start


def measure(count: int, as_array: bool, folder: Path, timeout_s: float) -> dict[str, float]:
    profile = ClusterProfile(name="bench", time_min=10, signal_delay_s=10, max_requeues=0)
    executor = make_executor("slurm", profile, folder, "sy-bench", array_parallelism=count if as_array else None)
    start = time.perf_counter()
    if as_array:
        with executor.batch():
            jobs = [executor.submit(trivial, i) for i in range(count)]
    else:
        jobs = [executor.submit(trivial, i) for i in range(count)]
    queued = time.perf_counter() - start
    finished = queued + wait_all(jobs, timeout_s)
    assert [job.result() for job in jobs] == [i * i for i in range(count)]
    return {"queued_s": round(queued, 2), "finished_s": round(finished, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        array = measure(args.count, True, Path(scratch) / "array", args.timeout)
        separate = measure(args.count, False, Path(scratch) / "separate", args.timeout)
    print(json.dumps({"benchmark": "submit_rate", "count": args.count, "array": array, "separate": separate,
                      "queue_ratio_separate_over_array": round(separate["queued_s"] / max(array["queued_s"], 1e-9), 2)},
                     indent=1))


if __name__ == "__main__":
    main()
