"""`scaleyard new JOB`: write a working job package outside this repository.

The package registers its job through the `scaleyard.jobs` entry-point group, so after
`pip install -e DIR` the platform finds it like a built-in job. The templates are real files in
`scaffold_templates/` (package data), with `$job`-style placeholders (string.Template) and
`__pkg__` standing for the package folder in paths.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).parent / "scaffold_templates"
TEMPLATE_SUFFIX = ".tmpl"
PACKAGE_PLACEHOLDER = "__pkg__"
JOB_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


class ScaffoldError(ValueError):
    """The job name or folder cannot be used; raised before anything is written."""


@dataclass(frozen=True)
class Names:
    job: str  # the registered job name: `scaleyard run <job>`
    pkg: str  # the Python package
    dist: str  # the distribution (`pip install` / pyproject name)
    class_name: str

    @classmethod
    def of(cls, job: str) -> Names:
        return cls(job=job, pkg=job, dist=job.replace("_", "-"),
                   class_name="".join(part.capitalize() for part in job.split("_") if part) + "Job")


def check_names(job: str) -> Names:
    """The names the package will use; errors say what to choose instead."""
    from scaleyard.platform.job import registered

    if not JOB_NAME.match(job) or keyword.iskeyword(job):
        raise ScaffoldError(f"job name {job!r}: use lower-case letters, digits and underscores, starting with a "
                            "letter (it is also the package name), e.g. my_job")
    taken = registered().get(job)
    if taken is not None:
        raise ScaffoldError(f"job name {job!r} is already registered by {taken.source}; choose another name")
    spec = importlib.util.find_spec(job)
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or [])
        raise ScaffoldError(f"job name {job!r}: a module of that name is already importable ({where}), and the new "
                            "package would clash with it; choose another name")
    return Names.of(job)


def render(names: Names) -> dict[Path, str]:
    """Relative path -> text of every file of the new package."""
    files: dict[Path, str] = {}
    for template in sorted(TEMPLATES.rglob(f"*{TEMPLATE_SUFFIX}")):
        relative = template.relative_to(TEMPLATES).as_posix().removesuffix(TEMPLATE_SUFFIX)
        target = Path(relative.replace(PACKAGE_PLACEHOLDER, names.pkg))
        files[target] = Template(template.read_text()).substitute(
            job=names.job, pkg=names.pkg, dist=names.dist, class_name=names.class_name)
    return files


def new_job(job: str, folder: Path | None = None) -> tuple[Path, Names, list[Path]]:
    """Write the package for `job` into `folder` (default ./<job>), which must be new or empty.
    Returns the folder, the names used and the files written."""
    names = check_names(job)
    folder = Path(folder) if folder is not None else Path(job)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ScaffoldError(f"{folder} already exists and is not an empty folder; choose another with --dir")
    files = render(names)  # every template renders before the first file is written
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder, names, sorted(files)
