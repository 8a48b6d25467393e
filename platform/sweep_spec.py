"""Sweep specs: read from YAML or built from a Hydra-style command line, and checked field by field
before anything is expanded, written or queued (every error names the key and the fix).

Spec (YAML):
    job: t2i
    preset: default            # the job's YAML preset
    base: [data.path=..., train.batch_size=32]
    grid: {optim.lr: [1e-3, 3e-3]}             # either a grid ...
    isoflop:                                   # ... or an IsoFLOP ladder
      key: model.preset                        # the override that picks the model size
      values: [uvit-cpu-xs, uvit-cpu-s, uvit-cpu-m]
      budgets: [1e12, 3e12]                    # training FLOPs; steps = budget / (flops_per_sample * batch)
    concurrency: 2
    metric: eval.loss          # optional: what `status` shows and ranks by (default: final_loss)
    direction: min             # or max
    strategy: mobo             # ... or runs proposed round by round by multi-objective BO: a
    mobo: {...}                #     'mobo' section instead of grid/isoflop (platform/mobo_spec.py)

Command line (multirun): `scaleyard sweep JOB optim.lr=1e-3,3e-3 model.width=32,64 train.steps=100`:
overrides with commas become grid axes, the others the base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from scaleyard.platform.config import ConfigError

DIRECTIONS = ("min", "max")

# YAML 1.1 (PyYAML) reads `1e-3` as a string, because its float pattern needs a dot; a spec author
# means a number, as in YAML 1.2 and OmegaConf. Same pattern OmegaConf's loader adds; the dumper
# shares it so that a string such as '1e-3' typed on the command line is written quoted and read
# back as the same string.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                        |\.[0-9_]+(?:[eE][-+][0-9]+)?
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X)


class SpecLoader(yaml.SafeLoader):
    pass


class SpecDumper(yaml.SafeDumper):
    pass


for _cls in (SpecLoader, SpecDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


@dataclass
class SweepSpec:
    job: str
    preset: str | None = None
    base: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    isoflop: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 4
    metric: str | None = None
    direction: str = "min"
    strategy: str | None = None  # None: grid or isoflop, by the section given; "mobo"
    mobo: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep spec {path} does not exist (give a YAML spec, or JOB KEY=A,B ... to sweep "
                              "from the command line)")
        try:
            body = yaml.load(path.read_text(), Loader=SpecLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"sweep spec {path} is not valid YAML: {err}") from None
        return cls.from_dict(body, f"sweep spec {path}")

    @classmethod
    def from_dict(cls, body: Any, where: str = "sweep spec") -> SweepSpec:
        return cls(**_checked(body, where))

    @classmethod
    def from_overrides(cls, job: str, preset: str | None, overrides: list[str],
                       concurrency: int | None = None) -> SweepSpec:
        """`optim.lr=1e-3,3e-3` is an axis (values kept as typed, so they mean what they mean to
        `scaleyard run`); an override without a top-level comma is part of the base."""
        base, grid = [], {}
        for item in overrides:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-3,3e-3)")
            values = split_values(value)
            if len(values) == 1:
                base.append(item)
            elif key in grid:
                raise ConfigError(f"sweep axis {key!r} is given twice; list all its values once: {key}=A,B,C")
            else:
                grid[key] = values
        if not grid:
            raise ConfigError(f"nothing to sweep: no override of job {job} has comma-separated values "
                              "(e.g. optim.lr=1e-3,3e-3); for one run use `scaleyard run`")
        body: dict[str, Any] = {"job": job, "preset": preset, "base": base, "grid": grid}
        if concurrency is not None:
            body["concurrency"] = concurrency
        return cls.from_dict(body, "sweep")

    def as_dict(self) -> dict[str, Any]:
        # strategy and mobo only when used: specs and manifests of grids read as before they existed
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("strategy", "mobo") or getattr(self, f.name)}

    def dump(self) -> str:
        return yaml.dump(self.as_dict(), Dumper=SpecDumper, sort_keys=False)


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: `1,2` -> two values, `[1,2]` stays one.
    (Hand-written: Hydra's override grammar is not a dependency here, and this is all of it we use.)"""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    if len(parts) > 1 and any(not p.strip() for p in parts):
        raise ConfigError(f"empty value in {text!r}: write the values as A,B,C with no empty entry")
    return [p.strip() for p in parts] if len(parts) > 1 else [text]


