"""Job registration through real entry points: a distribution's `.dist-info` folder (METADATA +
entry_points.txt, group `scaleyard.jobs`) and its module on PYTHONPATH, read by the real CLI.
A broken plugin is skipped with a warning naming it; a name taken twice is an error naming both
sources; a job without a docstring is listed with '-'."""

import importlib.metadata
import os
import textwrap
from pathlib import Path

from scaleyard.platform import job as job_module
from scaleyard.platform.job import get_job, job_summary, registered, registry

from conftest import scaleyard

JOB_SOURCE = '''
from dataclasses import dataclass

from scaleyard.platform.config import TrainingConfig
from scaleyard.platform.job import Job


@dataclass
class Config(TrainingConfig):
    width: int = 3


class PluginJob(Job):
    name = {name!r}
    Config = Config


JOB = PluginJob
'''


def write_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """What `pip install` would leave in site-packages: modules plus `<dist>-0.1.dist-info`."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[scaleyard.jobs]\n{lines}")
    for relative, source in modules.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def with_path(*folders: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([*map(str, folders), os.environ.get("PYTHONPATH", "")])}


def test_job_without_docstring_is_listed_with_a_dash(tmp_path):
    site = write_distribution(tmp_path, "nodoc-plugin", {"nodoc": "nodoc_plugin:JOB"},
                              {"nodoc_plugin.py": JOB_SOURCE.format(name="nodoc")})
    listed = scaleyard("jobs", env=with_path(site))
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("nodoc "))
    assert " - " in line and "distribution nodoc-plugin 0.1" in line, line
    assert any(line.startswith("classify ") for line in listed.stdout.splitlines())


def test_broken_entry_points_are_skipped_with_a_warning_naming_them(tmp_path):
    modules = {"broken_plugin/__init__.py": "", "broken_plugin/job.py": "import not_installed_anywhere\n"}
    broken = write_distribution(tmp_path / "a", "broken-plugin", {"broken": "broken_plugin.job:JOB"}, modules)
    odd = write_distribution(tmp_path / "b", "odd-plugin", {"odd": "odd_plugin:JOB"}, {"odd_plugin.py": "JOB = 42\n"})
    for command in (["config", "classify"], ["jobs"]):
        result = scaleyard(*command, env=with_path(broken, odd))
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert "broken = broken_plugin.job:JOB" in result.stderr and "broken-plugin 0.1" in result.stderr
        assert "ModuleNotFoundError: No module named 'not_installed_anywhere'" in result.stderr
        assert "odd = odd_plugin:JOB" in result.stderr and "not a subclass" in result.stderr
    assert "classify" in result.stdout and "broken" not in result.stdout and "odd" not in result.stdout


def test_plugin_named_like_a_builtin_is_an_error_naming_both(tmp_path):
    site = write_distribution(tmp_path, "shadow-plugin", {"classify": "shadow_plugin:JOB"},
                              {"shadow_plugin.py": JOB_SOURCE.format(name="classify")})
    result = scaleyard("config", "classify", env=with_path(site))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # nothing resolved with the wrong job
    assert "'classify' is registered twice" in result.stderr
    assert "module scaleyard.jobs.classify.job" in result.stderr
    assert "classify = shadow_plugin:JOB" in result.stderr and "shadow-plugin 0.1" in result.stderr


def test_two_plugins_with_one_name_are_an_error(tmp_path):
    one = write_distribution(tmp_path / "one", "first-plugin", {"twin": "first_twin:JOB"},
                             {"first_twin.py": JOB_SOURCE.format(name="twin")})
    two = write_distribution(tmp_path / "two", "second-plugin", {"twin": "second_twin:JOB"},
                             {"second_twin.py": JOB_SOURCE.format(name="twin")})
    result = scaleyard("jobs", env=with_path(one, two))
    assert result.returncode == 2
    assert "first-plugin 0.1" in result.stderr and "second-plugin 0.1" in result.stderr


def test_broken_builtin_job_module_is_skipped(tmp_path, capsys):
    """A `scaleyard.jobs.<name>` package whose job.py fails to import (a missing optional
    dependency) costs that job only."""
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("")
    (tmp_path / "half_installed" / "job.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "broken_init").mkdir()
    (tmp_path / "broken_init" / "__init__.py").write_text("raise RuntimeError('boom at import')\n")
    jobs_path = importlib.import_module("scaleyard.jobs").__path__
    jobs_path.append(str(tmp_path))  # the namespace package's own list: one more folder of built-ins
    try:
        found = registered(refresh=True)
    finally:
        jobs_path._path.remove(str(tmp_path))
        registered(refresh=True)
    assert "classify" in found and "half_installed" not in found and "broken_init" not in found
    err = capsys.readouterr().err
    assert "scaleyard.jobs.half_installed.job" in err and "not_installed_anywhere" in err
    assert "scaleyard.jobs.broken_init.job: RuntimeError: boom at import" in err


def test_registry_is_scanned_once_per_process(monkeypatch):
    registered(refresh=True)
    calls = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(job_module.importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    for _ in range(3):
        get_job("classify")
        registry()
    assert calls == []
    registered(refresh=True)
    assert len(calls) == 1
    registry()["mutated"] = None  # callers get copies: the cache cannot be changed from outside
    assert "mutated" not in registry()


def test_job_summary_falls_back_to_the_class_docstring_then_dash():
    from scaleyard.platform.job import Job

    class Documented(Job):
        """First line.

        More."""

    class Plain(Job):
        pass

    Documented.__module__ = Plain.__module__ = "not_a_loaded_module"
    assert job_summary(Documented) == "First line."
    assert job_summary(Plain) == "-"


def test_builtin_sources_are_named():
    assert registered()["classify"].source == "module scaleyard.jobs.classify.job"
