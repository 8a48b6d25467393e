"""scaleyard as a library: the wheel built from this checkout carries every subpackage, the
presets, profiles and `scaleyard new` templates, and works with the repository off the path;
(slow) installed from that wheel into a fresh venv (torch first), it runs a scaffolded job."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

CODE_FOLDERS = ("platform", "models", "jobs", "data_loaders", "slurm")
SHIPPED_SUFFIXES = (".py", ".yaml", ".tmpl")


def source_files() -> list[str]:
    """The checkout's files as git sees them (tracked + new, minus ignored), repo-relative."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps` in a copy of the checkout (building in place would write build/
    and egg-info into the repository while other processes use it)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in source_files():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (root / "dist").glob("scaleyard-*.whl")
    return found


def test_wheel_holds_every_module_preset_profile_and_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"scaleyard/{name}" for name in source_files()
                if name.split("/")[0] in CODE_FOLDERS and name.endswith(SHIPPED_SUFFIXES)}
    assert any(name.endswith(".tmpl") for name in expected) and any("/presets/" in name for name in expected)
    assert expected - names == set()
    assert not [name for name in names if "__pycache__" in name or name.startswith(("tests/", "benchmarks/"))]
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/entry_points.txt").decode()
    assert "scaleyard = scaleyard.platform.cli:main" in metadata


def test_unpacked_wheel_works_without_the_repository(wheel, tmp_path):
    """`python -S`: no .pth files, so the editable install's finder (which maps scaleyard onto
    this checkout) is off; site-packages joins through PYTHONPATH for torch & co."""
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = f"""
import json, sys
from scaleyard.platform.cli import main
from scaleyard.platform.job import registry
code = main(["new", "wheel_job", "--dir", {str(tmp_path / 'wheel_job')!r}])
files = {{name: getattr(module, "__file__", None) or "" for name, module in sys.modules.items()
         if name.startswith("scaleyard")}}
print(json.dumps({{"code": code, "files": files, "presets": {{k: v.presets() for k, v in registry().items()}}}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(unpacked), sysconfig.get_paths()["purelib"]]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    loaded = [path for path in result["files"].values() if path]
    assert loaded and all(path.startswith(str(unpacked)) for path in loaded), loaded
    assert result["presets"]["classify"] == ["default", "tiny"]
    assert (tmp_path / "wheel_job" / "wheel_job" / "presets" / "tiny.yaml").exists()
    assert "class WheelJobJob(Job)" in (tmp_path / "wheel_job" / "wheel_job" / "job.py").read_text()


@pytest.mark.slow
def test_fresh_venv_installs_the_wheel_and_trains_a_new_job(wheel, tmp_path):
    """What README "Install as a library" says: torch first (pinned, so pip never resolves a
    multi-GB build), then the wheel with its dependencies; then a scaffolded job, pip-installed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for step in (["torch==2.13.0"], [str(wheel)]):
        done = subprocess.run([*pip, *step], capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout + done.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    scaleyard = str(venv / "bin" / "scaleyard")

    def run(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    run(scaleyard, "new", "venv_job")
    run(*pip, "-e", str(tmp_path / "venv_job"))
    assert "venv_job" in run(scaleyard, "jobs").stdout
    run(scaleyard, "run", "venv_job", "--preset", "tiny", f"run.dir={tmp_path / 'run'}")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 40 and summary["eval"]["accuracy"] > 0.5
    located = run(str(venv / "bin" / "python"), "-c", "import scaleyard.platform.cli as c; print(c.__file__)")
    assert str(venv) in located.stdout and str(REPO) not in located.stdout
