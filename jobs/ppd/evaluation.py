"""Evaluation of a PPD model on held-out users, judged by each user's true reward.

For every held-out user: its context pairs -> user embedding -> samples for the evaluation
prompts, each from the same noise and prompt as a base-model sample. A sample wins when the
user's reward of what the reader sees in it is higher than of the base sample (ties count half);
95% Wilson interval. Also: the same with the embedding dropped (the unconditioned model, which
with only the added weights trained is the base model exactly: 0.5, all ties), and with another
held-out user's embedding (scored by this user). Interpolation: u = (1 - a) u_A + a u_B for
pairs of users; both users' mean rewards along a should move monotonically (A's down, B's up).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scaleyard.data_loaders.builders.ppd_users import describe, hard, prompts, reward
from scaleyard.jobs.fspo.evaluation import wilson_interval, wins
from scaleyard.jobs.ppd.sources import generate, to_unit

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def eval_noise(seed: int, user: int, count: int, shape: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 * seed + user)
    return torch.randn(count, *shape, generator=generator)


def eval_prompts(user: int, count: int) -> list[str]:
    texts = prompts()
    return [texts[(user * count + i) % len(texts)] for i in range(count)]


def rate(pairs: Sequence[tuple[float, float]]) -> dict[str, float]:
    w = wins(pairs)
    share = sum(w) / max(1, len(w))
    low, high = wilson_interval(share, len(w))
    return {"win_rate": share, "ci_low": low, "ci_high": high, "n": float(len(w)),
            "reward": sum(a for a, _ in pairs) / max(1, len(pairs)),
            "base_reward": sum(b for _, b in pairs) / max(1, len(pairs))}


class Evaluator:
    """Holds the held-out users and the base samples (computed once: the base never changes)."""

    def __init__(self, users: list[dict[str, Any]], samples_per_user: int, steps: int, guidance: float,
                 seed: int, interpolation_pairs: int):
        self.users, self.per_user, self.steps, self.guidance = users, samples_per_user, steps, guidance
        self.seed, self.interpolation_pairs = seed, interpolation_pairs
        self._base: list[list[dict[str, Any]]] | None = None

    def _images(self, model: Any, encode: Any, process: str, user: int, tokens: torch.Tensor | None,
                keep: bool = True) -> torch.Tensor:
        noise = eval_noise(self.seed, user, self.per_user, self.shape)
        if tokens is not None:
            keep_mask = torch.full((self.per_user,), keep, dtype=torch.bool)
            model.set_user(tokens.expand(self.per_user, -1, -1), keep_mask)
        try:
            return to_unit(generate(model, encode, eval_prompts(user, self.per_user), noise, self.steps, self.guidance,
                                    process))
        finally:
            if tokens is not None:
                model.set_user(None)

    @torch.no_grad()
    def run(self, policy: Any, reference: Any, reader: Any, process: str) -> dict[str, Any]:
        """`policy`: a PersonalizedT2I; `reference`: the base TextToImage; `reader`: the attribute reader."""
        d = reference.denoiser.cfg
        self.shape = (d.channels, d.image_size, d.image_size)
        if self._base is None:
            self._base = [reader.read(self._images(reference.denoiser, reference.encode, process, u, None))
                          for u in range(len(self.users))]
        tokens = [policy.user_encoder(reader.features(u["context"].flatten(0, 1)).unflatten(0, (-1, 2))[None])
                  for u in self.users]
        read = lambda u, tok, keep=True: reader.read(  # noqa: E731
            self._images(policy.denoiser, policy.encode, process, u, tok, keep))
        scored: dict[str, list[tuple[float, float]]] = {"own": [], "dropped": [], "other": []}
        examples = []
        count = len(self.users)
        for u, user in enumerate(self.users):
            persona, base = user["persona"], self._base[u]
            own = read(u, tokens[u])
            for which, seen in (("own", own), ("dropped", read(u, tokens[u], False)),
                                ("other", read(u, tokens[(u + 1) % count]))):
                scored[which] += [(reward(persona, a), reward(persona, b)) for a, b in zip(seen, base)]
            if u < 4:
                examples.append({"user": user["user"], "persona": describe(persona),
                                 "own": [hard(a) for a in own[:2]], "base": [hard(a) for a in base[:2]]})
        result: dict[str, Any] = {name: rate(pairs) for name, pairs in scored.items()}
        result["interpolation"] = self._interpolate(policy, reader, process, tokens)
        result["examples"] = examples
        return result

    def _interpolate(self, policy: Any, reader: Any, process: str, tokens: list[torch.Tensor]) -> dict[str, Any]:
        pairs = min(self.interpolation_pairs, len(self.users) // 2)
        if pairs == 0:
            return {}
        curves_a, curves_b = [], []
        for k in range(pairs):
            a, b = 2 * k, 2 * k + 1
            ra, rb = [], []
            for alpha in ALPHAS:
                mixed = (1 - alpha) * tokens[a] + alpha * tokens[b]
                seen = reader.read(self._images(policy.denoiser, policy.encode, process, a, mixed))
                ra.append(sum(reward(self.users[a]["persona"], s) for s in seen) / len(seen))
                rb.append(sum(reward(self.users[b]["persona"], s) for s in seen) / len(seen))
            curves_a.append(ra)
            curves_b.append(rb)
        mean_a = [sum(c[i] for c in curves_a) / pairs for i in range(len(ALPHAS))]
        mean_b = [sum(c[i] for c in curves_b) / pairs for i in range(len(ALPHAS))]
        monotone = lambda c, sign: all(sign * (y - x) >= -1e-9 for x, y in zip(c, c[1:]))  # noqa: E731
        return {"alphas": list(ALPHAS), "pairs": pairs, "user_a_reward": mean_a, "user_b_reward": mean_b,
                "user_a_monotone": monotone(mean_a, -1), "user_b_monotone": monotone(mean_b, 1),
                "pairs_monotone_both": sum(monotone(x, -1) and monotone(y, 1) for x, y in zip(curves_a, curves_b))}


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    names = {"own": "win_rate", "dropped": "win_rate_dropped", "other": "win_rate_other_user"}
    out = {f"{names[w]}/{k}": v for w in names for k, v in result[w].items() if k != "n"}
    interp = result.get("interpolation") or {}
    if interp:
        out["interpolation/user_a_reward_change"] = interp["user_a_reward"][-1] - interp["user_a_reward"][0]
        out["interpolation/user_b_reward_change"] = interp["user_b_reward"][-1] - interp["user_b_reward"][0]
    return out


def write_report(run_dir: Path, step: int, result: dict[str, Any], setup: dict[str, Any]) -> None:
    """report.md and report.json in the run folder (the latest evaluation), eval/step_<N>.json."""
    record = {"step": step, **{k: v for k, v in result.items()}, "setup": setup}
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2)
    (run_dir / "eval" / f"step_{step}.json").write_text(text)
    (run_dir / "report.json").write_text(text)
    labels = {"own": "the user's own embedding", "dropped": "embedding dropped (unconditioned)",
              "other": "another held-out user's embedding"}
    n = int(result["own"]["n"])
    lines = [f"# PPD evaluation at step {step}", "",
             f"{setup.get('heldout_users', '?')} held-out users, {n} samples in all: each user's "
             f"{setup.get('context_pairs')} context pairs -> embedding -> a sample from the same prompt and noise as "
             "the base model's; a win = higher true reward (the user's reward of what the attribute reader sees); "
             "ties count half; 95% Wilson interval.", "",
             "| embedding | win rate vs base | 95% interval | mean reward | base mean reward |",
             "|---|---|---|---|---|"]
    for which, label in labels.items():
        r = result[which]
        lines.append(f"| {label} | {r['win_rate']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['reward']:.3f} | {r['base_reward']:.3f} |")
    interp = result.get("interpolation") or {}
    if interp:
        fmt = lambda c: ", ".join(f"{v:.2f}" for v in c)  # noqa: E731
        lines += ["", f"Interpolation u = (1-a) u_A + a u_B over {interp['pairs']} pairs of held-out users, "
                  f"a = {fmt(interp['alphas'])}:", "",
                  f"- user A's mean reward: {fmt(interp['user_a_reward'])} "
                  f"(monotone down: {interp['user_a_monotone']})",
                  f"- user B's mean reward: {fmt(interp['user_b_reward'])} (monotone up: {interp['user_b_monotone']})",
                  f"- pairs where both move monotonically: {interp['pairs_monotone_both']} of {interp['pairs']}"]
    lines += ["", "## Setup", "", "```json", json.dumps(setup, indent=2), "```", "", "## Examples", ""]
    for e in result.get("examples", []):
        lines.append(f"- **{e['user']}** ({e['persona']}): ppd {e['own']} / base {e['base']}")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
