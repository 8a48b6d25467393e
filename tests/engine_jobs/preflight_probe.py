"""One rank with a device it cannot use, through the real pre-flight check on gloo ranks:
`python -m torch.distributed.run --nproc_per_node 2 tests/engine_jobs/preflight_probe.py OUT BAD_RANK`.
Rank BAD_RANK checks the `meta` device (its matmul has no values to check); the others the CPU.
Each rank writes what the check said to OUT/rank<R>.txt ("ok" or the PreflightError)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scaleyard.platform.distributed import (
    PreflightError,
    destroy_process_group,
    env_from_os,
    init_process_group,
    preflight,
)  # fmt: skip


def main(out: Path, bad_rank: int) -> None:
    env = env_from_os()
    init_process_group(env, "gloo")
    device = torch.device("meta") if env.rank == bad_rank else torch.device("cpu")
    try:
        preflight(env, device, timeout_s=5)  # the waiting ranks give up after 5 s instead of 120
        said = "ok"
    except PreflightError as err:
        said = str(err)
    (out / f"rank{env.rank}.txt").write_text(said)
    destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
