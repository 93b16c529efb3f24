"""ExFM distillation parts: gradient scaling, the student adapter and the expert's loss.

- `scale_grad(x, beta)`: identity forward, gradient times beta backward. The auxiliary head reads the
  shared layers through it, so the FM-fitting loss moves the shared layers only by beta.
- `StudentAdapter`: a small MLP on the (detached) FM logit trained on fresh labels; its prediction
  (detached) is the auxiliary head's second distillation target.
- `expert_loss`: serving head on true labels only; aux head on the scaled FM prediction and on the
  adapter's prediction, both weighted by `kd_scale`; adapter on true labels.
- `kd_scale(student_ne, teacher_ne, tau)`: how much distillation a window gets, from the teacher's measured
  advantage over the student on rows neither trained on (the progressive eval before training): 0 when
  the FM is no better than the student, 1 from an advantage of `tau` NE on. Distillation from a teacher
  that is not ahead only pulls the shared layers towards a worse model (measured on MovieLens genres,
  where the FM's first windows trail the experts).
"""

from __future__ import annotations

import math

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


def kd_scale(student_ne: float, teacher_ne: float, tau: float) -> float:
    """Weight of the distillation losses in [0, 1]: (student NE - teacher NE) / tau, clipped (NaN -> 0)."""
    advantage = student_ne - teacher_ne
    if not math.isfinite(advantage):
        return 0.0
    if tau <= 0:
        return float(advantage > 0)
    return min(max(advantage / tau, 0.0), 1.0)


def expert_loss(out: dict[str, torch.Tensor], label: torch.Tensor, fm_logit: torch.Tensor, cfg: ExpertConfig,
                scale: float = 1.0) -> torch.Tensor:
    """Total training loss of one batch (scalar). `out` is the expert's forward output; `scale` = kd_scale."""
    loss = F.binary_cross_entropy_with_logits(out["logit"], label)
    if not cfg.uses_kd:
        return loss
    target_fm = (cfg.kd_alpha * torch.sigmoid(fm_logit)).clamp(0.0, 1.0)
    target_sa = (cfg.kd_alpha * torch.sigmoid(out["adapter_logit"].detach())).clamp(0.0, 1.0)
    aux = F.binary_cross_entropy_with_logits(out["aux_logit"], target_fm)
    aux_sa = F.binary_cross_entropy_with_logits(out["aux_logit"], target_sa)
    adapter = F.binary_cross_entropy_with_logits(out["adapter_logit"], label)
    return loss + scale * (cfg.kd_weight * aux + cfg.adapter_weight * aux_sa) + adapter
