"""The `mobo` section of a sweep spec (`strategy: mobo`), checked before anything is queued, and
the search space's map to and from the unit cube the BO model works in. No torch here: `status`
and spec checks stay light.

    strategy: mobo
    mobo:
      space:
        optim.lr: {low: 1.0e-4, high: 1.0e-1, log: true}     # continuous (log scale)
        model.width: {low: 4, high: 32, type: int}           # integers
        model.kind: [dit, uvit]                               # choices (or {choices: [...]})
      objectives:                                             # summary.json numbers, min or max
        final_loss: min
        compute_flops: {direction: min, log: true}            # model log10 of it; optional ref
      budget: 12          # runs in all (failed ones count)
      batch: 3            # proposals per round, submitted as one job array
      initial: 4          # scrambled-Sobol runs of round 0 (default: max(batch, dims + 1))
      acquisition: nested # random | qlognehvi | binom | joint | nested
      horizon: 2          # lookahead of binom / joint / nested
      seed: 0
      retries: 1          # a failed run is run again at most this often, then recorded as failed
      failed: worst       # failed runs enter the model at the worst value seen (or: exclude)
      effort: {restarts: 4, raw_samples: 128, mc_samples: 32, maxiter: 40, fantasies: 1}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from scaleyard.platform.config import ConfigError

ACQUISITIONS = ("random", "qlognehvi", "binom", "joint", "nested")  # mobo_acquisition.ACQUISITIONS
FAILED_POLICIES = ("worst", "exclude")
EFFORT_KEYS = ("restarts", "raw_samples", "mc_samples", "maxiter", "fantasies", "nested_candidates")
# what a run's summary.json holds (platform/trainer.py `_finish`), besides eval.NAME
SUMMARY_NUMBERS = ("final_loss", "compute_flops", "params", "samples_seen", "step")
ALIASES = {"loss": "final_loss", "flops": "compute_flops", "train.flops": "compute_flops",
           "train/flops": "compute_flops", "train.loss": "final_loss", "train/loss": "final_loss"}
KEYS = ("space", "objectives", "budget", "batch", "initial", "acquisition", "horizon", "seed", "retries", "failed",
        "effort")


@dataclass(frozen=True)
class Param:
    """One axis of the search space: float (optionally log), int (optionally log) or choice."""

    key: str
    type: str  # float | int | choice
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def decode(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0)
        if self.type == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        if self.type == "int":
            return int(min(max(round(value), self.low), self.high))
        return min(max(float(f"{value:.4g}"), self.low), self.high)  # 4 digits: readable overrides

    def encode(self, value: Any) -> float:
        if self.type == "choice":
            return (self.choices.index(value) + 0.5) / len(self.choices)
        if self.high == self.low:
            return 0.5
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class Objective:
    name: str  # a summary.json number: final_loss, compute_flops, ... or eval.NAME
    direction: str = "min"
    log: bool = False  # model log10(value) (FLOPs, parameters: orders of magnitude apart)
    ref: float | None = None  # the worst value that still counts (hypervolume reference); default inferred

    def to_max(self, value: float) -> float:
        """The value in the model's space: maximized, log10 where asked."""
        v = math.log10(value) if self.log else value
        return v if self.direction == "max" else -v

    def from_max(self, value: float) -> float:
        v = value if self.direction == "max" else -value
        return 10**v if self.log else v


