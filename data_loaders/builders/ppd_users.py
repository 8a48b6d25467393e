"""Synthetic PPD users: rewards over the attributes of a `shapes` image.

A user weights six traits of what an image shows: warmth of its colour, size, clutter (how many
shapes), being centred, being high in the frame, and optionally one favourite colour. Weights are
drawn per user (each trait active with probability 0.6, at least two active, magnitudes in
[0.5, 1.5]); a favourite colour agrees with the user's warmth (a user who likes warm colours
favours red, orange or yellow), so users are self-consistent, and the 2^6 active/sign patterns
times continuous magnitudes make them diverse. A user's reward of an image is the weighted sum of
the traits of what the attribute reader sees in it: the expectation under the reader's
probabilities of each attribute's values (so a reward moves smoothly as an image becomes more
clearly large, red or centred, and two different images rarely tie). Everything is a function of
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


def value_traits(attribute: str, value: Any) -> dict[str, float]:
    """Trait values in [-1, 1] that one attribute value contributes."""
    if attribute == "color":
        return {"warm": WARM[value]}
    if attribute == "size":
        return {"large": 1.0 if value == "large" else -1.0}
    if attribute == "count":
        return {"clutter": float(value) - 2.0}
    if attribute == "position":
        if value in (None, "none"):
            return {"centred": 0.0, "high": 0.0}
        return {"centred": 1.0 if value == "center" else -1.0,
                "high": 1.0 if value.startswith("top") else -1.0 if value.startswith("bottom") else 0.0}
    return {}


def soft(attributes: dict[str, Any]) -> dict[str, list[float]]:
    """Attribute values (a `shapes` sample's json) as one-hot probabilities over ATTRIBUTES."""
    values = {**attributes, "position": attributes.get("position") or "none"}
    return {a: [1.0 if v == values[a] else 0.0 for v in vocab] for a, vocab in ATTRIBUTES.items()}


def hard(probabilities: dict[str, list[float]]) -> dict[str, Any]:
    """The most probable value of each attribute."""
    return {a: ATTRIBUTES[a][max(range(len(p)), key=p.__getitem__)] for a, p in probabilities.items()}


def traits(probabilities: dict[str, list[float]]) -> dict[str, float]:
    """Expected trait values under the reader's probabilities of each attribute's values."""
    out = {t: 0.0 for t in TRAITS}
    for attribute, probs in probabilities.items():
        for value, p in zip(ATTRIBUTES[attribute], probs):
            for trait, v in value_traits(attribute, value).items():
                out[trait] += p * v
    return out


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


def reward(persona: dict[str, Any], probabilities: dict[str, list[float]]) -> float:
    """The user's reward of an image: its expected trait values under what the reader sees (its
    probabilities per attribute; `soft(attributes)` for known attributes) times the user's weights,
    plus the favourite colour's weight times its probability."""
    values = traits(probabilities)
    total = sum(persona["weights"][t] * values[t] for t in TRAITS)
    if persona.get("favourite"):
        total += persona["favourite_weight"] * probabilities["color"][ATTRIBUTES["color"].index(persona["favourite"])]
    return float(round(total, 6))  # rounded: equal readings tie exactly, whatever the summation order


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
