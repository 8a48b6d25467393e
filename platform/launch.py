"""Resolve a job's config and run it: in this process, or as N local processes (torch's elastic agent)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaleyard.platform.checkpoint import Checkpointer
from scaleyard.platform.config import (
    AUTO_LANES,
    ConfigError,
    check_batch,
    check_config,
    default_run_dir,
    differing_keys,
    resolve,
    to_yaml,
)  # fmt: skip
from scaleyard.platform.distributed import DistEnv, destroy_process_group, env_from_os
from scaleyard.platform.engines import check_engine, data_world_size
from scaleyard.platform.job import Job, get_job, saved_config
from scaleyard.platform.sampling import has_samples
from scaleyard.platform.stages import STAGES_DIR, prepare_stages, run_stages
from scaleyard.platform.tract import check_tract

log = logging.getLogger("scaleyard")
# Keys that may change when a run is resumed (extend it, change cadences); anything else would
# silently mix two different experiments in one folder.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every",
                     "train.ckpt_every_minutes", "train.keep_checkpoints", "data.num_workers", "data.shard_base",
                     "engine.tp_size")  # megatron checkpoints are laid out anew for another TP size
EXIT_PREEMPTED = 3


@dataclass
class Prepared:
    job: Job
    cfg: DictConfig
    preset: str
    overrides: list[str]
    stages: list = field(default_factory=list)  # PreparedStage: what runs before this run (platform/stages.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)


def prepare(job_name: str, overrides: list[str], preset: str | None = None, world_size: int = 1,
            gpu_memory_gb: float | None = None, runs_here: bool = True) -> Prepared:
    """Everything that can be checked before a process starts or a job is queued. Writes nothing.
    On GPUs `engine.name=auto` is resolved here by the planner (for `gpu_memory_gb`, default:
    this machine's GPU), so config.yaml records the engine, ZeRO stage and micro-batch that ran;
    the choice joins the overrides, so child processes and requeued jobs never plan again.
    `runs_here=False` (submitting to a cluster) skips checks of this machine's hardware."""
    job_cls = get_job(job_name)
    presets = job_cls.presets()
    if preset is None:
        preset = "default" if "default" in presets else ""
    if preset and preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for job {job_name}; presets: {', '.join(presets) or 'none'}")
    files = [job_cls.presets_dir() / f"{preset}.yaml"] if preset else []
    # `stages.<name>.<key>=<value>` configures a stage of the run (platform/stages.py), not the run
    to_stages = [o for o in overrides if o.startswith(f"{STAGES_DIR}.")]
    cfg = resolve(job_cls.Config, files, [o for o in overrides if o not in to_stages])
    check_config(cfg, job_cls.Config)
    # before planning (the model's shape may depend on them); joins the overrides as the plan does
    overrides = [*overrides, *adopt_saved_before(job_cls, cfg, overrides)]
    if job_cls.trains and cfg.engine.name == "auto":
        from scaleyard.platform.planner import device_memory_gb, resolve_auto

        if gpu_memory_gb is None and torch.cuda.is_available():
            gpu_memory_gb = device_memory_gb("cuda:0")
        if gpu_memory_gb:  # without GPUs auto stays auto: single or ddp by process count, at start-up
            planned = resolve_auto(job_cls, cfg, world_size, gpu_memory_gb)
            for key, value in planned.items():
                OmegaConf.update(cfg, key, value, merge=False)
            overrides = [*overrides, *(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                                       for key, value in planned.items())]
    if job_cls.trains:
        check_engine(cfg, world_size, runs_here, job_cls)
        data_world = data_world_size(cfg, world_size)
        if cfg.data.lanes == 0:
            lanes = choose_lanes(cfg, data_world)
            cfg.data.lanes = lanes
            overrides = [*overrides, f"data.lanes={lanes}"]
        check_batch(cfg, data_world)
        shape = job_cls.memory_shape(cfg) if cfg.train.activation_checkpointing else None
        if shape is not None and not shape.stacks:
            raise ConfigError(f"config key 'train.activation_checkpointing': job {job_name}'s memory_shape lists no "
                              "repeated blocks to recompute; turn it off (a job whose model has such blocks declares "
                              "them in JobParts.blocks and lists them as stacks in memory_shape)")
        check_tract(cfg, job_cls)
    job = job_cls()
    job.check(cfg, world_size)
    if not cfg.run.dir:
        cfg.run.dir = default_run_dir(job_name)
    # after the job's own checks (which see the inputs the user gave), before anything is written
    stages = prepare_stages(job, cfg, world_size, gpu_memory_gb, runs_here, to_stages)
    return Prepared(job, cfg, preset, list(overrides), stages)


def adopt_saved_before(job_cls: type[Job], cfg: DictConfig, overrides: list[str]) -> list[str]:
    """A run in `run.dir` saved before keys of `job_cls.saved_before` existed (a default that
    changed what the job does) resumes as it was trained: those keys take the values it had,
    unless the command line sets them (then the resume check refuses the different config, naming
    the values). Returns the adopted keys as overrides."""
    saved = Path(cfg.run.dir) / "config.yaml" if cfg.run.dir and job_cls.saved_before else None
    if saved is None or not saved.exists() or not (has_checkpoint(saved.parent)
                                                     or (saved.parent / "summary.json").exists()):
        return []
    old = OmegaConf.load(saved)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    adopted = []
    for key, value in job_cls.saved_before.items():
        if key not in given and OmegaConf.select(old, key, default=None) is None:
            OmegaConf.update(cfg, key, value, merge=False)
            adopted.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    if adopted:
        log.info("%s was saved before %s existed: resuming it as it was trained (%s)", saved.parent,
                 ", ".join(o.split("=")[0] for o in adopted), " ".join(adopted))
    return adopted


def choose_lanes(cfg: DictConfig, data_world: int) -> int:
    """`data.lanes=0` (auto): the lanes a resumed run already uses (its config.yaml), else the
    smallest multiple of the data-parallel world size that is also a multiple of 16, so the run
    can later resume on any world size dividing it (1, 2, 4, 8, 16 at least)."""
    saved = Path(cfg.run.dir) / "config.yaml" if cfg.run.dir else None
    if saved is not None and saved.exists():
        recorded = OmegaConf.load(saved).get("data", {}).get("lanes", 0)
        if recorded:
            return int(recorded)
    return math.lcm(AUTO_LANES, data_world)


def has_checkpoint(run_dir: Path) -> bool:
    return Checkpointer(run_dir / "checkpoints", keep=1).latest() is not None


def check_run_dir(prepared: Prepared) -> str:
    """What a launch into `run.dir` will do: 'new', 'resume', 'continue' (a finished run trained
    on to a larger train.steps) or 'finished'. Refuses a folder that holds a different run; a folder
    without a checkpoint is not a run yet (a start that failed), so its config may be fixed."""
    run_dir = prepared.run_dir
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return "new"
    changed = [k for k in differing_keys(_saved_with_new_defaults(saved, prepared), prepared.cfg)
               if k not in RESUMABLE_CHANGES]
    if changed:
        if not has_checkpoint(run_dir) and not has_samples(run_dir):
            log.info("%s has no checkpoint yet (an earlier start failed): starting it anew with the changed "
                     "keys %s", run_dir, ", ".join(changed))
            return "new"
        raise ConfigError(
            f"{run_dir} holds a run with a different config (keys {', '.join(changed)}); "
            f"choose another run.dir, or resume with the same settings{_saved_before_hint(saved, prepared, changed)}"
        )
    summary = read_summary(run_dir) if (run_dir / "summary.json").exists() else None
    if summary is None:
        return "resume" if has_checkpoint(run_dir) or has_samples(run_dir) else "new"
    if prepared.job.trains and int(summary.get("step", 0)) < prepared.cfg.train.steps:
        return "continue"
    return "finished"


def _saved_with_new_defaults(saved: Path, prepared: Prepared) -> DictConfig:
    """A run's config.yaml with the defaults of keys added to the job's Config since it was
    written (e.g. optim.tract): a run started before a new option must still resume, and it
    differs only if the new key is set to something else than its default."""
    old = OmegaConf.load(saved)
    try:
        return saved_config(type(prepared.job), old)  # keys whose default changed read as the run had them
    except OmegaConfBaseException:  # a key since removed from the Config: compare as saved (it differs)
        return old


def _saved_before_hint(saved: Path, prepared: Prepared, changed: list[str]) -> str:
    """For keys the run's config.yaml predates and whose default has changed since (Job.saved_before),
    set otherwise on the command line: the values the run was trained with."""
    old = OmegaConf.load(saved)
    keys = [key for key in changed if key in prepared.job.saved_before
            and OmegaConf.select(old, key, default=None) is None]
    if not keys:
        return ""
    values = " ".join(f"{key}={str(v).lower() if isinstance(v, bool) else v}"
                      for key, v in ((key, prepared.job.saved_before[key]) for key in keys))
    return (f". {saved} predates {', '.join(keys)}, whose defaults have changed since: the run was trained with "
            f"{values}, which a resume without these keys on the command line takes")


def continuation_notice(prepared: Prepared) -> str:
    """What continuing a finished run to more steps means for its learning rate."""
    done, steps, optim = read_summary(prepared.run_dir)["step"], prepared.cfg.train.steps, prepared.cfg.optim
    if optim.schedule == "constant" and optim.warmup_steps <= done:
        return (f"continuing {prepared.run_dir} from step {done} to {steps}: optim.schedule=constant, so this is "
                f"the same run as one trained for {steps} steps from the start")
    return (f"continuing {prepared.run_dir} from step {done} to {steps}: optim.schedule={optim.schedule} decays over "
            f"train.steps, so steps 1-{done} followed the {done}-step schedule and the rest follows the {steps}-step "
            f"one from step {done} on (the learning rate jumps there). This is NOT the run you would get training "
            f"{steps} steps from the start; for scaling studies use optim.schedule=constant (or a fresh run.dir)")


def write_config(prepared: Prepared) -> None:
    """config.yaml of the run; the summary of a finished run that is being continued is kept
    beside it as summary.step_<N>.json."""
    run_dir = prepared.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = run_dir / "summary.json"
    if summary.exists() and check_run_dir(prepared) == "continue":
        summary.rename(run_dir / f"summary.step_{read_summary(run_dir)['step']:08d}.json")
    target = run_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(prepared.cfg))
    tmp.rename(target)


