"""FSPO examples as the job trains and evaluates on them: few-shot prompt text + completions.

Two sources with identical samples: the `fspo` builder's shards (data.path / data.eval_path) or,
when no path is given, the same examples generated on the fly (`synthetic.*`), so
`scaleyard run fspo --preset tiny` works from a fresh checkout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import Dataset

from scaleyard.data_loaders.builders.fspo import check_options, example, fspo_prompt
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import first_samples


class TooFewShots(ValueError):
    """An example holds fewer shots than prompt.shots asks for."""


def to_item(ex: dict[str, Any], shots: int) -> dict[str, str]:
    """The training item of an example: its prompt with the first `shots` shots, and both completions."""
    if len(ex["shots"]) < shots:
        raise TooFewShots(f"example of user {ex['user']} holds {len(ex['shots'])} shots but prompt.shots={shots}; "
                          "lower prompt.shots or build data with more shots (`--option shots=N`)")
    return {"prompt": fspo_prompt(ex["shots"][:shots], ex["question"]), "chosen": ex["chosen"],
            "rejected": ex["rejected"], "user": ex["user"]}


def synthetic_options(cfg: DictConfig) -> dict[str, int]:
    s = cfg.synthetic
    return {"shots": cfg.prompt.shots, "pairs_per_user": s.pairs_per_user, "examples_per_user": s.examples_per_user}


class SyntheticExamples(Dataset):
    """The `fspo` builder's train split, generated on demand (map-style: the platform resumes it)."""

    def __init__(self, cfg: DictConfig):
        self.seed, self.users, self.shots = cfg.synthetic.seed, cfg.synthetic.users, cfg.prompt.shots
        self.options = synthetic_options(cfg)
        check_options(**self.options)

    def __len__(self) -> int:
        return self.users * self.options["examples_per_user"]

    def __getitem__(self, index: int) -> dict[str, str]:
        return to_item(example(self.seed, "train", index, **self.options), self.shots)


@dataclass(frozen=True)
class ShardDecoder:
    """A shard sample (json) -> training item (prompt text and completions)."""

    shots: int

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, str]:
        return to_item(json.loads(raw["json"]), self.shots)


def heldout_examples(cfg: DictConfig, count: int) -> list[dict[str, Any]]:
    """`count` held-out examples, one per user (raw: persona, shots, question), from shards or generated."""
    if cfg.data.eval_path:
        index = load_index(cfg.data.eval_path)
        per_user = int(index.extra.get("examples_per_user", 1))
        out = []
        for batch in first_samples(index, lambda raw, pos: {"ex": json.loads(raw["json"])}, count * per_user, 64):
            out.extend(batch["ex"])
        return out[::per_user][:count]
    options = synthetic_options(cfg)
    per_user = options["examples_per_user"]
    users = min(count, cfg.synthetic.heldout_users)
    return [example(cfg.synthetic.seed, "heldout", u * per_user + u % per_user, **options) for u in range(users)]


def eval_items(examples: list[dict[str, Any]], shots: int) -> list[dict[str, Any]]:
    """For each held-out example: the user's own few-shot prompt, and the same question with the
    shots of a different user (the next example whose user differs), to test personalisation."""
    items = []
    for i, ex in enumerate(examples):
        other = next((o for o in examples[i + 1:] + examples[:i] if o["user"] != ex["user"]), None)
        if other is None:
            raise ValueError("evaluation needs held-out examples of at least two users; raise eval.examples")
        items.append({"user": ex["user"], "persona": ex["persona"], "question": ex["question"],
                      "prompt": to_item(ex, shots)["prompt"],
                      "other_prompt": fspo_prompt(other["shots"][:shots], ex["question"])})
    return items
