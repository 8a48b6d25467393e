"""What a PPD run builds for itself when it is not given them: shapes data with partial captions,
a base t2i run, an attribute reader and the preference-pair shards, in RUN/prereqs/.

Each step is the ordinary command a user would type (`scaleyard data build ...`, `scaleyard run
...`) in a subprocess, logged to RUN/prereqs/<step>.log. A step whose output is complete is
skipped; a t2i or attributes run cut short resumes from its checkpoint (`scaleyard run` into the
same folder), and a data build that was cut short starts again (its shards are written into a
temporary folder and only moved into place when complete). So a killed ppd run picks up where
its prerequisites stopped. Only rank 0 builds; the other ranks wait for RUN/prereqs/done.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from scaleyard.data_loaders.index import INDEX_FILE

# variables that make a child `scaleyard run` believe it is a rank of this run's process group
DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                  "TORCHELASTIC_MAX_RESTARTS", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")


def folders(run_dir: Path) -> dict[str, Path]:
    root = run_dir / "prereqs"
    return {"shapes": root / "shapes", "base": root / "base", "reader": root / "reader", "pairs": root / "pairs"}


def _cli(args: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ scaleyard {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "scaleyard.platform.cli", *args], stdout=out,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"prerequisite step `scaleyard {' '.join(args)}` failed (exit {done.returncode}); "
                           f"log {log}:\n{tail}")


def _built(folder: Path, splits: tuple[str, ...]) -> bool:
    return all((folder / s / INDEX_FILE).exists() for s in splits)


def _finished(run: Path) -> bool:
    return (run / "summary.json").exists()


def build_prerequisites(cfg: DictConfig, run_dir: Path, is_main: bool) -> dict[str, str]:
    """Paths of the base run, the reader run and the pair splits, building what is missing."""
    paths = folders(run_dir)
    marker = run_dir / "prereqs" / "done.json"
    if not is_main:
        while not marker.exists():
            time.sleep(2.0)
        return json.loads(marker.read_text())
    p = cfg.prereqs
    started = time.time()
    base, reader = cfg.model.base_run, cfg.model.reader_run
    logs = run_dir / "prereqs"
    if (not base or not reader) and not _built(paths["shapes"], ("train", "test")):
        _cli(["data", "build", "shapes", "--out", str(paths["shapes"]), "--limit", str(p.shapes_limit), "--overwrite",
              "--option", f"resolution={p.resolution}", "--option", f"partial_captions={p.partial_captions}"],
             logs / "shapes.log")
    data = [f"data.path={paths['shapes']}/train", f"data.eval_path={paths['shapes']}/test"]
    if not base:
        base = str(paths["base"])
        if not _finished(paths["base"]):
            _cli(["run", "t2i", "--preset", p.base_preset, *data, "model.channels=3",
                  f"model.image_size={p.resolution}", "eval.samples=0", f"run.seed={cfg.run.seed}",
                  *p.base_overrides, f"run.dir={base}"],
                 logs / "base.log")
    if not reader:
        reader = str(paths["reader"])
        if not _finished(paths["reader"]):
            _cli(["run", "attributes", "--preset", p.reader_preset, *data, f"run.seed={cfg.run.seed}",
                  *p.reader_overrides, f"run.dir={reader}"], logs / "reader.log")
    pairs = cfg.data.path and str(Path(cfg.data.path).parent)
    if not cfg.data.path:
        pairs = str(paths["pairs"])
        if not _built(paths["pairs"], ("train", "heldout")):
            s = cfg.pairs
            options = {"base": base, "reader": reader, "seed": s.seed, "users": s.users,
                       "heldout_users": s.heldout_users, "pairs_per_user": s.pairs_per_user, "shots": s.shots,
                       "samples": s.samples, "pool": s.pool, "steps": s.steps, "guidance": s.guidance}
            _cli(["data", "build", "ppd_pairs", "--out", pairs, "--overwrite", "--shard-size", "500",
                  *(f"--option={k}={v}" for k, v in options.items())], logs / "pairs.log")
    # seconds spent building, summed over launches (a resumed or repeated launch adds only its own)
    before = json.loads(marker.read_text()).get("seconds", 0.0) if marker.exists() else 0.0
    found = {"base_run": base, "reader_run": reader,
             "train": cfg.data.path or f"{pairs}/train", "heldout": cfg.data.eval_path or f"{pairs}/heldout",
             "seconds": round(before + time.time() - started, 1)}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(found, indent=2))
    return found
