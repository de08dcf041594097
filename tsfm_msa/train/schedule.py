"""Training schedules: the indexer-warmup -> sparse phase switch and the learning-rate curve."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseSchedule:
    """Dense attention with the indexer learning (``indexer_warmup``) until ``steps`` optimizer
    steps or ``tokens`` training tokens have passed, whichever is given (both: the later), then
    ``sparse``. ``steps=0`` and no ``tokens`` starts sparse at once (no warmup)."""

    steps: int | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"indexer_warmup.{name} must be a non-negative integer or null, got {value!r}")

    def phase(self, step: int, tokens_seen: int) -> str:
        warm = False
        if self.steps is not None and step < self.steps:
            warm = True
        if self.tokens is not None and tokens_seen < self.tokens:
            warm = True
        return "indexer_warmup" if warm else "sparse"


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
