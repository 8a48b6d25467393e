"""Process-group set-up from torchrun's or SLURM's environment."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_os(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun variables win (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); otherwise SLURM's
    task variables (srun / sbatch --ntasks), with the first node of the allocation as master."""
    env = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        nodes = env.get("SLURM_JOB_NODELIST", socket.gethostname())
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", _first_host(nodes)),
                       int(env.get("MASTER_PORT", 20000 + job_id % 20000)))
    return DistEnv()


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[003-010,12],cpu1'; `scontrol show hostnames`
    is the reference, but it is not callable from every container, so parse the common form."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def pick_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(env: DistEnv, backend: str = "auto", timeout_s: float = 600.0) -> str:
    if not env.distributed or dist.is_initialized():
        return dist.get_backend() if dist.is_initialized() else "none"
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PreflightError(RuntimeError):
    pass


def preflight(env: DistEnv, device: torch.device, timeout_s: float = 120.0) -> None:
    """Before step 1: each rank checks its device, then all ranks meet in a collective, so a bad
    node fails in seconds naming itself instead of hanging the first step (torchtitan #915)."""
    host = socket.gethostname()
    try:
        probe = torch.randn(64, 64, device=device)
        if not bool(torch.isfinite(probe @ probe).all()):
            raise PreflightError("matmul produced non-finite values")
    except Exception as err:  # noqa: BLE001 - any device failure is reported with its place
        raise PreflightError(f"rank {env.rank} on {host}: device {device} failed its check: {err}") from err
    if not env.distributed:
        return
    if dist.get_backend() == "gloo":
        try:
            # names the ranks that did not arrive, instead of a bare timeout
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as err:
            raise PreflightError(f"rank {env.rank} on {host}: pre-flight barrier failed: {err}") from err
    hosts: list[str] = [""] * env.world_size
    dist.all_gather_object(hosts, f"{host}:{device}")
    total = torch.ones((), device=device)
    dist.all_reduce(total)
    if int(total.item()) != env.world_size:
        raise PreflightError(f"rank {env.rank} on {host}: all-reduce gave {total.item()}, expected {env.world_size}")