@dataclass(frozen=True)
class MoboSpec:
    space: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    budget: int
    batch: int
    initial: int
    acquisition: str = "qlognehvi"
    horizon: int = 2
    seed: int = 0
    retries: int = 1
    failed: str = "worst"
    effort: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> MoboSpec:
        """From the normalized section (`check`'s output, as stored in the manifest)."""
        space = tuple(Param(key, p["type"], p.get("low", 0.0), p.get("high", 1.0), p.get("log", False),
                            tuple(p.get("choices", ()))) for key, p in body["space"].items())
        objectives = tuple(Objective(name, o["direction"], o.get("log", False), o.get("ref"))
                           for name, o in body["objectives"].items())
        return cls(space, objectives, body["budget"], body["batch"], body["initial"], body["acquisition"],
                   body["horizon"], body["seed"], body["retries"], body["failed"], dict(body.get("effort") or {}))

    def decode(self, u: list[float]) -> dict[str, Any]:
        return {p.key: p.decode(v) for p, v in zip(self.space, u)}

    def encode(self, values: dict[str, Any]) -> list[float]:
        return [p.encode(values[p.key]) for p in self.space]

    def snap(self, u: list[float]) -> list[float]:
        """The unit-cube point of the configuration `u` runs as (integers, choices, 4 digits)."""
        return self.encode(self.decode(u))


def objective_name(name: str) -> str:
    """`eval/fid` and `eval.fid` are one name; `flops` means compute_flops."""
    name = ALIASES.get(name, name)
    return "eval." + name[5:] if name.startswith("eval/") else name


