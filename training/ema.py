"""Exponential moving average of a network's weights during fine-tuning (Polyak averaging)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from cbmir.errors import InvalidInputError


class WeightAverage:
    """A running average of the floating-point parameters and buffers of some modules.

    ``update`` after each optimisation step moves the average towards the live weights by ``1 - d``, with
    ``d = min(decay, (1 + t) / (10 + t))`` at step ``t``, so early steps (random head) fade quickly. Integer buffers
    (BatchNorm's step counters) are copied. ``applied`` swaps the average into the modules for a while.

    Args:
        modules: the modules to average (e.g. the backbone and the classification head).
        decay: the long-run decay in (0, 1); 0.995 averages over roughly the last 200 steps.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise InvalidInputError(f"the average's decay must be in (0, 1), e.g. 0.995; got {decay}")
        self.decay = decay
        self.steps = 0
        self._live = [t for m in modules for t in m.state_dict(keep_vars=True).values()]
        self._average = [t.detach().clone() for t in self._live]
        pairs = list(zip(self._average, self._live, strict=True))
        self._floating_average = [a for a, t in pairs if t.is_floating_point()]
        self._floating_live = [t.detach() for _, t in pairs if t.is_floating_point()]
        self._counters = [(a, t) for a, t in pairs if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live weights into the average (call after every optimiser step)."""
        self.steps += 1
        weight = 1.0 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self._floating_average, self._floating_live, weight)
        for average, live in self._counters:
            average.copy_(live)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The modules hold the average inside the block and their live weights again after it."""
        saved = [t.detach().clone() for t in self._live]
        with torch.no_grad():
            for live, average in zip(self._live, self._average, strict=True):
                live.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for live, kept in zip(self._live, saved, strict=True):
                    live.copy_(kept)
