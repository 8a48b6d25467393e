"""Synthetic users for FSPO: personas over measurable response traits, a scorer that measures
those traits from text (a user's reward), questions over many topics, and a template generator
that realises any combination of traits.

Why templates rather than the base LM with style instructions: the scorer must be able to tell
the traits apart reliably and the data must build in seconds on 2 CPU cores, deterministically;
a template realises exactly the traits asked for, so every preference pair is self-consistent
(the paper's lesson: synthetic users must be diverse and self-consistent to transfer). The
content of each answer (three key points and an example per question) is hand-written in
fspo_questions.py.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from scaleyard.data_loaders.builders.fspo_questions import QUESTIONS

# Each trait is measured in [0, 1] from the text; a persona weights it with a sign (wants more /
# wants less) or ignores it.
TRAITS = ("length", "bullets", "formality", "examples", "summary")
TRAIT_WORDS = {
    "length": ("short answers", "long, thorough answers"),
    "bullets": ("flowing prose", "bullet points"),
    "formality": ("a casual, chatty tone", "a formal tone"),
    "examples": ("no examples", "a concrete example"),
    "summary": ("no closing summary", "a closing summary"),
}

@dataclass(frozen=True)
class Persona:
    """One synthetic user: a signed weight per trait (0 = indifferent)."""

    user: str
    weights: tuple[float, ...]  # aligned with TRAITS

    def as_dict(self) -> dict[str, float]:
        return dict(zip(TRAITS, self.weights))

    def describe(self) -> str:
        likes = [TRAIT_WORDS[t][int(w > 0)] for t, w in zip(TRAITS, self.weights) if w]
        return "prefers " + ", ".join(likes)


def measure(text: str) -> dict[str, float]:
    """Each trait of a response in [0, 1], measured from the text alone."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    words = len(text.split())
    lower = text.lower()
    bulleted = sum(bool(re.match(r"^([-*\u2022]|\d+[.)])\s", line)) for line in lines)
    casual = (
        len(re.findall(r"\b\w+'(s|ll|re|ve|t|d|m)\b", lower))
        + text.count("!")
        + len(re.findall(r"\b(hey|honestly|stuff|pretty|super|cool|awesome|totally)\b", lower))
    )
    formal = len(
        re.findall(
            r"\b(certainly|therefore|furthermore|advisable|additionally|consequently|"
            r"recommended|regards|information)\b",
            lower,
        )
    )
    return {
        "length": float(np.clip((words - 20) / 40, 0.0, 1.0)),
        "bullets": bulleted / len(lines) if lines else 0.0,
        "formality": formal / (formal + casual) if formal + casual else 0.5,
        "examples": float(bool(re.search(r"\b(for example|for instance|e\.g\.)", lower))),
        "summary": float(bool(re.search(r"^(in summary|in short|to sum up)\b", lower, re.MULTILINE))),
    }


MIN_WORDS = 5
MAX_REPEATED_LINES = 0.25


def degenerate(text: str) -> bool:
    """A non-answer (under MIN_WORDS words) or a loop (over MAX_REPEATED_LINES of the lines repeat an
    earlier line): a generator's failure modes, which no user wants whatever their style."""
    if len(text.split()) < MIN_WORDS:
        return True
    lines = [line.strip().lower() for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / len(lines) > MAX_REPEATED_LINES


def reward(persona: Persona | Mapping[str, float], text: str) -> float:
    """The user's reward of a response: sum over traits of weight x (2 x measured - 1), in
    [-sum |w|, sum |w|]; a degenerate response gets -sum |w| - 1, below every real answer in any
    style (template responses are never degenerate)."""
    weights = persona.as_dict() if isinstance(persona, Persona) else persona
    if degenerate(text):
        return -float(sum(abs(w) for w in weights.values())) - 1.0
    traits = measure(text)
    return float(sum(w * (2.0 * traits[t] - 1.0) for t, w in weights.items()))


# --- personas ---------------------------------------------------------------------------------
def sign_patterns() -> list[tuple[int, ...]]:
    """Every trait pattern (-1 / 0 / +1 per trait) with at least two traits the user cares about."""
    return [p for p in itertools.product((-1, 0, 1), repeat=len(TRAITS)) if sum(map(abs, p)) >= 2]


def heldout_pattern(pattern: tuple[int, ...]) -> bool:
    """About a fifth of the patterns belong only to held-out users, so evaluation meets
    preference combinations never trained on (a stable hash: Python's hash() is salted)."""
    return hashlib.sha256(repr(pattern).encode()).digest()[0] % 5 == 0


def make_persona(user: str, rng: np.random.Generator, heldout: bool) -> Persona:
    patterns = [p for p in sign_patterns() if heldout_pattern(p) == heldout]
    pattern = patterns[rng.integers(len(patterns))]
    weights = tuple(round(float(s * rng.uniform(0.5, 1.5)), 3) for s in pattern)
    return Persona(user, weights)


# --- the generator ----------------------------------------------------------------------------
CONTRACTIONS = (
    (r"\bit is\b", "it's"),
    (r"\bdo not\b", "don't"),
    (r"\byou are\b", "you're"),
    (r"\bthat is\b", "that's"),
    (r"\bcannot\b", "can't"),
    (r"\bthey are\b", "they're"),
)


def _casual(sentence: str) -> str:
    for pattern, short in CONTRACTIONS:
        sentence = re.sub(pattern, short, sentence, flags=re.IGNORECASE)
    return sentence[:1].upper() + sentence[1:]


def realise(question: int, style: Mapping[str, bool], rng: np.random.Generator) -> str:
    """A response to QUESTIONS[question] with the given traits on or off (`style[trait]` True =
    the trait's high end: long, bullets, formal, with example, with summary)."""
    _, _, points, example = QUESTIONS[question]
    formal = style["formality"]
    chosen = list(points) if style["length"] else [points[int(rng.integers(len(points)))]]
    if style["length"]:
        chosen.append("Take your time and adjust the approach as you learn what works for you")
    if not formal:
        chosen = [_casual(p) for p in chosen]
    opener = (
        ("Certainly.", "Certainly, here is the information.")[int(rng.integers(2))]
        if formal
        else ("Hey, good question!", "Oh, nice one!")[int(rng.integers(2))]
    )
    body = "\n".join(f"- {p}." for p in chosen) if style["bullets"] else " ".join(f"{p}." for p in chosen)
    parts = [opener, body]
    if style["examples"]:
        parts.append(f"For example, {example}.")
    if style["summary"]:
        parts.append(
            "In summary, "
            + ("it is advisable to start with the first step." if formal else "just start small and you'll be fine!")
        )
    parts.append("I hope this information is useful." if formal else "Hope that helps, it's pretty simple stuff!")
    return "\n".join(parts)


def preference_pair(
    persona: Persona, question: int, rng: np.random.Generator, candidates: int = 4
) -> tuple[str, str, float, float]:
    """(chosen, rejected, their rewards): the best and worst of `candidates` responses with random
    traits, as judged by the user's reward; redrawn until they differ."""
    while True:
        responses = [realise(question, {t: bool(rng.integers(2)) for t in TRAITS}, rng) for _ in range(candidates)]
        rewards = [reward(persona, r) for r in responses]
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] > rewards[worst]:
            return responses[best], responses[worst], rewards[best], rewards[worst]
