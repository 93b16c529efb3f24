"""ExFM distillation parts: gradient scaling, the student adapter and the expert's loss.

- `scale_grad(x, beta)`: identity forward, gradient times beta backward. The auxiliary head reads the
  shared layers through it, so the FM-fitting loss moves the shared layers only by beta.
- `StudentAdapter`: a small MLP on the (detached) FM logit trained on fresh labels; its prediction
  (detached) is the auxiliary head's second distillation target.
- `expert_loss`: serving head on true labels only; aux head on the scaled FM prediction and on the
  adapter's prediction; adapter on true labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experts.config import ExpertConfig


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:  # type: ignore[override]
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.beta, None


def scale_grad(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by `beta` in the backward pass."""
    return _ScaleGrad.apply(x, beta)  # type: ignore[no-any-return]


class StudentAdapter(nn.Module):
    """Maps the FM logit (B,) to a fresher logit (B,), trained on this surface's true labels."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        last = self.net[2]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():  # start near the identity map: the FM logit passes through
            last.weight.mul_(0.1)
            last.bias.zero_()

    def forward(self, fm_logit: torch.Tensor) -> torch.Tensor:
        x = fm_logit.detach().unsqueeze(-1)  # (B, 1); no gradient ever reaches FM features
        return (self.net(x) + x).squeeze(-1)  # residual: adapter learns a correction


def expert_loss(out: dict[str, torch.Tensor], label: torch.Tensor, fm_logit: torch.Tensor, cfg: ExpertConfig) -> torch.Tensor:
    """Total training loss of one batch (scalar). `out` is the expert's forward output."""
    loss = F.binary_cross_entropy_with_logits(out["logit"], label)
    if not cfg.uses_kd:
        return loss
    target_fm = (cfg.kd_alpha * torch.sigmoid(fm_logit)).clamp(0.0, 1.0)
    target_sa = (cfg.kd_alpha * torch.sigmoid(out["adapter_logit"].detach())).clamp(0.0, 1.0)
    aux = F.binary_cross_entropy_with_logits(out["aux_logit"], target_fm)
    aux_sa = F.binary_cross_entropy_with_logits(out["aux_logit"], target_sa)
    adapter = F.binary_cross_entropy_with_logits(out["adapter_logit"], label)
    return loss + cfg.kd_weight * aux + cfg.adapter_weight * aux_sa + adapter
