"""Process-group set-up from torchrun's or SLURM's environment."""

from __future__ import annotations

import datetime
import gc
import os
import re
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Callable
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
    node: str = ""  # the scheduler's name for this rank's node (SLURMD_NODENAME), else the host name

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_os(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun variables win (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); otherwise SLURM's
    task variables (srun / sbatch --ntasks), with the rendezvous of `slurm_rendezvous`."""
    env = dict(os.environ if environ is None else environ)
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), node)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        pinned = "MASTER_ADDR" in env and "MASTER_PORT" in env  # a profile's setup lines chose them
        rendezvous = {} if pinned else slurm_rendezvous(env)
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or rendezvous["MASTER_ADDR"],
                       int(env.get("MASTER_PORT") or rendezvous["MASTER_PORT"]), node)
    return DistEnv(node=node)


def slurm_rendezvous(environ: dict[str, str], node_addr: Callable[[str], str] | None = None) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for a SLURM job, the same on every rank without talking:
    the first node of the allocation (its name if it resolves, else the address SLURM records for
    it), and a port derived from the job id and the cluster name."""
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or socket.gethostname()
    first = _first_host(nodes)
    port = rendezvous_port(int(environ.get("SLURM_JOB_ID", "0") or 0), environ.get("SLURM_CLUSTER_NAME", ""))
    return {"MASTER_ADDR": master_address(first, node_addr or scontrol_node_addr), "MASTER_PORT": str(port)}


def rendezvous_port(job_id: int, cluster: str = "") -> int:
    """A port in 20000-39999. Jobs running at the same time have nearby ids, so consecutive ids
    getting consecutive ports means no two of 20,000 consecutive jobs share one (submitit's own
    choice, a random port seeded by the id, collides by chance). The cluster name shifts the range:
    two clusters on one host (the local two-node one beside the single-node one) count ids alike."""
    return 20000 + (job_id + zlib.crc32(cluster.encode())) % 20000


def master_address(host: str, node_addr: Callable[[str], str]) -> str:
    """`host` when it resolves (real clusters name their nodes in DNS); otherwise the address the
    scheduler records for it (`node_addr`): a name that does not resolve would hang every rank in
    the rendezvous instead of failing."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    address = node_addr(host)
    if not address:
        raise RuntimeError(f"rendezvous: node {host!r} does not resolve and SLURM records no address for it "
                           "(`scontrol show node`): set MASTER_ADDR in the profile's setup lines")
    return address


def scontrol_node_addr(node: str) -> str:
    """NodeAddr of `node` as `scontrol show node` reports it ("" when scontrol cannot say)."""
    if shutil.which("scontrol") is None:
        return ""
    done = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30)
    for field in done.stdout.split():
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=")
    return ""


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[003-010,12]-ib,cpu1'; `scontrol show hostnames`
    is the reference, but it is not callable from every container, so parse the common form."""
    prefix, ranges, suffix = re.match(r"([^\[,]*)(?:\[([^\]]*)\])?([^,\[]*)", nodelist).groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


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
    # env:// reads these; DistEnv is the truth (an engine that reads them later sees the same)
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    # every rank says where it runs, so a rank that later fails to arrive is named with its node
    _store().set(f"{NODE_KEY}{env.rank}", env.node or socket.gethostname())
    return backend


NODE_KEY = "scaleyard/node/"
ARRIVED_KEY = "scaleyard/preflight/"


def _store() -> dist.Store:
    # the process group's own rendezvous store: reachable by every rank, also when a collective hangs
    return dist.distributed_c10d._get_default_store()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_initialized():
        # objects of the finished run that still hold group handles (in reference cycles) are freed
        # now, while the groups exist, rather than in an arbitrary order at interpreter exit
        gc.collect()
        dist.destroy_process_group()


class PreflightError(RuntimeError):
    pass


def _meet(env: DistEnv, host: str, timeout_s: float) -> None:
    """All ranks check in through the rendezvous store (any backend); a rank that does not
    arrive within `timeout_s` is named with its node, instead of a collective that hangs."""
    store = _store()
    store.set(f"{ARRIVED_KEY}{env.rank}", host)
    deadline = time.monotonic() + timeout_s
    keys = [f"{ARRIVED_KEY}{rank}" for rank in range(env.world_size)]
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [rank for rank in range(env.world_size) if not store.check([keys[rank]])]
            where = [f"rank {rank} on {_node_of(store, rank)}" for rank in missing]
            raise PreflightError(f"rank {env.rank} on {host}: pre-flight: {', '.join(where)} did not arrive "
                                 f"within {timeout_s:.0f} s (its log says why; a hung or failed node)")
        time.sleep(0.05)


def _node_of(store: dist.Store, rank: int) -> str:
    key = f"{NODE_KEY}{rank}"
    return store.get(key).decode() if store.check([key]) else "an unknown node"


def preflight(env: DistEnv, device: torch.device, timeout_s: float = 120.0) -> None:
    """Before step 1: each rank checks its device, then all ranks meet in a collective, so a bad
    node fails in seconds naming itself instead of hanging the first step (torchtitan #915)."""
    host = env.node or socket.gethostname()
    try:
        probe = torch.randn(64, 64, device=device)
        if not bool(torch.isfinite(probe @ probe).all()):
            raise PreflightError("matmul produced non-finite values")
    except Exception as err:  # noqa: BLE001 - any device failure is reported with its place
        raise PreflightError(f"rank {env.rank} on {host}: device {device} failed its check: {err}") from err
    if not env.distributed:
        return
    _meet(env, host, timeout_s)
    hosts: list[str] = [""] * env.world_size
    dist.all_gather_object(hosts, f"{host}:{device}")
    total = torch.ones((), device=device)
    dist.all_reduce(total)
    if int(total.item()) != env.world_size:
        raise PreflightError(f"rank {env.rank} on {host}: all-reduce gave {total.item()}, expected {env.world_size}")
