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
