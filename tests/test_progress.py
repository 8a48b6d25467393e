"""Long commands show progress on a terminal and stay quiet in pipes and logs: `data build` and
`export` draw a tqdm bar when stderr is a TTY (a real pseudo-terminal here)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import scaleyard


def on_terminal(*args: str) -> tuple[int, str]:
    """The CLI with stderr on a pseudo-terminal; returns the exit code and what the terminal got."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    process = subprocess.Popen([sys.executable, "-m", "scaleyard.platform.cli", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=terminal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=120), shown.decode(errors="replace")


def test_data_build_draws_a_bar_only_on_a_terminal(tmp_path):
    code, shown = on_terminal("data", "build", "shapes", "--out", str(tmp_path / "tty"), "--limit", "60",
                              "--shard-size", "30")
    assert code == 0, shown
    assert "shapes/train: 100%" in shown and "60/60" in shown and "shapes/test: 100%" in shown
    piped = scaleyard("data", "build", "shapes", "--out", str(tmp_path / "pipe"), "--limit", "60")
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


@pytest.mark.slow  # CI budget: the data-build bar shows the same terminal check
def test_export_draws_a_bar_only_on_a_terminal(tmp_path, classify_args):
    run_dir = tmp_path / "run"
    done = scaleyard("run", "classify", "--preset", "tiny", *classify_args, "train.steps=4", f"run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    code, shown = on_terminal("export", str(run_dir), "--out", str(tmp_path / "tty.safetensors"))
    assert code == 0, shown
    assert "export step 4: 100%" in shown and "3/3" in shown
    piped = scaleyard("export", str(run_dir), "--out", str(tmp_path / "pipe.safetensors"))
    assert piped.returncode == 0 and "%|" not in piped.stderr, piped.stderr