def render(value: Any) -> str:
    """A spec value as the text of an OmegaConf override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _checked(body: Any, where: str) -> dict[str, Any]:
    """The spec's fields with their shapes checked (numbers written as text accepted where a number
    is meant); raises ConfigError naming the key and the fix."""
    if not isinstance(body, dict):
        raise ConfigError(f"{where} must be a mapping of keys (job, base, grid or isoflop, ...), "
                          f"got {type(body).__name__}")
    allowed = [f.name for f in fields(SweepSpec)]
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    if not isinstance(body.get("job"), str) or not body["job"]:
        raise ConfigError(f"{where}: 'job' must name the job to sweep (e.g. job: t2i)")
    out = dict(body)
    if out.get("preset") is not None and not isinstance(out["preset"], str):
        raise ConfigError(f"{where}: 'preset' must be the name of one of the job's presets, got {out['preset']!r}")
    out["base"] = _base(out.get("base") or [], where)
    out["grid"] = _grid(out.get("grid") or {}, where)
    out["isoflop"] = _isoflop(out.get("isoflop") or {}, where)
    if out.get("strategy") not in (None, "mobo"):
        raise ConfigError(f"{where}: 'strategy' {out['strategy']!r}: the only strategy is mobo (grids and IsoFLOP "
                          "ladders are given by their sections, 'grid' or 'isoflop')")
    if out.get("mobo") and out.get("strategy") != "mobo":
        raise ConfigError(f"{where} has a 'mobo' section: add 'strategy: mobo' to use it")
    if out.get("strategy") == "mobo":
        if out["grid"] or out["isoflop"]:
            raise ConfigError(f"{where}: strategy mobo proposes its own runs; remove 'grid'/'isoflop' (ranges go in "
                              "mobo.space)")
        from scaleyard.platform.mobo_spec import check

        out["mobo"] = check(out.get("mobo"), where)
        clash = sorted(set(out["mobo"]["space"]) & {o.partition("=")[0].strip() for o in out["base"]})
        if clash:
            raise ConfigError(f"{where}: {clash} are both in 'base' and in mobo.space; remove them from 'base'")
    elif not out["grid"] and not out["isoflop"]:
        raise ConfigError(f"{where} has no axes: give 'grid' (override -> values), 'isoflop' (key, values, budgets) "
                          "or 'strategy: mobo' with a 'mobo' section")
    if out["grid"] and out["isoflop"]:
        raise ConfigError(f"{where}: give 'grid' or 'isoflop', not both")
    concurrency = out.get("concurrency", 4)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"{where}: 'concurrency' must be a whole number of runs at a time, at least 1; "
                          f"got {concurrency!r}")
    if out.get("metric") is not None and not isinstance(out["metric"], str):
        raise ConfigError(f"{where}: 'metric' names one number of a run's summary: final_loss or eval.NAME")
    if out.get("direction", "min") not in DIRECTIONS:
        raise ConfigError(f"{where}: 'direction' must be min or max, got {out['direction']!r}")
    return out


def _base(base: Any, where: str) -> list[str]:
    if isinstance(base, dict):  # `base: {train.steps: 100}` reads naturally too
        base = [f"{key}={render(value)}" for key, value in base.items()]
    if not isinstance(base, list):
        raise ConfigError(f"{where}: 'base' must be a list of overrides KEY=VALUE (or a mapping), got {base!r}")
    for item in base:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{where}: 'base' entry {item!r} is not an override KEY=VALUE (e.g. train.steps=100)")
        if item.partition("=")[0].strip() == "run.dir":
            raise ConfigError(f"{where}: 'base' sets run.dir, but each run's folder is chosen by the sweep "
                              "(inside the sweep folder); choose that with --dir")
    return list(base)


def _values(key: str, values: Any, where: str, what: str) -> list[Any]:
    """A non-empty list of scalars; a lone value gets the fix spelled out."""
    if not isinstance(values, list):
        hint = (" (YAML 1.1 reads numbers like 1e-3 as text; either way it is one value)"
                if isinstance(values, str) and _FLOAT.match(values) else "")
        fix = f", or put {key}={render(values)} in 'base' to fix it" if what == "grid key" else ""
        raise ConfigError(f"{where}: {what} {key!r} needs a list of values, got the single value {values!r}{hint}; "
                          f"write [{render(values)}] to sweep over it{fix}")
    if not values:
        raise ConfigError(f"{where}: {what} {key!r} has no values; give at least one")
    for value in values:
        if isinstance(value, dict):
            raise ConfigError(f"{where}: {what} {key!r} holds a mapping {value!r}; values must be numbers, "
                              "strings, booleans or lists")
    return list(values)


def _grid(grid: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must map an override key to its values, e.g. {{optim.lr: [1e-3, 3e-3]}}")
    out = {}
    for key, values in grid.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ConfigError(f"{where}: grid key {key!r} is not a config key such as optim.lr")
        out[key] = _values(key, values, where, "grid key")
    return out


def _isoflop(ladder: Any, where: str) -> dict[str, Any]:
    if not ladder:
        return {}
    if not isinstance(ladder, dict):
        raise ConfigError(f"{where}: 'isoflop' must be a mapping with key, values and budgets")
    unknown = sorted(set(ladder) - {"key", "values", "budgets"})
    if unknown:
        raise ConfigError(f"{where}: isoflop has unknown key(s) {unknown}; allowed: key, values, budgets")
    missing = sorted({"values", "budgets"} - set(ladder))
    if missing:
        raise ConfigError(f"{where}: isoflop needs {missing}")
    key = ladder.get("key", "model.preset")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: isoflop.key must be the override that picks the model size, e.g. model.preset")
    budgets = []
    for budget in _values("isoflop.budgets", ladder["budgets"], where, "key"):
        try:
            number = float(budget)  # numbers written as text ('1e12') count
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(budget, bool) or not number > 0 or number == float("inf"):
            raise ConfigError(f"{where}: isoflop.budgets entry {budget!r} is not a positive number of training "
                              "FLOPs (e.g. 1e12)")
        budgets.append(number)
    return {"key": key, "values": _values("isoflop.values", ladder["values"], where, "key"), "budgets": budgets}
