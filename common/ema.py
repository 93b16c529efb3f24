"""Exponential moving average of a module's weights: the weights a streaming model serves.

One shuffled pass per window with Adam leaves the *last* iterate noisy: measured on the FM, its calibration
(mean prediction / mean label, in-sample) swung between 0.88 and 1.29 from one day to the next whatever the
learning rate or batch size; the EMA of the iterates stayed within 0.95-1.09. The FM (fm.train) and the
experts (experts.train) keep training from the raw weights and serve the average; both checkpoint it
(``{"weights": {name: tensor}, "updates": int}``) so a resumed or warm-started run continues the same average.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class WeightEMA:
    """EMA of every floating tensor of a module's state: ema <- ema + (1 - d_t) (live - ema) after each step.

    d_t = min(decay, (1 + t) / (10 + t)) with t the updates so far (across windows), so a cold start is
    not anchored to the random init. Identical on every DDP rank (the live weights are).
    """

    def __init__(self, module: nn.Module, decay: float, state: dict[str, Any] | None = None) -> None:
        live = module.state_dict()
        self.names = [k for k, v in live.items() if v.is_floating_point()]
        self.live = [live[k] for k in self.names]  # views of the parameters: updated in place by the optimizer
        self.decay = decay
        saved = state or {}
        self.updates = int(saved.get("updates", 0))
        self.avg = [saved["weights"][k].clone() if saved else live[k].detach().clone() for k in self.names]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.avg, self.live, 1.0 - d)
        self.updates += 1

    def state(self) -> dict[str, Any]:
        return {"weights": {k: v.detach().cpu().clone() for k, v in zip(self.names, self.avg, strict=True)},
                "updates": self.updates}


def serving_weights(state: dict[str, Any]) -> dict[str, Tensor]:
    """The weights export and embeddings use: the EMA where the checkpoint has one, else the raw weights."""
    ema = state.get("ema")
    return state["model"] | ema["weights"] if ema else state["model"]
