"""The layering rules of DESIGN.md "Layers", checked on every import statement (module level and
inside functions) of the five code folders. Data flows down, results flow up:

    platform/cli.py   the thin dispatcher: the only module that may import every folder
    slurm/            may import platform/, never models/, jobs/ or data_loaders/
    platform/         never slurm/, models/ or jobs/ (it knows jobs through the registry)
    jobs/             never slurm/, torch.distributed or DeepSpeed (it asks the platform)
    models/           never platform/, jobs/ or slurm/
    data_loaders/     never platform/, models/ or jobs/ (a builder that samples trained networks gets
                      them from its caller: build(networks=...))
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

FOLDERS = ("platform", "models", "jobs", "data_loaders", "slurm")
CLI = "platform/cli.py"

# folder -> module prefixes it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "models": ("scaleyard.platform", "scaleyard.jobs", "scaleyard.slurm"),
    "data_loaders": ("scaleyard.platform", "scaleyard.models", "scaleyard.jobs", "scaleyard.slurm"),
    "jobs": ("scaleyard.slurm", "torch.distributed", "deepspeed"),
    "platform": ("scaleyard.slurm", "scaleyard.models", "scaleyard.jobs"),
    "slurm": ("scaleyard.models", "scaleyard.jobs", "scaleyard.data_loaders"),
}

def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, including lazy ones inside functions;
    `from torch import distributed` counts as `torch.distributed`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations() -> list[tuple[str, int, str]]:
    """(file, line, module) of every import that breaks a rule."""
    found = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == CLI:
                continue
            for line, module in _imports(path):
                if any(_matches(module, prefix) for prefix in FORBIDDEN[folder]):
                    found.append((rel, line, module))
    # a `from a import b` that is itself forbidden shows up twice (a and a.b): keep the first
    unique, seen = [], set()
    for rel, line, module in found:
        if (rel, line) not in seen:
            seen.add((rel, line))
            unique.append((rel, line, module))
    return unique


def test_every_folder_keeps_to_its_layer():
    broken = [f"{rel}:{line} imports {module}" for rel, line, module in violations()]
    assert not broken, "layering (DESIGN.md 'Layers', README 'Layout') broken:\n" + "\n".join(broken)


@pytest.mark.parametrize("source,expected", [
    ("import torch.distributed as dist", ["torch.distributed"]),
    ("def f():\n    from torch import distributed\n", ["torch", "torch.distributed"]),
    ("from scaleyard.slurm.launch import submit_array", ["scaleyard.slurm.launch",
                                                         "scaleyard.slurm.launch.submit_array"]),
    ("from . import sibling", []),
])
def test_imports_are_found_wherever_they_are(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert [module for _, module in _imports(path)] == expected
