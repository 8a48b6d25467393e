"""Synthetic PPD users: rewards over the attributes of a `shapes` image.

A user weights six traits of what an image shows: warmth of its colour, size, clutter (how many
shapes), being centred, being high in the frame, and optionally one favourite colour. Weights are
drawn per user (each trait active with probability 0.6, at least two active, magnitudes in
[0.5, 1.5]); a favourite colour agrees with the user's warmth (a user who likes warm colours
favours red, orange or yellow), so users are self-consistent, and the 2^6 active/sign patterns
times continuous magnitudes make them diverse. A user's reward of an image is the weighted sum of
the traits of the attributes the attribute reader sees in it. Everything is a function of
(seed, split, user): the same user is drawn in the builder, the job and the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scaleyard.data_loaders.builders.shapes import COLORS, POSITIONS, SHAPES, SIZES

TRAITS = ("warm", "large", "clutter", "centred", "high")
WARM = {"red": 1.0, "orange": 1.0, "yellow": 1.0, "white": 0.0, "green": -1.0, "blue": -1.0, "purple": -1.0}
SPLITS = {"train": 0, "heldout": 1}
ATTRIBUTES: dict[str, list[Any]] = {  # what the attribute reader reads; position "none" when there are 2-3 shapes
    "color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "count": [1, 2, 3],
    "position": [*POSITIONS, "none"],
}


def prompts() -> list[str]:
    """Prompts that fix the shape and leave colour, size, position (and for "<shape> shapes" the
    count) open: what the users' preferences are about."""
    return [p for shape in SHAPES for p in (f"{shape} shapes", f"a {shape}")]


def traits(attributes: dict[str, Any]) -> dict[str, float]:
    """Trait values in [-1, 1] of one image's attributes."""
    position = attributes.get("position")
    if position in (None, "none"):
        centred = high = 0.0
    else:
        centred = 1.0 if position == "center" else -1.0
        high = 1.0 if position.startswith("top") else -1.0 if position.startswith("bottom") else 0.0
    return {"warm": WARM[attributes["color"]], "large": 1.0 if attributes["size"] == "large" else -1.0,
            "clutter": float(attributes["count"]) - 2.0, "centred": centred, "high": high}


def make_persona(seed: int, split: str, user: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, SPLITS[split], user, 11])
    weights = {t: 0.0 for t in TRAITS}
    active = [t for t in TRAITS if rng.random() < 0.6]
    while len(active) < 2:
        active = sorted(set(active) | {TRAITS[int(rng.integers(len(TRAITS)))]}, key=TRAITS.index)
    for t in active:
        weights[t] = float(np.round(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5), 3))
    favourite, favourite_weight = None, 0.0
    if rng.random() < 0.4:
        side = np.sign(weights["warm"]) if weights["warm"] else float(rng.choice([-1.0, 1.0]))
        options = [c for c, w in WARM.items() if w == side]
        favourite = options[int(rng.integers(len(options)))]
        favourite_weight = float(np.round(rng.uniform(0.5, 1.5), 3))
    return {"user": f"{split}-{user:05d}", "weights": weights, "favourite": favourite,
            "favourite_weight": favourite_weight}


def reward(persona: dict[str, Any], attributes: dict[str, Any]) -> float:
    values = traits(attributes)
    total = sum(persona["weights"][t] * values[t] for t in TRAITS)
    if persona.get("favourite") and attributes["color"] == persona["favourite"]:
        total += persona["favourite_weight"]
    return float(round(total, 6))  # rounded: equal attributes tie exactly, whatever the summation order


def describe(persona: dict[str, Any]) -> str:
    """e.g. "likes warm, large; dislikes clutter; favourite colour red"."""
    words = {"warm": ("warm colours", "cool colours"), "large": ("large shapes", "small shapes"),
             "clutter": ("many shapes", "a single shape"), "centred": ("centred", "off-centre"),
             "high": ("high in the frame", "low in the frame")}
    likes = [words[t][0 if w > 0 else 1] for t, w in persona["weights"].items() if w]
    text = "likes " + ", ".join(likes)
    if persona.get("favourite"):
        text += f"; favourite colour {persona['favourite']}"
    return text
