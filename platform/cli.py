"""`scaleyard`: jobs, config, run, submit, status, cancel, logs, sweep, scaling, models, data."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from scaleyard.platform.config import ConfigError, to_yaml


def _setup_logging(stream=None) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=stream or sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _machine_readable(args: argparse.Namespace) -> bool:
    """Commands whose stdout is data (YAML, JSON): everything else they or the libraries they
    load print (DeepSpeed's accelerator warning, log lines) goes to stderr."""
    return args.command == "config" or bool(getattr(args, "json", False))


def cmd_jobs(args: argparse.Namespace) -> int:
    from scaleyard.platform.job import job_summary, registered

    for name, found in sorted(registered().items()):
        origin = "" if found.source.startswith("module scaleyard.jobs.") else f"  [{found.source}]"
        print(f"{name:16s} presets: {', '.join(found.job.presets()) or '-':24s} {job_summary(found.job)}{origin}")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from scaleyard.platform.scaffold import new_job

    folder, names, files = new_job(args.name, Path(args.dir) if args.dir else None)
    print(f"wrote job {names.job!r} (package {names.pkg}, distribution {names.dist}) in {folder}:")
    for path in files:
        print(f"  {path}")
    print(f"next:\n  pip install -e {folder}            # registers it (entry point scaleyard.jobs)\n"
          f"  scaleyard run {names.job} --preset tiny\n  pytest {folder / 'tests'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from scaleyard.platform.launch import prepare

    prepared = prepare(args.job, args.overrides, args.preset, args.nproc)
    print(to_yaml(prepared.cfg), end="", file=args.result)
    return 0


def _claim_run_dir(prepared) -> str:
    """'new' / 'resume' / 'continue' (config.yaml written) or 'finished' (said so); refuses a
    folder that holds a different run."""
    from scaleyard.platform.launch import check_run_dir, continuation_notice, read_summary, write_config

    state = check_run_dir(prepared)
    if state == "finished":
        print(f"{prepared.run_dir} already finished: {json.dumps(read_summary(prepared.run_dir))}")
        return state
    if state == "continue":
        print(continuation_notice(prepared), file=sys.stderr)
    write_config(prepared)
    return state


def cmd_run(args: argparse.Namespace) -> int:
    from scaleyard.platform.distributed import env_from_os
    from scaleyard.platform.launch import EXIT_PREEMPTED, prepare, run_here, run_local
    from scaleyard.platform.trainer import Preempted

    env = env_from_os()
    world = env.world_size if env.distributed else args.nproc
    prepared = prepare(args.job, args.overrides, args.preset, world)
    if env.distributed:  # a rank started by torchrun or srun: the launcher already checked the folder
        try:
            run_here(prepared, env)
        except Preempted as stop:
            logging.getLogger("scaleyard").warning("%s", stop)
            return EXIT_PREEMPTED
        return 0
    state = _claim_run_dir(prepared)
    if state == "finished":
        return 0
    said = {"new": "new run", "resume": "resuming", "continue": "continuing to more steps"}[state]
    print(f"run folder: {prepared.run_dir} ({said})", flush=True)
    if args.nproc > 1:
        return run_local(prepared, args.nproc)
    try:
        summary = run_here(prepared)
    except Preempted as stop:
        logging.getLogger("scaleyard").warning("%s", stop)
        return EXIT_PREEMPTED
    print(json.dumps(summary, indent=1))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import shlex
    import tempfile

    from scaleyard.platform.launch import prepare
    from scaleyard.slurm.launch import make_executor, sbatch_script, submit_run
    from scaleyard.slurm.profiles import apply_overrides, check_job_name, check_profile, load_profile
    from scaleyard.slurm.task import RunTask

    profile = load_profile(args.profile or "local")
    profile = apply_overrides(profile, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                              ntasks_per_node=args.ntasks_per_node, time_min=args.time)
    prepared = prepare(args.job, args.overrides, args.preset, profile.world_size,
                       gpu_memory_gb=profile.gpu_memory_gb or None, runs_here=args.cluster == "local")
    prepared.cfg.run.dir = str(prepared.run_dir.absolute())  # the job may start in another directory
    run_dir = str(prepared.run_dir)
    task = RunTask(args.job, prepared.preset, [*prepared.overrides, f"run.dir={run_dir}"], run_dir)
    job_name = args.name or f"sy-{args.job}"
    check_job_name(job_name)
    check_profile(profile, args.cluster)  # before anything is written or queued
    if args.dry_run:
        with tempfile.TemporaryDirectory() as scratch:
            executor = make_executor(args.cluster, profile, Path(scratch) / "slurm", job_name)
            script = sbatch_script(executor).replace(scratch, run_dir)
        # The overrides travel pickled, never through the shell; shown here JSON-quoted.
        print(f"# scaleyard: job {json.dumps(args.job)}, {profile.world_size} task(s), run folder "
              f"{shlex.quote(run_dir)}\n# overrides: {json.dumps(task.overrides)}")
        print(script)
        return 0
    if _claim_run_dir(prepared) == "finished":
        return 0
    submission = submit_run(task, args.cluster, profile, job_name)
    where = f"job {submission.job_id} to SLURM" if args.cluster == "slurm" else f"local process {submission.job_id}"
    print(f"submitted {where} ({profile.world_size} task(s)); run folder {run_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from scaleyard.platform.sweep import annotate
    from scaleyard.slurm.monitor import format_table, run_dirs, run_status

    if not Path(args.path).exists():
        raise FileNotFoundError(f"{args.path} does not exist: give a run folder or a folder of runs")
    rows = annotate([run_status(d) for d in run_dirs(Path(args.path))])
    print(json.dumps(rows, indent=1) if args.json else format_table(rows), file=args.result)
    if not args.json:
        from scaleyard.platform.sweep_mobo_report import status_lines

        for line in status_lines(Path(args.path)):  # a mobo sweep: rounds, hypervolume, Pareto front
            print(line, file=args.result)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from scaleyard.slurm.monitor import cancel, run_dirs

    for run_dir in run_dirs(Path(args.path)):
        what = cancel(run_dir)
        print(f"cancelled {what} ({run_dir})" if what else f"{run_dir}: not running, nothing to cancel")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from scaleyard.slurm.monitor import ended, follow, log_files

    run = Path(args.run)
    for line in follow(log_files(run, args.rank), (lambda: ended(run)) if args.follow else (lambda: True)):
        print(line, flush=True)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from scaleyard.platform.scaling_report import load_runs, write_report

    source = Path(args.path)
    out = Path(args.out) if args.out else (source.parent if source.suffix == ".csv" else source) / "scaling"
    report = write_report(load_runs(source), out, bootstrap=args.bootstrap, seed=args.seed)
    print(f"{report['runs']} runs fitted; wrote {out}/scaling.md, scaling.json, scaling.png")
    print((out / "scaling.md").read_text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from scaleyard.platform.export import FORMATS, export, job_export

    out = Path(args.out) if args.out else None
    if args.format not in FORMATS:  # a job's own format (Job.export_formats), e.g. the logic job's c
        print(json.dumps(job_export(Path(args.run), args.format, out, args.step, args.ema, args.job)))
        return 0
    out, digest = export(Path(args.run), args.format, out, args.step, args.ema)
    print(f"wrote {out} (weights sha256 {digest})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from scaleyard.platform.job import get_job, registry
    from scaleyard.platform.presets_report import format_rows

    jobs = {args.job: get_job(args.job)} if args.job else dict(sorted(registry().items()))
    failed = False
    for name, job in jobs.items():
        try:
            rows = job.model_presets()
        except Exception as err:  # one job's broken hook must not hide the others
            print(f"error: job {name}: model_presets() failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed = True
            continue
        print(f"{name}: {len(rows)} model preset{'s' if len(rows) != 1 else ''}")
        print("\n".join(format_rows(rows)) if rows else "  (none declared: Job.model_presets)")
        print()
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from scaleyard.platform.planner import recommend
    from scaleyard.platform.planner_report import format_plan, load_config, plan_json

    job_cls, cfg = load_config(args.job, args.overrides, args.preset)
    plan = recommend(job_cls, cfg, args.gpus, args.gpu_memory, gpu=args.gpu, gpus_per_node=args.gpus_per_node)
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(plan), file=args.result)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.spec == "report" and not Path("report").exists():  # `scaleyard sweep report SWEEP`
        from scaleyard.platform.sweep_mobo_report import write_report

        if len(args.overrides) != 1:
            raise ConfigError("usage: scaleyard sweep report SWEEP_FOLDER (a strategy: mobo sweep)")
        report = write_report(Path(args.overrides[0]), Path(args.dir) if args.dir else None)
        print(f"{report['runs']} runs, front {report['front']}, hypervolume {report['hypervolume']}; wrote "
              f"{report['out']}/pareto.png, pareto.md, pareto.csv")
        print((Path(report["out"]) / "pareto.md").read_text())
        return 0
    from scaleyard.platform.sweep import SPEC_FILE, SweepProgress, annotate, launch, resolve_target
    from scaleyard.slurm.launch import SubmititLauncher
    from scaleyard.slurm.monitor import format_table, run_dirs, run_status

    spec, sweep_dir = resolve_target(args.spec, args.overrides, args.preset, args.concurrency, args.dir)
    launcher = SubmititLauncher.from_profile(args.cluster, args.profile)  # the platform reaches SLURM through it
    progress = SweepProgress(sweep_dir, launcher) if args.wait else None
    result = launch(spec, sweep_dir, launcher, on_wait=progress.tick if progress else None)
    print(f"sweep {sweep_dir}: {result['runs']} runs, submitted {len(result['submitted'])}, "
          f"skipped {len(result['skipped'])} (finished or queued); resume with "
          f"`scaleyard sweep {sweep_dir / SPEC_FILE}`", flush=True)
    if progress is None:
        return 0
    all_completed = progress.wait()
    print(format_table(annotate([run_status(d) for d in run_dirs(sweep_dir)])))
    return 0 if all_completed else 1


def cmd_data_build(args: argparse.Namespace) -> int:
    from scaleyard.data_loaders.builders import build
    from scaleyard.platform.job import builder_networks

    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "0123456789-[{tf" and value not in ("") else value
    written = build(args.name, args.out, shard_size=args.shard_size, limit=args.limit,
                    overwrite=args.overwrite, networks=builder_networks, **options)
    for split, index in written.items():
        print(f"{args.out}/{split}: {index.total} samples in {len(index.shards)} shards")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from scaleyard.data_loaders.index import INDEX_FILE, check_shards, load_index

    root = Path(args.dir)
    folders = [root] if (root / INDEX_FILE).exists() else sorted(p.parent for p in root.glob(f"*/{INDEX_FILE}"))
    if not folders:
        load_index(root)  # raises the explanatory error
    for folder in folders:
        index = load_index(folder)
        check_shards(index, verify_hashes=args.verify)
        print(f"{folder}: builder={index.builder} v{index.version} split={index.split} "
              f"samples={index.total} shards={len(index.shards)}{' (hashes verified)' if args.verify else ''}")
        for name, kind in index.schema.items():
            print(f"  {name}: {kind}")
    return 0


def cmd_data_index(args: argparse.Namespace) -> int:
    from scaleyard.data_loaders.indexer import index_shards

    index = index_shards(args.source, args.out, size=args.size, crop=args.crop, caption=args.caption,
                         workers=args.workers, force=args.force, decode_check=not args.no_decode_check)
    corrupt, incomplete = index.extra["corrupt"], index.extra["incomplete"]
    print(f"{args.out}/index.json: {index.total} samples in {len(index.shards)} shards of {args.source} "
          f"(read where they are; nothing copied)")
    for name, kind in index.schema.items():
        print(f"  {name}: {kind}")
    for name in [*corrupt["members"][:20], *(f"{u}: {p}" for u, p in index.extra["truncated_shards"].items())]:
        print(f"  corrupt: {name}")
    print(f"corrupt members: {corrupt['count']} (skipped when read); samples lacking a field: "
          f"{ {k: v['count'] for k, v in incomplete.items()} or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from scaleyard.platform.cli_encode import add_encode_parser
    from scaleyard.platform.cli_sample import add_sample_parser

    parser = argparse.ArgumentParser(prog="scaleyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("jobs", help="list registered jobs").set_defaults(func=cmd_jobs)
    new = sub.add_parser("new", help="write a new job package (registered through its entry point)")
    new.add_argument("name", help="job name, also the package name: lower-case letters, digits, underscores")
    new.add_argument("--dir", default=None, help="folder to write (default: ./NAME); must be new or empty")
    new.set_defaults(func=cmd_new)

    def job_command(name: str, help_text: str, func, local_processes: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job")
        p.add_argument("overrides", nargs="*", help="OmegaConf dotlist, e.g. optim.lr=3e-4 train.steps=100")
        p.add_argument("--preset", default=None, help="YAML preset beside the job (default: 'default')")
        if local_processes:
            p.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU)")
        p.set_defaults(func=func)
        return p

    job_command("config", "print the resolved config", cmd_config)
    job_command("run", "run a job here (or as --nproc local processes)", cmd_run)
    plan = job_command("plan", "per-GPU memory and FLOPs of each engine; the cheapest that fits, and why", cmd_plan,
                       local_processes=False)
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the run (all nodes)")
    plan.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU in GB, e.g. 80")
    plan.add_argument("--gpu", default="H100", help="GPU model for the step-time estimate (its peak TFLOP/s)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node")
    plan.add_argument("--json", action="store_true")

    submit = job_command("submit", "queue a job through submitit (local processes or SLURM)", cmd_submit,
                         local_processes=False)
    submit.add_argument("--cluster", choices=("local", "slurm"), default="local")
    submit.add_argument("--profile", default=None, help="cluster profile name or YAML path (default: local)")
    submit.add_argument("--nodes", type=int, default=None)
    submit.add_argument("--gpus-per-node", type=int, default=None)
    submit.add_argument("--ntasks-per-node", type=int, default=None)
    submit.add_argument("--time", type=int, default=None, help="time limit in minutes")
    submit.add_argument("--name", default=None, help="job name (letters, digits, . _ -)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script; queue nothing")

    status = sub.add_parser("status", help="runs with their state (SLURM's words; FAILED with the reason), step, "
                                           "loss, headline metric, swept values, requeues; * marks a sweep's best")
    status.add_argument("path", nargs="?", default="runs", help="a run folder or a folder of runs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    cancel = sub.add_parser("cancel", help="cancel the runs of a run or sweep folder (scancel, or TERM to local ranks)")
    cancel.add_argument("path")
    cancel.set_defaults(func=cmd_cancel)
    logs = sub.add_parser("logs", help="the log of one rank of a run (submitted or local)")
    logs.add_argument("run")
    logs.add_argument("--rank", type=int, default=0)
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=cmd_logs)

    models = sub.add_parser("models", help="every job's model presets with exact parameter counts and FLOPs")
    models.add_argument("job", nargs="?", default=None, help="only this job's presets")
    models.set_defaults(func=cmd_models)
    exp = sub.add_parser("export", help="consolidate a run's checkpoint (any engine) into one weights file")
    exp.add_argument("run")
    exp.add_argument("--format", default="safetensors",
                     help="safetensors, or a format of the run's job (Job.export_formats; logic: c)")
    exp.add_argument("--out", default=None, help="file to write (default RUN/export/step_N.safetensors)")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    exp.add_argument("--ema", action="store_true", help="the EMA weights instead of the trained ones")
    exp.add_argument("--job", default=None, help="the run's job, when the folder cannot tell (no summary.json)")
    exp.set_defaults(func=cmd_export)
    sweep = sub.add_parser("sweep", help="launch (or resume) a sweep as one job array: from a YAML spec, or "
                                          "Hydra-style from the command line (JOB optim.lr=1e-3,3e-3 ...)")
    sweep.add_argument("spec", help="a sweep spec (.yaml), or a job name followed by overrides; `sweep report "
                                    "SWEEP` writes a mobo sweep's Pareto plot and table (to SWEEP/report or --dir)")
    sweep.add_argument("overrides", nargs="*", help="with a job: KEY=A,B,... is an axis, KEY=VALUE part of the base")
    sweep.add_argument("--preset", default=None, help="with a job: its preset (default: 'default')")
    sweep.add_argument("--concurrency", type=int, default=None, help="with a job: runs at a time (default 4)")
    sweep.add_argument("--dir", default=None, help="sweep folder (default: runs/sweeps/<spec name>, the spec's "
                                                   "own sweep folder, or runs/sweeps/<job>/<time>)")
    sweep.add_argument("--cluster", choices=("local", "slurm"), default="local")
    sweep.add_argument("--profile", default=None)
    sweep.add_argument("--wait", action="store_true", help="print progress and an ETA; return when every run "
                                                           "has ended (exit 1 unless all completed)")
    sweep.set_defaults(func=cmd_sweep)

    scaling = sub.add_parser("scaling", help="fit scaling laws to a sweep folder or a CSV of runs")
    scaling.add_argument("path")
    scaling.add_argument("--out", default=None, help="report folder (default: <path>/scaling)")
    scaling.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% intervals")
    scaling.add_argument("--seed", type=int, default=0)
    scaling.set_defaults(func=cmd_scaling)

    data = sub.add_parser("data", help="build and inspect WebDataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    b = data_sub.add_parser("build", help="build a dataset's shards from its real source")
    b.add_argument("name")
    b.add_argument("--out", required=True)
    b.add_argument("--shard-size", type=int, default=1000)
    b.add_argument("--limit", type=int, default=None, help="at most this many samples per split")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--option", action="append", default=[], help="builder option KEY=VALUE, e.g. resolution=64")
    b.set_defaults(func=cmd_data_build)
    i = data_sub.add_parser("info", help="describe a dataset folder")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256")
    i.set_defaults(func=cmd_data_info)
    x = data_sub.add_parser("index", help="index shards written elsewhere (img2dataset-style) to train on them "
                                          "where they lie")
    x.add_argument("source", help="a folder of .tar shards, a pattern 'shards/{000000..000099}.tar', or URLs "
                                  "webdataset opens ('pipe:aws s3 cp s3://b/{000..009}.tar -')")
    x.add_argument("--out", required=True, help="folder for index.json (use it as data.path)")
    x.add_argument("--size", type=int, default=256, help="side of the square RGB images the reader produces")
    x.add_argument("--crop", choices=("center", "random"), default="center",
                   help="after resizing the shorter side: centre crop, or a random crop seeded per sample")
    x.add_argument("--caption", default="txt", help="caption source: a member extension (txt) or json:KEY")
    x.add_argument("--workers", type=int, default=0, help="parallel scanning processes (0: one per CPU, at most 16)")
    x.add_argument("--force", action="store_true", help="replace an existing index.json in --out")
    x.add_argument("--no-decode-check", action="store_true",
                   help="read image headers only (faster; corrupt pixel data is then found, and skipped, in training)")
    x.set_defaults(func=cmd_data_index)
    add_encode_parser(data_sub)

    add_sample_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run classify --nproc 2 optim.lr=1e-3`);
    # argparse's intermixed mode does not work with subcommands, so collect the leftovers here.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.result = sys.stdout  # where a command's result goes (commands print data there)
    if _machine_readable(args):
        _setup_logging(sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):
            return _dispatch(args)
    _setup_logging()
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the clear, named errors of the data and job layers
        from scaleyard.data_loaders.index import DataError
        from scaleyard.platform.checkpoint_integrity import CheckpointError
        from scaleyard.platform.export import ExportError
        from scaleyard.platform.job import UnknownJobError

        if isinstance(err, DataError | UnknownJobError | ValueError | FileNotFoundError | ExportError
                      | CheckpointError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
