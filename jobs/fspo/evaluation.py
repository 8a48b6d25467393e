"""Win rates on held-out synthetic users, judged by each user's true reward (the trait scorer).

A response wins against the base model's response to the same prompt when the user's reward is
higher (a tie counts half). The 95% interval is Wilson's score interval on the win share, with
ties as half wins (a normal-approximation interval that stays inside [0, 1] for small n).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaleyard.data_loaders.builders.fspo_users import TRAITS, measure, reward


def wins(persona_rewards: Sequence[tuple[float, float]]) -> list[float]:
    """1 / 0.5 / 0 per (candidate reward, base reward)."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in persona_rewards]


def wilson_interval(share: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(items: Sequence[dict[str, Any]], candidates: Sequence[str], base: Sequence[str]) -> dict[str, float]:
    scored = [(reward(item["persona"], c), reward(item["persona"], b)) for item, c, b in zip(items, candidates, base)]
    w = wins(scored)
    share = sum(w) / len(w)
    low, high = wilson_interval(share, len(w))
    return {"win_rate": share, "ci_low": low, "ci_high": high, "n": float(len(w)),
            "reward": sum(a for a, _ in scored) / len(w), "base_reward": sum(b for _, b in scored) / len(w)}


def trait_means(responses: Sequence[str]) -> dict[str, float]:
    measured = [measure(r) for r in responses]
    return {t: sum(m[t] for m in measured) / max(1, len(measured)) for t in TRAITS}


def write_report(out: Path, step: int, rates: dict[str, dict[str, float]], items: Sequence[dict[str, Any]],
                 policy: Sequence[str], base: Sequence[str], temperature: float = 0.0) -> None:
    """eval/report.md and eval/step_<step>.json (the latest evaluation is report.md). `rates`:
    "own" (the user's own shots, greedy), "other" (a different user's shots), optionally "sampled"."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "own_shots": rates["own"], "other_user_shots": rates["other"],
              "sampled": rates.get("sampled"), "temperature": temperature,
              "policy_traits": trait_means(policy), "base_traits": trait_means(base),
              "samples": [{"user": i["user"], "question": i["question"], "persona": i["persona"], "policy": p,
                           "base": b} for i, p, b in list(zip(items, policy, base))[:8]]}
    (out / f"step_{step}.json").write_text(json.dumps(record, indent=2))
    labels = {"own": "the user's own (greedy)", "other": "a different user's (greedy)",
              "sampled": f"the user's own (sampled, T={temperature:g})"}
    lines = [
        f"# FSPO evaluation at step {step}", "",
        f"Held-out synthetic users: {int(rates['own']['n'])} prompts; a win = higher reward of the user's own trait "
        "scorer than the base model's greedy response to the same prompt (ties count half); 95% Wilson interval.", "",
        "| shots | win rate | 95% interval | mean reward | base mean reward |", "|---|---|---|---|---|",
    ]
    for which, r in rates.items():
        lines.append(f"| {labels[which]} | {r['win_rate']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['reward']:.3f} | {r['base_reward']:.3f} |")
    lines += ["", "Mean measured traits (policy / base): " + ", ".join(
        f"{t} {record['policy_traits'][t]:.2f}/{record['base_traits'][t]:.2f}" for t in TRAITS), "", "## Samples", ""]
    for s in record["samples"][:3]:
        lines += [f"**{s['user']}** ({s['persona']}): {s['question']}", "", "policy:", "```", s["policy"], "```",
                  "base:", "```", s["base"], "```", ""]
    (out / "report.md").write_text("\n".join(lines))
