"""Prompts for the serving benchmark: random token ids, random words, or ShareGPT.

Random token ids give exact input lengths on servers whose ``/v1/completions`` accepts a prompt
as a list of ints (twinfer, vLLM). Random words are for chat endpoints and servers that only
take text; most of these common words are one token with their leading space, so a prompt of
``input_len`` words is close to ``input_len`` tokens, and the report uses the server's
``usage.prompt_tokens`` whenever it is given. ShareGPT prompts are the first human turn of each
conversation (``[{"conversations": [{"from": "human", "value": ...}, ...]}, ...]``).

All prompts of one benchmark are drawn from one seeded stream, so that no two concurrency
levels send the same prompts (which a prefix cache would answer without prefill).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over "
    "new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air "
    "away animal house point page letter mother answer found study still learn should world"
).split()


@dataclass
class Prompt:
    """One request's prompt; ``num_tokens`` when the client knows its length exactly."""

    prompt: str | list[int]
    num_tokens: int | None = None


class PromptSource:
    """Draws prompts for one benchmark; every call continues the same seeded stream."""

    def __init__(self, dataset: str, input_len: int, seed: int, use_token_ids: bool,
                 token_range: tuple[int, int] = (100, 10000)):
        if input_len < 1:
            raise ValueError(f"input_len must be at least 1, got {input_len}")
        lo, hi = token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token id range must satisfy 0 <= lo < hi, got {lo}:{hi}")
        self.input_len = input_len
        self.use_token_ids = use_token_ids
        self.token_range = token_range
        self._rng = random.Random(seed)
        self._sharegpt: list[str] | None = None
        self._next = 0
        if dataset.startswith("sharegpt:"):
            self._sharegpt = load_sharegpt(Path(dataset.split(":", 1)[1]))
            self._rng.shuffle(self._sharegpt)
        elif dataset != "random":
            raise ValueError(f"dataset must be 'random' or 'sharegpt:FILE', got {dataset!r}")

    def take(self, n: int) -> list[Prompt]:
        return [self._one() for _ in range(n)]

    def _one(self) -> Prompt:
        if self._sharegpt is not None:
            # Wraps around when a long benchmark uses more prompts than the file holds.
            text = self._sharegpt[self._next % len(self._sharegpt)]
            self._next += 1
            return Prompt(text)
        if self.use_token_ids:
            lo, hi = self.token_range
            return Prompt([self._rng.randrange(lo, hi) for _ in range(self.input_len)],
                          self.input_len)
        return Prompt(" ".join(self._rng.choice(_WORDS) for _ in range(self.input_len)))


def load_sharegpt(path: Path) -> list[str]:
    """The first human turn of every conversation that has one."""
    with open(path) as f:
        data = json.load(f)
    prompts = []
    for item in data:
        turns = item.get("conversations") or []
        text = next((t.get("value") for t in turns if t.get("from") == "human"), None)
        if text:
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no conversation with a human turn")
    return prompts


def parse_token_range(text: str) -> tuple[int, int]:
    """``"LO:HI"`` -> (LO, HI), a half-open range of token ids."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"token id range must look like LO:HI, got {text!r}") from None
    return lo, hi
