"""How the platform reaches a cluster without importing one: sweeps hand their runs to a
`Launcher`, which the command line builds (`scaleyard.slurm.launch.SubmititLauncher` for local
processes and SLURM) and injects. `platform/` never imports `slurm/` (DESIGN.md, Layers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RunRequest:
    """One run to start: job, preset and overrides (run.dir included), all checked already."""

    job: str
    preset: str
    overrides: list[str] = field(default_factory=list)
    run_dir: str = ""


class Launcher(Protocol):
    """Starts runs somewhere and says what they are doing."""

    world_size: int  # ranks of each run (nodes x tasks per node)
    gpu_memory_gb: float | None  # memory of one GPU there, for engine.name=auto; None when unknown
    runs_here: bool  # whether runs use this machine's hardware (its checks apply)

    def submit_array(self, runs: list[RunRequest], name: str, folder: Path, concurrency: int,
                     on_wait: Callable[[], None] | None = None) -> None:
        """Start `runs` as one array, at most `concurrency` at a time; `folder` keeps the launcher's
        own files. A launcher that must wait here for free slots calls `on_wait` while it does."""

    def state(self, run_dir: Path) -> str:
        """The run's state in SLURM's words (`scaleyard.platform.run_record.STATES`), or "" when this
        launcher never started it."""