def run_here(prepared: Prepared, env: DistEnv | None = None) -> dict:
    """Run one rank of the job in this process: first the stages it needs (platform/stages.py),
    then the run itself."""
    env = env or env_from_os()
    try:
        run_stages(prepared.stages, env, prepared.cfg.engine.backend if prepared.job.trains else "auto")
        return run_one(prepared, env)
    finally:
        destroy_process_group()


def run_one(prepared: Prepared, env: DistEnv) -> dict:
    """One rank of one run, logging also to run_dir/logs/rank<R>.log and recording how it ended in
    run_dir/logs/rank<R>.json (what `scaleyard status` and `logs` read)."""
    from scaleyard.platform.run_record import RankRecord
    from scaleyard.platform.trainer import Preempted, Trainer

    with RankRecord(prepared.run_dir, env.rank, env.world_size, stop=Preempted):
        if prepared.job.trains:
            return Trainer(prepared.job, prepared.cfg, env).run()
        from scaleyard.platform.sampling import run_sampling

        return run_sampling(prepared.job, prepared.cfg, env)


def run_local(prepared: Prepared, nproc: int) -> int:
    """N local processes through torch's elastic agent (torchrun's engine, gloo on CPU), run in
    this process; returns the exit code: 3 when a stop signal (USR1, USR2, TERM) sent to this
    process made the ranks checkpoint and stop.

    The agent runs here rather than as a `torchrun` child: that child would import torch a second
    time (about 3.5 CPU-seconds per launch, before any rank starts). The agent is told to leave
    TERM alone (TORCHELASTIC_SIGNALS_TO_HANDLE), and it has no handler for USR1/USR2, so those
    three are forwarded to the ranks themselves, which finish their step, agree, checkpoint and
    exit, as a SLURM job's ranks do."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(  # what `torchrun --standalone --nproc_per_node=N` sets up
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    args = ("-m", "scaleyard.platform.cli", "run", prepared.job.name, "--preset", prepared.preset or "",
            *prepared.overrides, f"run.dir={prepared.cfg.run.dir}")
    with _agent_environment(), _forwarded_stop_signals() as forwarded:
        try:
            elastic_launch(config, sys.executable)(*args)
            code = 0
        except ChildFailedError as failed:
            # the rank that failed first keeps its own code (2: bad input, 3: stopped); the agent then
            # kills the others, whose codes are negative
            code = max(failure.exitcode for failure in failed.failures.values())
            code = code if code > 0 else 1  # every rank killed by a signal: torchrun's exit code too
        except SignalException as interrupted:  # INT, HUP, QUIT: the agent has stopped the ranks
            log.error("stopped by %s without a checkpoint", signal.Signals(interrupted.sigval).name)
            code = 128 + interrupted.sigval
    if forwarded and code != 0:
        log.warning("the ranks stopped on %s after checkpointing; resume with the same command",
                    signal.Signals(forwarded[0]).name)
        return EXIT_PREEMPTED
    return code


@contextlib.contextmanager
def _agent_environment() -> Iterator[None]:
    """The environment the agent passes on to the ranks, and which signals it handles itself;
    both, and the handlers it installs, as they were afterwards."""
    # without OMP_NUM_THREADS=1, ranks fight over the cores (5-40x slower)
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    agent_signals = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    handlers = {sig: signal.getsignal(sig) for sig in agent_signals}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(sig.name for sig in agent_signals)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _forwarded_stop_signals() -> Iterator[list[int]]:
    """USR1, USR2 and TERM to this process go on to its children (the ranks); yields the list of
    those that came."""
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        for pid in _child_pids(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        yield forwarded
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (the ranks the elastic agent started), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name may hold spaces or parentheses: fields after the last ')' are fixed
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                children.append(int(stat.parent.name))
    return children


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
