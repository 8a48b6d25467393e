"""`scaleyard sample RUN`: generate from a trained run.

Jobs whose samples are drawn by a sampling job of their own (`Job.sample_job`, e.g. t2i ->
image_sample) go through the launch path of every run (`scaleyard run`: a run folder at --out,
--nproc local ranks, resumable); the others write their samples in this process
(`Job.write_samples`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_sample_parser(sub: Any) -> None:
    sample = sub.add_parser("sample", help="generate from a trained run (latest checkpoint, EMA weights)")
    sample.add_argument("run", help="a run folder (holds config.yaml and checkpoints/)")
    sample.add_argument("--out", required=True,
                        help="output: a file (rows.csv, mols.sdf, grid.png) or, for image runs, a folder")
    sample.add_argument("--rows", type=int, default=None, help="rows to generate (with --impute: at most this many)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--impute", default=None, help="columns to fill in, COL[,COL]; the others come from --known")
    sample.add_argument("--known", default=None, help="known rows: a .csv/.parquet file or a split folder")
    sample.add_argument("--target", action="append", default=None, metavar="PROP=VALUE",
                        help="guide samples toward a property value (repeatable; jobs with guidance, e.g. tfg_flow)")
    sample.add_argument("--prompt", "--question", dest="prompt", action="append", default=None,
                        help="what to generate for: captions (t2i, repeatable; ppd) or a question (fspo)")
    sample.add_argument("--prompts", default=None, help="image runs: a text file, one prompt a line")
    sample.add_argument("--shots", default=None,
                        help="a JSON file of one user's examples (fspo: shots; ppd: preference pairs)")
    sample.add_argument("--n", type=int, default=None, help="image runs: images per prompt (default 4)")
    sample.add_argument("--steps", type=int, default=None, help="image runs: sampler steps (default 30)")
    sample.add_argument("--sampler", default=None, help="image runs: euler | heun | ddim | srds")
    sample.add_argument("--guidance", type=float, default=None,
                        help="image runs: classifier-free guidance scale (default: the run's eval.guidance)")
    sample.add_argument("--nproc", type=int, default=1, help="image runs: local ranks (gloo on CPU)")
    sample.add_argument("--job", default=None, help="the run's job, when the folder cannot tell (no summary.json)")
    sample.add_argument("overrides", nargs="*",
                        help="image runs: more image_sample keys, e.g. srds.tolerance=1e-4 safe.negation=DIR")
    sample.set_defaults(func=cmd_sample)


def parse_targets(items: list[str]) -> dict[str, float]:
    targets: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            targets[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--target {item!r}: expected PROPERTY=NUMBER, e.g. --target gap=0.25") from None
    return targets


def sampling_job_overrides(run: Path, args: argparse.Namespace) -> list[str]:
    """The sampling job's config keys for the command line's flags (prompts quoted as JSON strings,
    which YAML reads back unchanged whatever punctuation they hold)."""
    overrides = [f"source={run}", f"run.dir={args.out}", f"seed={args.seed}"]
    if args.prompt:
        overrides.append("prompts=[" + ", ".join(json.dumps(p) for p in args.prompt) + "]")
    flags = {"prompts_file": args.prompts, "n": args.n, "steps": args.steps, "sampler": args.sampler,
             "guidance": args.guidance}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return [*overrides, *args.overrides]


def cmd_sample(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from scaleyard.platform.cli import cmd_run
    from scaleyard.platform.export import run_job_name
    from scaleyard.platform.job import SampleRequest, get_job, saved_config
    from scaleyard.platform.weights import load_run_weights

    targets = parse_targets(args.target or [])  # a malformed --target fails before any weights load
    run = Path(args.run)
    config_file = run / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist: RUN must be a run folder written by `scaleyard run`")
    job_cls = get_job(args.job or run_job_name(run))
    if job_cls.sample_job:
        return cmd_run(argparse.Namespace(job=job_cls.sample_job, preset=None, nproc=args.nproc,
                                          overrides=sampling_job_overrides(run, args)))
    image_flags = [f"--{k}" for k in ("prompts", "n", "steps", "sampler", "guidance") if getattr(args, k) is not None]
    if image_flags or args.overrides or args.nproc > 1 or len(args.prompt or []) > 1:
        given = image_flags + (["--nproc"] if args.nproc > 1 else []) + list(args.overrides)
        given += ["a second --prompt"] if len(args.prompt or []) > 1 else []
        print(f"error: {', '.join(given)}: only for runs of jobs with a sampling job (t2i); {run} is a "
              f"{job_cls.name} run", file=sys.stderr)
        return 2
    cfg = saved_config(job_cls, OmegaConf.load(config_file))  # as the run was trained
    if not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step_*/meta.json")):
        raise FileNotFoundError(f"{run}/checkpoints holds no complete checkpoint; train the run first "
                                f"(`scaleyard run {job_cls.name} run.dir={run}`)")
    loaded = load_run_weights(run)  # any engine's checkpoint; EMA weights when the run kept them
    impute = tuple(c.strip() for c in args.impute.split(",") if c.strip()) if args.impute else ()
    request = SampleRequest(out=Path(args.out), rows=args.rows or 0, seed=args.seed, impute=impute,
                            known=args.known or "", target=targets, prompt=(args.prompt or [""])[0],
                            shots=args.shots or "")
    try:
        summary = job_cls().write_samples(cfg, loaded.weights, loaded.job_state, request)
    except NotImplementedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"run": str(run), "step": loaded.step, "ema": loaded.ema, "out": args.out, **summary}))
    return 0
