from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def scaleyard(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (as a user would run it)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "scaleyard.platform.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, **kw)


def scaleyard_in_process(*args: str) -> tuple[int, str]:
    """The CLI's own entry point in this process: (exit code, stderr). For refusals that happen
    before anything starts, it saves the Python start-up and imports (seconds) that `scaleyard`
    pays per call; one case of each kind still goes through a real subprocess."""
    from scaleyard.platform.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """A real Fashion-MNIST subset in shards: 2,400 train / 600 test, 200 per shard."""
    if not FASHION_SOURCE.exists():
        pytest.fail("Debian package dataset-fashion-mnist is missing: run `make test`, which installs it")
    from scaleyard.data_loaders.builders import build

    out = tmp_path_factory.mktemp("fmnist")
    build("fashion_mnist", out, shard_size=200, limit=2400)
    return out


@pytest.fixture(scope="session")
def classify_args(fmnist):
    """Overrides for a small, quick classify run on the subset."""
    return [f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test", "model.width=4", "model.hidden=16",
            "eval.max_samples=200", "data.lanes=4", "data.shuffle_block=32"]


def assert_sampling_uses(run: Path, weights: dict, out: Path, *overrides: str) -> None:
    """`scaleyard sample RUN` draws what these (exported, single-device) weights draw: the run's
    checkpoint, whatever engine wrote it, is read back to the same model. The reference drawing
    is done here by hand from the weights (same prompts, per-image noise, sampler and guidance)."""
    import numpy as np
    import torch
    from PIL import Image

    from scaleyard.jobs.image_sample.images import to_uint8
    from scaleyard.jobs.image_sample.job import noise_for
    from scaleyard.jobs.t2i.job import TextToImage, model_configs
    from scaleyard.jobs.t2i.loading import t2i_config
    from scaleyard.models.diffusion import flow

    code, err = scaleyard_in_process("sample", str(run), "--out", str(out), "--prompt", "a bag", "--prompt",
                                     "a coat", "--n", "2", "--steps", "3", *overrides)
    assert code == 0, err
    cfg = t2i_config(run)
    model = TextToImage(*model_configs(cfg)).eval()
    model.load_state_dict(weights)
    captions = ["a bag", "a bag", "a coat", "a coat"]
    d = model.denoiser.cfg
    with torch.no_grad():
        tokens, mask = model.encode(captions, torch.device("cpu"))
        null_tokens, null_mask = model.encode([""] * 4, torch.device("cpu"))
        predict = flow.conditioned(model.denoiser, tokens, mask, null_tokens, null_mask, float(cfg.eval.guidance))
        drawn = to_uint8(flow.integrate(predict, noise_for(list(range(4)), 0, (d.channels, d.image_size,
                                                                             d.image_size)), 3, "euler",
                                        cfg.model.process))
    for k in range(4):
        written = np.asarray(Image.open(out / "samples" / f"{k:06d}.png")).reshape(drawn[k].shape)
        assert np.abs(written.astype(int) - drawn[k]).max() <= 1, k  # float sums differ, pixels by a level at most


# --- processes a test module leaves running --------------------------------------------------
# A run, sweep or SLURM job a test does not wait for keeps training while later tests run: they
# slow down (one CI run saw a 2 s test take 68 s) and the leak itself is a defect of the test or
# of the code under test. Reported at the end of the session, naming the module. Under xdist each
# worker counts only processes whose command names its own temporary folder (the other worker's
# runs are not leaks), and hands its lines to the controller, which prints them.
_LEFT_RUNNING: list[str] = []


def _scaleyard_processes(marker: str) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if "scaleyard" in command and "pytest" not in command and marker in command:
            found[int(entry.name)] = command[:160]
    return found


@pytest.fixture(scope="module", autouse=True)
def no_processes_left_running(request, tmp_path_factory):
    marker = str(tmp_path_factory.getbasetemp()) if os.environ.get("PYTEST_XDIST_WORKER") else ""
    before = set(_scaleyard_processes(marker))
    yield
    left = {pid: command for pid, command in _scaleyard_processes(marker).items() if pid not in before}
    if left:
        _LEFT_RUNNING.append(f"{request.module.__name__}: " + "; ".join(f"pid {p}: {c}" for p, c in left.items()))


def pytest_sessionfinish(session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: the controller prints
        session.config.workeroutput["left_running"] = list(_LEFT_RUNNING)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    _LEFT_RUNNING.extend(getattr(node, "workeroutput", {}).get("left_running", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if _LEFT_RUNNING:
        terminalreporter.section("processes left running after their test module")
        for line in _LEFT_RUNNING:
            terminalreporter.write_line(line)


# --- module order for xdist ----------------------------------------------------------------------
# `make test` hands whole modules to its workers in collection order; a long module handed out last
# keeps one worker busy while the other idles. The longest ones (each 50-110 s of the default tier,
# `--durations=0` on 2 cores, 2026-12-02) therefore go first, longest first; the rest keep their
# alphabetical order. A stale list only costs balance, never a test.
LONGEST_MODULES = ("test_engines_megatron", "test_latents", "test_engines_deepspeed", "test_t2i_job", "test_fspo",
                   "test_job_authoring", "test_slurm", "test_tfg_flow", "test_run_folder",
                   "test_tabdiff", "test_new_job_engines", "test_resume", "test_signals", "test_multinode",
                   "test_ppd")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a rank kept