def check(body: Any, where: str) -> dict[str, Any]:
    """The normalized mobo section, or a ConfigError naming the key and the fix."""
    w = f"{where}: mobo"
    if not isinstance(body, dict) or not body:
        raise ConfigError(f"{where}: strategy mobo needs a 'mobo' section with space, objectives, budget and batch "
                          "(see `scaleyard sweep --help` and README, section mobo)")
    unknown = sorted(set(body) - set(KEYS))
    if unknown:
        raise ConfigError(f"{w} has unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    missing = [k for k in ("space", "objectives", "budget", "batch") if k not in body]
    if missing:
        raise ConfigError(f"{w} needs {missing} (e.g. budget: 12, batch: 3)")
    space = _space(body["space"], w)
    objectives = _objectives(body["objectives"], w)
    budget = _whole(body["budget"], f"{w}.budget", 1, "runs in all")
    batch = _whole(body["batch"], f"{w}.batch", 1, "proposals per round")
    if budget < batch:
        raise ConfigError(f"{w}.budget ({budget}) is smaller than mobo.batch ({batch}): a round could not be "
                          f"filled; raise the budget or lower the batch")
    initial = _whole(body.get("initial", min(budget, max(batch, len(space) + 1))), f"{w}.initial", 1,
                     "runs of the random first round")
    if initial > budget:
        raise ConfigError(f"{w}.initial ({initial}) is larger than mobo.budget ({budget}); lower it")
    acquisition = body.get("acquisition", "qlognehvi")
    if acquisition not in ACQUISITIONS:
        raise ConfigError(f"{w}.acquisition {acquisition!r}: choose one of {', '.join(ACQUISITIONS)}")
    failed = body.get("failed", "worst")
    if failed not in FAILED_POLICIES:
        raise ConfigError(f"{w}.failed {failed!r}: choose worst (failed runs enter the model at the worst value "
                          "seen) or exclude")
    effort = body.get("effort") or {}
    if not isinstance(effort, dict) or set(effort) - set(EFFORT_KEYS):
        raise ConfigError(f"{w}.effort must map some of {', '.join(EFFORT_KEYS)} to whole numbers, got {effort!r}")
    return {"space": space, "objectives": objectives, "budget": budget, "batch": batch, "initial": initial,
            "acquisition": acquisition, "horizon": _whole(body.get("horizon", 2), f"{w}.horizon", 1, "lookahead steps"),
            "seed": _whole(body.get("seed", 0), f"{w}.seed", 0, "seed"),
            "retries": _whole(body.get("retries", 1), f"{w}.retries", 0, "reruns of a failed run"),
            "failed": failed, "effort": {k: _whole(v, f"{w}.effort.{k}", 1, k) for k, v in effort.items()}}


def _whole(value: Any, key: str, least: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key} must be a whole number of {what}, at least {least}; got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    try:
        number = float(value)  # '1e-3' read as text by YAML 1.1 counts
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return number


def _space(space: Any, w: str) -> dict[str, dict[str, Any]]:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{w}.space must map config keys to ranges, e.g. {{optim.lr: {{low: 1e-4, high: 1e-2, "
                          "log: true}}")
    out = {}
    for key, p in space.items():
        k = f"{w}.space.{key}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ConfigError(f"{w}.space key {key!r} is not a config key such as optim.lr")
        if isinstance(p, list):
            p = {"choices": p}
        if not isinstance(p, dict):
            raise ConfigError(f"{k} must be a range {{low, high[, log, type]}} or a list of choices, got {p!r}")
        if "choices" in p or p.get("type") == "choice":
            choices = p.get("choices")
            if not isinstance(choices, list) or not choices or any(isinstance(c, dict | list) for c in choices):
                raise ConfigError(f"{k} needs a non-empty list of choices (numbers or strings), got {choices!r}")
            if len(set(map(str, choices))) < len(choices):
                raise ConfigError(f"{k} lists a choice twice: {choices!r}")
            out[key] = {"type": "choice", "choices": list(choices)}
            continue
        extra = sorted(set(p) - {"low", "high", "log", "type"})
        if extra or "low" not in p or "high" not in p:
            raise ConfigError(f"{k} must give low and high (and optionally log: true, type: int); "
                              f"got {sorted(p)}")
        kind = p.get("type", "float")
        if kind not in ("float", "int"):
            raise ConfigError(f"{k}.type {kind!r}: choose float or int (or give a list of choices)")
        low, high = _number(p["low"], f"{k}.low"), _number(p["high"], f"{k}.high")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ConfigError(f"{k}: type int needs whole-number bounds, got low={p['low']!r}, high={p['high']!r}")
        if not low < high:
            raise ConfigError(f"{k} is an empty range (low {p['low']!r} is not below high {p['high']!r}); "
                              "widen it, or put the key in 'base' to fix its value")
        log = p.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{k}.log must be true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{k}: a log scale needs low > 0, got {p['low']!r}")
        out[key] = {"type": kind, "low": int(low) if kind == "int" else low, "high": int(high) if kind == "int"
                    else high, "log": log}
    return out


def _objectives(objectives: Any, w: str) -> dict[str, dict[str, Any]]:
    if not isinstance(objectives, dict) or len(objectives) < 2:
        raise ConfigError(f"{w}.objectives must map at least two summary numbers to min or max, e.g. "
                          "{final_loss: min, compute_flops: min} (one objective: use a grid sweep's metric)")
    out: dict[str, dict[str, Any]] = {}
    for raw, o in objectives.items():
        name = objective_name(str(raw))
        k = f"{w}.objectives.{raw}"
        if name not in SUMMARY_NUMBERS and not re.fullmatch(r"eval\.\w[\w.-]*", name):
            raise ConfigError(f"{k}: {raw!r} is not a number runs report; choose one of "
                              f"{', '.join(SUMMARY_NUMBERS)} or eval.NAME (a metric of the job's evaluate)")
        if name in out:
            raise ConfigError(f"{k}: {raw!r} names {name} twice")
        o = {"direction": o} if isinstance(o, str) else o
        if not isinstance(o, dict) or set(o) - {"direction", "log", "ref"}:
            raise ConfigError(f"{k} must be min, max or {{direction, log, ref}}, got {o!r}")
        direction = o.get("direction", "min")
        if direction not in ("min", "max"):
            raise ConfigError(f"{k}: direction must be min or max, got {direction!r}")
        log = o.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{k}.log must be true or false, got {log!r}")
        ref = o.get("ref")
        if ref is not None:
            ref = _number(ref, f"{k}.ref")
            if log and ref <= 0:
                raise ConfigError(f"{k}.ref must be positive with log: true, got {ref!r}")
        out[name] = {"direction": direction, "log": log, "ref": ref}
    return out
