"""What runs inside a submitted job: one rank of a scaleyard run, with preemption handled so
that every rank checkpoints before submitit requeues the job.

Why not submitit's own checkpoint hook alone: its USR2 handler runs `checkpoint()` on global
rank 0 only and exits at once (submitit #9), so the other ranks never finish their step and the
checkpoint could not be collective. Here every rank's Trainer takes the signal as a stop request,
all ranks agree at the end of the step, checkpoint together, and only then rank 0 hands over to
submitit's handler, which dumps this task for the requeued job, requeues, and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("scaleyard")
PLACEMENT = "placement"


class RunTask:
    """A picklable call: run job `job_name` with `overrides` (including run.dir) on this rank."""

    def __init__(self, job_name: str, preset: str, overrides: list[str], run_dir: str):
        self.job_name, self.preset, self.overrides, self.run_dir = job_name, preset, list(overrides), run_dir

    def __call__(self) -> dict[str, Any]:
        import submitit
        import torch

        from scaleyard.platform.distributed import env_from_os, slurm_rendezvous
        from scaleyard.platform.launch import prepare, run_here
        from scaleyard.platform.trainer import Preempted

        logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                            format="%(asctime)s [%(name)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
        pinned = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}  # profile setup
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if "SLURM_JOB_ID" in os.environ:
            # submitit takes the first node's name (which need not resolve: a hung rendezvous) and a
            # port drawn at random from the job id (which may collide): see slurm_rendezvous
            os.environ.update({**slurm_rendezvous(dict(os.environ)), **pinned})
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        env = env_from_os()
        log.info("rank %d of %d on node %s (rendezvous %s:%d)", env.rank, env.world_size, env.node,
                 env.master_addr, env.master_port)
        self._record_placement(env.rank, env.node)
        if env.rank == 0:
            self._record_attempt()
        prepared = prepare(self.job_name, self.overrides, self.preset or None, env.world_size)
        try:
            return run_here(prepared, env)
        except Preempted as stop:
            log.warning("rank %d: %s", env.rank, stop)
            if stop.signum == signal.SIGTERM:
                # scancel (or the hard time limit) sends TERM: the checkpoint is written, and a
                # cancelled job must stay cancelled, so no requeue.
                raise
            if env.rank == 0 and callable(requeue_handler):
                requeue_handler(signal.SIGUSR2, None)  # requeues and exits (or raises when out of requeues)
            time.sleep(120)  # other ranks: the requeue ends this job step
            raise RuntimeError("job was not requeued after its preemption checkpoint") from stop

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit before requeueing: the state lives in the run folder, so the
        requeued job is this same call (it resumes from the newest checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunTask(self.job_name, self.preset, self.overrides, self.run_dir))

    def _record_placement(self, rank: int, node: str) -> None:
        """`placement/rank<R>.json`: the node this rank runs on (this start), for `scaleyard status`."""
        folder = Path(self.run_dir) / PLACEMENT
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"rank": rank, "node": node, "job_id": os.environ.get("SLURM_JOB_ID", ""),
                 "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
        (folder / f"rank{rank}.json").write_text(json.dumps(entry))

    def _record_attempt(self) -> None:
        """One line per start of the job (first start and every requeue), for `scaleyard status`."""
        folder = Path(self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"time": time.time(), "host": socket.gethostname(), "job_id": os.environ.get("SLURM_JOB_ID", ""),
                 "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
        with open(folder / "attempts.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
