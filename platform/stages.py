"""Stages: the runs and data builds a run needs before it can start (an SFT stage before IPO, a
base model and a reward reader before a preference fine-tune, property predictors before guided
sampling), trained or built into the run's own folder by the same platform.

A job lists them in `Job.stages(cfg)`, returning only the ones the config leaves to it (e.g. when
`model.init_from` is empty). `prepare` checks each stage's config as it checks the run's (before
anything is written or queued) and fills the named config keys with the stage's folder, so the
run's config.yaml records where its inputs came from and a resumed command resolves to the same
keys. Every rank then runs the stages, in order, before the run itself (`run_stages`), through the
same Trainer, engines and process group: a stage that finished is skipped, one that stopped
resumes from its checkpoint, so the whole chain is one resumable command under `run`, `--nproc`
and `submit` alike. Data builds run on rank 0 while the other ranks wait.

There is no workflow engine here on purpose: a chain of a few dependent runs in one allocation
is what a preference or guidance recipe needs, and what a job array or a DAG scheduler would add
(separate queueing, different resources per stage) is better served by submitting the stages as
runs of their own and passing their folders as config.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from scaleyard.platform.config import ConfigError

if TYPE_CHECKING:
    from scaleyard.platform.distributed import DistEnv
    from scaleyard.platform.launch import Prepared

log = logging.getLogger("scaleyard")
STAGES_DIR = "stages"
DONE_FILE = "stage.json"  # a finished data build: its builder and options
BUILD_POLL_S = 2.0  # how often ranks other than 0 look for a finished data build


@dataclass(frozen=True)
class Stage:
    """One prerequisite of a run: a training run of `job` (with `preset` and `overrides`) or a data
    build by builder `build` (with `options`), in `<run.dir>/stages/<name>`. `fills` maps config keys
    of the run to paths inside the stage's folder ("" = the folder itself, e.g. a run folder for
    `model.init_from`; "train" = a split of a build, e.g. for `data.path`)."""

    name: str
    fills: dict[str, str]
    job: str = ""
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    build: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if bool(self.job) == bool(self.build):
            raise ValueError(f"stage {self.name!r}: give exactly one of job= (a training run) or build= (a data build)")
        if not self.fills:
            raise ValueError(f"stage {self.name!r}: fills names no config key to receive the stage's folder")


def stage_dir(cfg: DictConfig, name: str) -> Path:
    """Where stage `name` of the run configured by `cfg` lives (for a job that points one stage's
    config at an earlier stage's folder)."""
    return Path(cfg.run.dir) / STAGES_DIR / name


@dataclass
class PreparedStage:
    stage: Stage
    folder: Path
    prepared: Prepared | None = None  # a training stage's checked config


def prepare_stages(job: Any, cfg: DictConfig, world_size: int, gpu_memory_gb: float | None,
                   runs_here: bool, overrides: list[str] = ()) -> list[PreparedStage]:
    """Check every stage the job asks for and fill the run's config keys with their folders.
    `overrides` are the command line's `stages.<name>.<key>=<value>`: `<key>=<value>` goes to stage
    `<name>` after the job's own overrides. Writes nothing. A stage folder that holds a different
    run is refused here, naming it."""
    from scaleyard.platform.launch import check_run_dir, prepare

    stages = job.stages(cfg)
    extra: dict[str, list[str]] = {stage.name: [] for stage in stages}
    for override in overrides:
        name, _, rest = override[len(STAGES_DIR) + 1:].partition(".")
        if name not in extra or "=" not in rest:
            said = f"this run's stages: {', '.join(extra)}" if extra else "this run has no stages"
            raise ConfigError(f"override {override!r}: expected stages.<stage>.<key>=<value>; {said}")
        extra[name].append(rest)
    prepared_stages = []
    for stage in stages:
        folder = stage_dir(cfg, stage.name)
        for key in stage.fills:
            if OmegaConf.select(cfg, key, default=None) is None:
                raise ConfigError(f"stage {stage.name!r} of job {job.name} fills config key {key!r}, which the "
                                  "job's config does not have")
        if stage.job:
            try:
                inner = prepare(stage.job, [*stage.overrides, *extra[stage.name], f"run.dir={folder}"], stage.preset,
                                world_size, gpu_memory_gb, runs_here)
                check_run_dir(inner)  # a folder holding another run fails now, not after queueing
            except ConfigError as err:
                raise ConfigError(f"stage {stage.name!r} ({stage.job} run in {folder}): {err}") from err
            prepared_stages.append(PreparedStage(stage, folder, inner))
        else:
            if extra[stage.name]:
                raise ConfigError(f"stage {stage.name!r} is a data build ({stage.build}); stages.{stage.name}.* "
                                  "overrides configure training stages only")
            _check_builder(stage, folder)
            prepared_stages.append(PreparedStage(stage, folder))
        for key, inside in stage.fills.items():
            OmegaConf.update(cfg, key, str(folder / inside) if inside else str(folder), merge=False)
    return prepared_stages


def _check_builder(stage: Stage, folder: Path) -> None:
    from scaleyard.data_loaders.builders import BUILDERS

    if stage.build not in BUILDERS:
        raise ConfigError(f"stage {stage.name!r}: unknown data builder {stage.build!r}; builders: {sorted(BUILDERS)}")
    done = folder / DONE_FILE
    if done.exists() and json.loads(done.read_text()) != json.loads(json.dumps(_build_record(stage))):
        raise ConfigError(f"stage {stage.name!r}: {folder} holds data built with other options "
                          f"({done.read_text().strip()}); choose another run.dir, or remove {folder} to rebuild it")


def _build_record(stage: Stage) -> dict[str, Any]:
    return {"builder": stage.build, "options": stage.options, "shard_size": stage.shard_size}


def run_stages(stages: list[PreparedStage], env: DistEnv, backend: str = "auto") -> None:
    """Run, on every rank and in order, the stages that have not finished (see the module doc).
    A stop signal inside a stage stops the whole command; the same command resumes it."""
    from scaleyard.platform.distributed import barrier, init_process_group
    from scaleyard.platform.launch import check_run_dir, run_one, write_config

    if stages and env.distributed:
        init_process_group(env, backend)
    for item in stages:
        if item.prepared is None:
            failed = item.folder.with_name(f"{item.folder.name}.failed")
            if env.rank == 0:
                failed.unlink(missing_ok=True)  # an earlier attempt's
            barrier()  # before any rank looks for it
            if env.rank == 0:
                try:
                    _build(item)
                except BaseException as err:  # the waiting ranks must not wait for ever
                    failed.parent.mkdir(parents=True, exist_ok=True)
                    failed.write_text(repr(err))
                    raise
            else:  # a build can outlast the process group's timeout: wait on the file, not a collective
                while not (item.folder / DONE_FILE).exists():
                    if failed.exists():
                        raise RuntimeError(f"stage {item.stage.name}: rank 0's data build failed: {failed.read_text()}")
                    time.sleep(BUILD_POLL_S)
            barrier()
            continue
        run_stages(item.prepared.stages, env, backend)
        state = check_run_dir(item.prepared)
        if state == "finished":
            log.info("stage %s: %s already finished", item.stage.name, item.folder)
            continue
        barrier()  # every rank has read the folder's state before rank 0 writes config.yaml
        if env.rank == 0:
            log.info("stage %s: %s %s (%s run)", item.stage.name, state, item.folder, item.stage.job)
            write_config(item.prepared)
        barrier()
        run_one(item.prepared, env)


def _build(item: PreparedStage) -> None:
    from scaleyard.data_loaders.builders import build
    from scaleyard.platform.job import builder_networks

    done = item.folder / DONE_FILE
    if done.exists():
        log.info("stage %s: data in %s already built", item.stage.name, item.folder)
        return
    log.info("stage %s: building %s data into %s", item.stage.name, item.stage.build, item.folder)
    # a build interrupted part-way starts again: each split is moved into place only when complete
    build(item.stage.build, item.folder, shard_size=item.stage.shard_size, overwrite=True,
          networks=builder_networks, **item.stage.options)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(_build_record(item.stage), sort_keys=True))
    tmp.rename(done)
