"""PPD preference pairs: per synthetic user and prompt, K samples of a trained t2i model scored by
that user through the attribute reader; the best and worst of them become a pair.

`scaleyard data build ppd_pairs --out DIR --option base=T2I_RUN --option reader=ATTRIBUTES_RUN`

For each prompt (data_loaders/builders/ppd_users.py `prompts()`), `pool` base samples are drawn
once, each from its own seeded noise; a user's K samples for a prompt are K distinct samples of
that pool (same prompt, different noise). Users' rewards are computed from what the reader sees.
A draw whose K samples all get the same reward is a tie and is dropped (drawn again, up to 20
times, then from the user's next prompt; a user who ties on every prompt is an error naming the
user, and is dropped: `dropped_users` in index.json counts them). Each written sample is one example:
a target pair (preferred.png, dispreferred.png, prompt, user, margin = reward difference) and
`shots` other pairs of the same user (context.png, a strip preferred|dispreferred per pair)
that the job's user encoder reads. Splits: `train` and `heldout` (disjoint users).

The networks come from the caller (`build(networks=...)`: the platform asks the `ppd` job's
`builder_networks`), not by import: data_loaders/ sits below platform/, models/ and jobs/.
Everything is a function of the options: building twice gives byte-identical shards (the
sampling runs in float32 on the CPU, in fixed batches).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from scaleyard.data_loaders.builders import Split
from scaleyard.data_loaders.builders.ppd_users import SPLITS, describe, hard, make_persona, prompts, reward
from scaleyard.data_loaders.index import DataError

TIE_RETRIES = 20


def check_options(users: int, heldout_users: int, pairs_per_user: int, shots: int, samples: int, pool: int) -> None:
    if shots < 1:
        raise DataError(f"ppd_pairs option shots={shots}: a user needs at least 1 context pair (the paper uses 4)")
    if pairs_per_user < shots + 1:
        raise DataError(f"ppd_pairs option pairs_per_user={pairs_per_user}: each example needs shots + 1 = "
                        f"{shots + 1} pairs of one user (the target and {shots} context pairs)")
    if samples < 2 or pool < samples:
        raise DataError(f"ppd_pairs options samples={samples}, pool={pool}: need 2 <= samples <= pool")
    if users < 1 or heldout_users < 1:
        raise DataError(f"ppd_pairs options users={users}, heldout_users={heldout_users}: need at least 1 each")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


class Pool:
    """`size` base samples per prompt (uint8 [H, W, C]) and the reader's attribute probabilities of each."""

    def __init__(self, sources: Any, seed: int, size: int):
        self.images: list[np.ndarray] = []
        self.attributes: list[list[dict[str, Any]]] = []
        for number, prompt in enumerate(prompts()):
            generator = torch.Generator().manual_seed(seed * 1000 + number)
            noise = torch.randn(size, *sources.noise_shape, generator=generator)
            images = sources.sample(prompt, noise)
            self.attributes.append(sources.read(images))
            self.images.append((images * 255).round().byte().permute(0, 2, 3, 1).numpy())


def user_pairs(pool: Pool, seed: int, split: str, user: int, pairs_per_user: int, samples: int) -> dict[str, Any]:
    persona = make_persona(seed, split, user)
    rng = np.random.default_rng([seed, SPLITS[split], user, 3])
    texts = prompts()
    order = rng.permutation(len(texts))
    pairs = []
    for number in range(pairs_per_user):
        # the user's next prompt; when its draws all tie (the user is indifferent to everything
        # that varies in it), the prompts after it in the user's order
        for shift in range(len(texts)):
            p = int(order[(number + shift) % len(texts)])
            size = len(pool.attributes[p])
            for _ in range(TIE_RETRIES):
                drawn = rng.choice(size, samples, replace=False)
                rewards = [reward(persona, pool.attributes[p][i]) for i in drawn]
                if max(rewards) > min(rewards):
                    break
            else:
                continue
            break
        else:
            raise DataError(f"ppd_pairs: user {persona['user']} ({describe(persona)}) ties on every draw of {samples} "
                            "samples for every prompt: the base model's samples do not vary in what this user cares "
                            "about (train the base longer, or raise samples / pool)")
        best, worst = int(drawn[int(np.argmax(rewards))]), int(drawn[int(np.argmin(rewards))])
        pairs.append({"prompt": texts[p], "prompt_index": p, "preferred": best, "dispreferred": worst,
                      "preferred_reward": max(rewards), "dispreferred_reward": min(rewards),
                      "margin": round(max(rewards) - min(rewards), 6)})
    return {"persona": persona, "pairs": pairs}


