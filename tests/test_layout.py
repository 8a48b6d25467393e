"""The package layout promise: `scaleyard.*` maps onto root folders that never shadow stdlib."""

import subprocess
import sys
import zipfile

from conftest import REPO

CODE_FOLDERS = ("platform", "models", "jobs", "data_loaders", "slurm")


def test_root_folders_have_no_init():
    for folder in CODE_FOLDERS:
        assert (REPO / folder).is_dir(), folder
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow a module"


def test_import_platform_from_repo_root_is_stdlib():
    # cwd = repository root and sys.path[0] = '' (the root): the classic shadowing set-up
    code = "import sys, platform; platform.system(); print(sys.path[0] == '', platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    first, path = out.stdout.split()
    assert first == "True"
    assert not path.startswith(str(REPO)), path


def test_wheel_contains_every_subpackage_and_presets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("scaleyard-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("scaleyard/platform/trainer.py", "scaleyard/platform/engines/base.py",
                     "scaleyard/data_loaders/builders/fashion_mnist.py", "scaleyard/jobs/classify/job.py",
                     "scaleyard/jobs/classify/presets/default.yaml", "scaleyard/models/classifier.py"):
        assert expected in names, expected
    assert not any(n.startswith("platform/") for n in names)
