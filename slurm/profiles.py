"""Cluster profiles: where and how a job is queued (partition, account, resources, signals).

A profile is a YAML file of `ClusterProfile` fields. Lookup order for `--profile NAME`:
`$SCALEYARD_PROFILES` (a folder), `~/.config/scaleyard/profiles/`, then the profiles shipped in
`slurm/profiles/`. `--profile path/to/file.yaml` also works.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SHIPPED = Path(__file__).parent / "profiles"
# What may appear inside an #SBATCH line: no newline or control character can start a new
# directive or shell line (shlex.quote, which submitit applies, does not stop a newline).
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=@%/+\-\[\] ]*$")
SAFE_JOB_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ProfileError(ValueError):
    """A profile or launch request that cannot be queued; raised before anything is submitted."""


@dataclass
class ClusterProfile:
    name: str = "local"
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60
    mem_gb: float = 0.0  # per node; 0 = cluster default
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0  # per GPU, for engine.name=auto's planner; 0 = unknown (single/ddp)
    nodes: int = 1
    ntasks_per_node: int = 1
    signal_delay_s: int = 30  # warning signal (USR2) this long before the time limit
    max_requeues: int = 3  # preemptions + time-outs a run may survive
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, env)
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # e.g. {"exclusive": "", "mail-type": "END"}

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def profile_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("SCALEYARD_PROFILES"):
        dirs.append(Path(os.environ["SCALEYARD_PROFILES"]))
    dirs += [Path.home() / ".config" / "scaleyard" / "profiles", SHIPPED]
    return dirs


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.exists() for p in d.glob("*.yaml")})


def load_profile(name: str) -> ClusterProfile:
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        found = [d / f"{name}.yaml" for d in profile_dirs() if (d / f"{name}.yaml").exists()]
        if not found:
            raise ProfileError(f"unknown cluster profile {name!r}; available: {', '.join(available_profiles())} "
                               f"(or pass a path to a YAML file)")
        path = found[0]
    body = yaml.safe_load(path.read_text()) or {}
    allowed = {f.name for f in dataclasses.fields(ClusterProfile)}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ProfileError(f"profile {path}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    return ClusterProfile(**{"name": path.stem, **body})


def apply_overrides(profile: ClusterProfile, **values: Any) -> ClusterProfile:
    return dataclasses.replace(profile, **{k: v for k, v in values.items() if v is not None})


def check_text(key: str, value: str) -> None:
    if not SAFE_VALUE.match(value):
        raise ProfileError(f"{key}={value!r} contains characters that are not allowed in an sbatch directive")


def check_job_name(name: str) -> None:
    if not SAFE_JOB_NAME.match(name):
        raise ProfileError(f"job name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")


def check_profile(profile: ClusterProfile, cluster: str) -> None:
    """Everything that can be known before queueing. For SLURM, the partition and the node sizes
    are asked of sinfo."""
    for key in ("partition", "account", "qos", "constraint"):
        check_text(key, getattr(profile, key))
    for key, value in profile.sbatch_extra.items():
        check_text(f"sbatch_extra.{key}", f"{key}={value}")
    for key in ("time_min", "cpus_per_task", "nodes", "ntasks_per_node"):
        if getattr(profile, key) < 1:
            raise ProfileError(f"{key} must be at least 1, got {getattr(profile, key)}")
    if profile.gpus_per_node < 0 or profile.max_requeues < 0 or profile.signal_delay_s < 0:
        raise ProfileError("gpus_per_node, max_requeues and signal_delay_s cannot be negative")
    if profile.signal_delay_s >= profile.time_min * 60:
        raise ProfileError(
            f"time limit {profile.time_min} min is not longer than the warning signal delay "
            f"{profile.signal_delay_s} s: the job would be told to stop before it starts; "
            "raise --time or lower signal_delay_s"
        )
    if cluster == "slurm":
        check_against_sinfo(profile)


def sinfo_nodes() -> list[dict[str, Any]]:
    if shutil.which("sinfo") is None:
        raise ProfileError("sinfo not found: this machine is not a SLURM login node "
                           "(use --cluster local, or start a local cluster with slurm/cluster/start.sh)")
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], capture_output=True, text=True,
                          timeout=30)
    if done.returncode:
        raise ProfileError(f"sinfo failed ({done.stderr.strip()}): is the SLURM controller up?")
    nodes = []
    for line in done.stdout.splitlines():
        partition, node, cpus, memory, gres = line.split("|")
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        nodes.append({"partition": partition.rstrip("*"), "default": partition.endswith("*"), "node": node,
                      "cpus": int(cpus), "memory_mb": int(memory.rstrip("+")), "gpus": gpus})
    return nodes


def check_against_sinfo(profile: ClusterProfile) -> None:
    nodes = sinfo_nodes()
    partitions = sorted({n["partition"] for n in nodes})
    if profile.partition and profile.partition not in partitions:
        raise ProfileError(f"partition {profile.partition!r} does not exist; sinfo lists: {', '.join(partitions)}")
    chosen = [n for n in nodes if n["partition"] == profile.partition or (not profile.partition and n["default"])]
    if not chosen:
        raise ProfileError("no default partition: set `partition` in the profile")
    cpus_needed = profile.ntasks_per_node * profile.cpus_per_task
    fitting = [n for n in chosen if n["cpus"] >= cpus_needed and n["gpus"] >= profile.gpus_per_node
               and n["memory_mb"] >= profile.mem_gb * 1024]
    where = profile.partition or "the default partition"
    if not fitting:
        biggest = max(chosen, key=lambda n: (n["cpus"], n["gpus"], n["memory_mb"]))
        raise ProfileError(
            f"no node in {where} has {cpus_needed} CPUs, {profile.gpus_per_node} GPUs and {profile.mem_gb} GB "
            f"(largest: {biggest['cpus']} CPUs, {biggest['gpus']} GPUs, {biggest['memory_mb'] // 1024} GB); "
            "lower --ntasks-per-node, cpus_per_task, --gpus-per-node or mem_gb"
        )
    if len(fitting) < profile.nodes:
        raise ProfileError(f"{profile.nodes} nodes requested but {where} has only {len(fitting)} that fit")
