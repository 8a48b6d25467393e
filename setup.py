"""Package map for the distribution `scaleyard`.

The five code folders sit at the repository root with no `__init__.py`, so that from the root
`import platform` is still Python's own module (DESIGN.md, "The package"). setuptools maps each
`scaleyard.<name>` onto its folder; a wheel only carries the subpackages it is told about, so the
list is derived here with find_namespace_packages instead of being kept by hand.
"""

from setuptools import find_namespace_packages, setup

CODE_FOLDERS = ("platform", "models", "jobs", "data_loaders", "slurm")

packages = []
package_dir = {}
for folder in CODE_FOLDERS:
    packages.append(f"scaleyard.{folder}")
    package_dir[f"scaleyard.{folder}"] = folder
    for sub in find_namespace_packages(where=folder, exclude=["__pycache__*", "*.__pycache__*"]):
        packages.append(f"scaleyard.{folder}.{sub}")

setup(
    packages=packages,
    package_dir=package_dir,
    # presets and profiles (YAML), `scaleyard new` templates (.tmpl)
    package_data={f"scaleyard.{folder}": ["**/*.yaml", "**/*.tmpl"] for folder in CODE_FOLDERS},
    include_package_data=True,
)
