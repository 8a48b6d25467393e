"""FSPO preference data: per synthetic user, questions with (preferred, dispreferred) responses,
and training examples in the paper's few-shot format.

Each sample is one example: a user, `shots` preference pairs of that same user (other questions),
then the task question with its chosen and rejected responses (json). The prompt text is built
by the job from the shots it asks for (`fspo_prompt`), so one dataset serves 1..`shots` shots.
Splits: `train` (users over ~4/5 of the trait patterns) and `heldout` (disjoint users whose trait
patterns never occur in training). Everything is a function of (seed, split, user), so building
twice gives byte-identical shards and `example(...)` reproduces any sample without the shards.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from scaleyard.data_loaders.builders import Split
from scaleyard.data_loaders.builders.fspo_users import QUESTIONS, TRAITS, make_persona, preference_pair
from scaleyard.data_loaders.index import DataError

SPLITS = {"train": 0, "heldout": 1}
TASK = "Given the examples above, generate a preferred response to the following question."
ASSISTANT_PREFIX = "## Preferred Response\n"  # opens the completion; part of the prompt, never scored


def fspo_prompt(shots: Sequence[dict[str, str]], question: str) -> str:
    """The paper's few-shot prompt: each shot as `# Example i / ## Question / ## Preferred Response /
    ## Dispreferred Response`, then `# Task` and the question."""
    parts = [f"# Example {i}\n## Question\n{s['question']}\n## Preferred Response\n{s['chosen']}\n"
             f"## Dispreferred Response\n{s['rejected']}\n" for i, s in enumerate(shots, 1)]
    parts.append(f"# Task\n{TASK}\n## Question\n{question}\n")
    return "\n".join(parts)


def check_options(shots: int, pairs_per_user: int, examples_per_user: int) -> None:
    if shots < 1:
        raise DataError(f"fspo option shots={shots}: give at least 1 shot per example (the paper uses 4-8)")
    if pairs_per_user < shots + 1:
        raise DataError(f"fspo option pairs_per_user={pairs_per_user} gives fewer shots than asked: each example needs "
                        f"shots + 1 = {shots + 1} pairs of one user; raise pairs_per_user or lower shots")
    if pairs_per_user > len(QUESTIONS):
        raise DataError(f"fspo option pairs_per_user={pairs_per_user}: there are only {len(QUESTIONS)} questions")
    if not 1 <= examples_per_user <= pairs_per_user:
        raise DataError(f"fspo option examples_per_user={examples_per_user} must be between 1 and "
                        f"pairs_per_user={pairs_per_user}")


@functools.lru_cache(maxsize=256)  # consecutive examples share a user
def user_pairs(seed: int, split: str, user: int, pairs_per_user: int) -> dict[str, Any]:
    """One user's persona and preference pairs (distinct questions), drawn from (seed, split, user)."""
    rng = np.random.default_rng([seed, SPLITS[split], user])
    persona = make_persona(f"{split}-{user:05d}", rng, heldout=split == "heldout")
    questions = rng.permutation(len(QUESTIONS))[:pairs_per_user]
    pairs = []
    for q in questions:
        chosen, rejected, r_chosen, r_rejected = preference_pair(persona, int(q), rng)
        pairs.append({"question": QUESTIONS[q][1], "topic": QUESTIONS[q][0], "chosen": chosen, "rejected": rejected,
                      "chosen_reward": r_chosen, "rejected_reward": r_rejected})
    return {"user": persona.user, "persona": persona.as_dict(), "pairs": pairs}


def example(seed: int, split: str, index: int, shots: int = 4, pairs_per_user: int = 8,
            examples_per_user: int = 4) -> dict[str, Any]:
    """Sample `index` of a split: user index // examples_per_user, target pair index % examples_per_user,
    `shots` other pairs of the same user (a fixed random choice) as the shots."""
    user, target = divmod(index, examples_per_user)
    data = user_pairs(seed, split, user, pairs_per_user)
    rng = np.random.default_rng([seed, SPLITS[split], user, target, 7])
    others = [i for i in range(pairs_per_user) if i != target]
    picked = [data["pairs"][i] for i in rng.permutation(others)[:shots]]
    pair = copy.deepcopy(data["pairs"][target])
    return {"user": data["user"], "persona": data["persona"],
            "shots": [{k: s[k] for k in ("question", "chosen", "rejected")} for s in picked], **pair}


def splits(limit: int | None = None, seed: int = 0, users: int = 400, heldout_users: int = 100, shots: int = 4,
           pairs_per_user: int = 8, examples_per_user: int = 4) -> list[Split]:
    check_options(shots, pairs_per_user, examples_per_user)
    out = []
    for split, count in (("train", users), ("heldout", heldout_users)):
        if count < 1:
            raise DataError(f"fspo option {'users' if split == 'train' else 'heldout_users'}={count}: need at least 1")
        size = count * examples_per_user if limit is None else min(limit, count * examples_per_user)

        def samples(split: str = split, size: int = size) -> Iterator[dict]:
            for i in range(size):
                yield {"__key__": f"{i:07d}", "json": example(seed, split, i, shots, pairs_per_user, examples_per_user)}

        out.append(Split(split, samples, schema={"json": "user, persona, shots, question, chosen, rejected, rewards"},
                         extra={"shots": shots, "users": count, "pairs_per_user": pairs_per_user,
                                "examples_per_user": examples_per_user, "seed": seed, "traits": list(TRAITS),
                                "questions": len(QUESTIONS)}, size=size))
    return out