def example(pool: Pool, seed: int, split: str, data: dict[str, Any], target: int, shots: int) -> dict[str, Any]:
    """One written sample: pair `target` of a user (`user_pairs`), and `shots` other pairs of that
    user (a fixed random choice) as its context."""
    user, pairs_per_user = int(data["persona"]["user"].split("-")[1]), len(data["pairs"])
    rng = np.random.default_rng([seed, SPLITS[split], user, target, 7])
    others = [int(i) for i in rng.permutation([i for i in range(pairs_per_user) if i != target])[:shots]]
    pair = data["pairs"][target]
    image = lambda p, which: pool.images[p["prompt_index"]][p[which]]  # noqa: E731
    strip = np.concatenate([image(data["pairs"][i], w) for i in others for w in ("preferred", "dispreferred")], axis=1)
    meta = {"user": data["persona"]["user"], "persona": data["persona"], "prompt": pair["prompt"],
            "margin": pair["margin"], "preferred_reward": pair["preferred_reward"],
            "dispreferred_reward": pair["dispreferred_reward"],
            "preferred_attributes": hard(pool.attributes[pair["prompt_index"]][pair["preferred"]]),
            "dispreferred_attributes": hard(pool.attributes[pair["prompt_index"]][pair["dispreferred"]]),
            "context": [{k: data["pairs"][i][k] for k in ("prompt", "margin")} for i in others]}
    return {"__key__": f"{user:05d}{target:03d}", "preferred.png": png(image(pair, "preferred")),
            "dispreferred.png": png(image(pair, "dispreferred")), "context.png": png(strip), "json": meta}


def splits(limit: int | None = None, base: str = "", reader: str = "", seed: int = 0, users: int = 300,
           heldout_users: int = 50, pairs_per_user: int = 6, shots: int = 4, samples: int = 4, pool: int = 64,
           steps: int = 20, guidance: float = 2.0, networks: Callable[..., Any] | None = None) -> list[Split]:
    check_options(users, heldout_users, pairs_per_user, shots, samples, pool)
    if networks is None:
        raise DataError("ppd_pairs samples a trained t2i run and reads it with an attribute reader: build it through "
                        "`scaleyard data build ppd_pairs` (data_loaders.builders.build supplies the networks)")
    sources = networks(base=base, reader=reader, steps=steps, guidance=guidance)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        drawn = Pool(sources, seed, pool)
    c, h, w = sources.noise_shape
    out = []
    for split, count in (("train", users), ("heldout", heldout_users)):
        kept, dropped = [], []
        for u in range(count):
            try:
                kept.append(user_pairs(drawn, seed, split, u, pairs_per_user, samples))
            except DataError as err:  # ties on every prompt: the user has no pairs, so no examples
                dropped.append(str(err))
        if not kept:
            raise DataError(f"ppd_pairs split {split}: every user ties on every prompt, e.g. {dropped[0]}")
        size = len(kept) * pairs_per_user if limit is None else min(limit, len(kept) * pairs_per_user)

        def make(kept: list[dict[str, Any]] = kept, split: str = split, size: int = size) -> Iterator[dict]:
            for i in range(size):
                data = kept[i // pairs_per_user]
                yield example(drawn, seed, split, data, i % pairs_per_user, shots)

        out.append(Split(split, make, size=size, schema={
            "preferred.png": f"uint8[{h},{w},{c}] PNG", "dispreferred.png": f"uint8[{h},{w},{c}] PNG",
            "context.png": f"uint8[{h},{2 * shots * w},{c}] PNG: {shots} pairs, preferred|dispreferred",
            "json": "user, persona, prompt, margin, rewards, attributes"},
            extra={"image_shape": [c, h, w], "shots": shots, "users": len(kept), "pairs_per_user": pairs_per_user,
                   "dropped_users": len(dropped), "samples": samples, "pool": pool, "seed": seed,
                   "prompts": prompts()}))
    return out
