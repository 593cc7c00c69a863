"""An exponential moving average of a model's weights, kept while it trains.

The average of the weights over the last steps sits nearer the middle of the minimum the
optimizer circles around than the last step's weights do, so it often generalises a little
better at no cost to training (Polyak and Juditsky 1992; Izmailov et al. 2018); a schedule that
anneals the rate to zero, like lenet's one-cycle, already does much of the same.
`lenet train --ema DECAY` validates, tests and saves the average.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.swa_utils import AveragedModel

# Update n keeps min(decay, (1 + n) / (WARMUP + n)) of the average: early on the average spans
# about the last n / 9 steps, and the decay takes over only after (10 decay - 1) / (1 - decay)
# updates (890 for 0.99, 8,990 for 0.999; a two-epoch lenet-relu run makes 430). With a fixed
# 0.999 from the start, the weights after the first step would still weigh 65% of the average
# after 430 steps.
WARMUP = 10

AverageFn = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]


def _ema_update(decay: float) -> AverageFn:
    """The update torch's AveragedModel calls (its ``multi_avg_fn``) after the first, which
    copies."""

    def update(
        averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor
    ) -> None:
        # `updates` counts the updates made before this one (at least 1: the first copies).
        n = float(updates)
        rate = 1.0 - min(decay, (1.0 + n) / (WARMUP + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, rate)
        else:  # integer buffers (BatchNorm's batch count) are counts, not weights
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)

    return update


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The running average of ``model``'s parameters and buffers (BatchNorm statistics too), on
    the model's device and in its memory layout: fold in each step's weights with
    ``update_parameters(model)``; the averaged network is its ``module``."""
    average = AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=True)
    return average.eval()  # only ever evaluated; BatchNorm uses the averaged statistics
