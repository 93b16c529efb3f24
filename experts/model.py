"""The surface expert: hashed embeddings of its own features + MLP, with optional FM-fed parts.

Inputs (a dict of tensors, see experts/data.py; B = batch, L = history length, R = FM repr width,
T = target-aware embedding width):
  cats      (B, F) int64   raw ids of OWN_FEATURES, hashed here (so serving needs no vocabulary)
  loop_repr (B, L, R) f32  the user's last L historical FM representations (loopfm), zero padded
  loop_mask (B, L) bool    True where loop_repr holds a real entry
  loop_click (B, L) f32    the click label of each history entry (0 on padding)
  tae       (B, T) f32     FM target-aware embedding (fe), detached
  fm_logit  (B,) f32       FM click logit (kd: the adapter's input; never a serving-head input)
  counters  (B, C) f32     point-in-time counters (features.counters.DENSE_NAMES): own features of every
                           variant (cfg.counters), beside the embeddings into the trunk and as a wide linear
                           term on the logit (zero-initialised), so that base is the counting baseline and more
Output: {"logit": (B,)} plus "aux_logit", "adapter_logit" for kd variants. The serving prediction is
sigmoid(logit) for every variant.
"""

from __future__ import annotations

import torch
from torch import nn

from experts.config import OWN_FEATURES, ExpertConfig
from experts.distill import StudentAdapter, scale_grad
from features.counters import DENSE_NAMES

_HASH_MULT = 0x9E3779B1  # Fibonacci hashing; int64 overflow wraps, which is fine for bucketing


class HashedEmbeddings(nn.Module):
    """One table; feature f uses its own block of buckets[f] rows (TorchRec-style offsets)."""

    def __init__(self, buckets: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(sum(buckets), dim)
        nn.init.normal_(self.table.weight, std=0.02)
        sizes = torch.tensor(buckets, dtype=torch.int64)
        self.register_buffer("sizes", sizes, persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)

    def forward(self, cats: torch.Tensor) -> torch.Tensor:
        salt = torch.arange(cats.shape[1], device=cats.device) * 7919
        sizes, offsets = self.get_buffer("sizes"), self.get_buffer("offsets")
        idx = torch.remainder((cats + salt) * _HASH_MULT, sizes) + offsets  # (B, F)
        return self.table(idx)  # (B, F, D)


class TargetAttention(nn.Module):
    """DIN-style attention: the expert's item embedding queries the user's FM history."""

    def __init__(self, query_dim: int, repr_dim: int, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(query_dim, repr_dim)
        self.score = nn.Sequential(nn.Linear(4 * repr_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, item: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.query(item).unsqueeze(1).expand_as(hist)  # (B, L, R)
        s = self.score(torch.cat([q, hist, q * hist, q - hist], dim=-1)).squeeze(-1)  # (B, L)
        s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows (no history) -> zero weights
        return (w.unsqueeze(-1) * hist).sum(1)  # (B, R)


def _masked_mean(hist: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the history slots: hist (B, L, R), weight (B, L) >= 0 -> (B, R); 0 if no weight."""
    return (hist * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp(min=1.0)


class LoopPooling(nn.Module):
    """LoopFM: pools the user's FM history into (B, 3R + 2): mean, DIN target attention, clicked-entry mean,
    plus the history's click rate and log length. Not normalised: see Expert."""

    def __init__(self, query_dim: int, repr_dim: int, hidden: int) -> None:
        super().__init__()
        self.attention = TargetAttention(query_dim, repr_dim, hidden)

    def forward(self, item: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor, click: torch.Tensor) -> torch.Tensor:
        real = mask.float()  # (B, L)
        pooled = torch.cat([_masked_mean(hist, real), self.attention(item, hist, mask),
                            _masked_mean(hist, click * real)], dim=-1)  # (B, 3R)
        count = real.sum(1, keepdim=True)  # (B, 1)
        rate = (click * real).sum(1, keepdim=True) / count.clamp(min=1.0)
        return torch.cat([pooled, rate, torch.log1p(count)], dim=-1)


class Expert(nn.Module):
    """Own features -> trunk -> head, as base; FM-fed parts add to the trunk's first pre-activation.

    An FM-fed variant starts as exactly its base: the own-feature modules are created first (the same
    seed gives every variant the same initial base weights), the FM inputs enter through projections
    initialised to zero (`fm_in` of a zero vector adds nothing), and the distillation heads are separate.
    So its training departs from base's only through what the FM inputs carry, not through a different
    random start (measured on the built-in stream: zero-initialised FM inputs moved loopfm from +0.0033
    NE above base on video to -0.0020 below; paired-start variants are compared in the README).
    """

    def __init__(self, cfg: ExpertConfig, repr_dim: int, tae_dim: int) -> None:
        super().__init__()
        if not cfg.hidden:
            raise ValueError("ExpertConfig.hidden needs at least one layer (the FM inputs join the first)")
        self.cfg, self.repr_dim, self.tae_dim = cfg, repr_dim, tae_dim
        n = len(OWN_FEATURES)
        self.emb = HashedEmbeddings(cfg.buckets, cfg.emb_dim)
        width = n * cfg.emb_dim + (len(DENSE_NAMES) if cfg.counters else 0)
        if cfg.counters:
            self.wide = nn.Linear(len(DENSE_NAMES), 1)
            nn.init.zeros_(self.wide.weight)
            nn.init.zeros_(self.wide.bias)
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        # FM inputs are projected to fm_proj dims, so that a few hundred wide FM features do not swamp the
        # n * emb_dim own features in the first layer. They enter as the FM made them: LayerNorm-ing them
        # (per example) cost most of their value. Measured (7 days x 50k events, mean progressive NE gain
        # over base, feed / live): fe -0.008 / -0.011 with LayerNorm, -0.013 / -0.024 without; loopfm
        # -0.005 / +0.016 with, -0.005 / -0.002 without. (The FM's hidden layer is post-ReLU, O(1); the
        # LoopFM codes are tanh, in [-1, 1]; the target-aware embedding is standardised per partition,
        # experts.data.standardize.)
        fm_width = 0
        if cfg.uses_loop:
            self.loop = LoopPooling(cfg.emb_dim, repr_dim, cfg.att_hidden)
            self.loop_proj = _zero(nn.Linear(3 * repr_dim + 2, cfg.fm_proj))
            fm_width += cfg.fm_proj
        if cfg.uses_tae:
            self.tae_proj = _zero(nn.Linear(tae_dim, cfg.fm_proj))
            fm_width += cfg.fm_proj
        if fm_width:
            self.fm_in = nn.Linear(fm_width, cfg.hidden[0], bias=False)
        self.fm_gate = 1.0  # scales the FM inputs (and their gradient): set per window by the stage (experts.train.fm_gate)
        if cfg.uses_kd:
            self.aux_head = nn.Linear(width, 1)
            self.adapter = StudentAdapter(cfg.adapter_hidden)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        e = self.emb(batch["cats"])  # (B, F, D)
        own = torch.cat([e.flatten(1)] + ([batch["counters"]] if self.cfg.counters else []), dim=-1)  # (B, F*D+C)
        fm: list[torch.Tensor] = []
        if self.cfg.uses_loop:
            item = e[:, OWN_FEATURES.index("item_id")]
            fm.append(self.loop_proj(self.loop(item, batch["loop_repr"], batch["loop_mask"], batch["loop_click"])))
        if self.cfg.uses_tae:
            fm.append(self.tae_proj(batch["tae"].detach()))
        x = self.trunk[0](own)  # (B, H1)
        if fm and self.fm_gate:
            x = x + self.fm_gate * self.fm_in(torch.cat(fm, dim=-1))
        h = self.trunk[1:](x)  # (B, H)
        logit = self.head(h) + (self.wide(batch["counters"]) if self.cfg.counters else 0.0)  # (B, 1)
        out = {"logit": logit.squeeze(-1)}
        if self.cfg.uses_kd:
            out["aux_logit"] = self.aux_head(scale_grad(h, self.cfg.kd_beta)).squeeze(-1)
            out["adapter_logit"] = self.adapter(batch["fm_logit"])
        return out


def _zero(layer: nn.Linear) -> nn.Linear:
    """`layer` with zero weights and bias: its input starts switched off (its gradient is not zero)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_example(model: Expert) -> int:
    """Multiply-adds x2 of the dense layers for one example (embedding lookups are free)."""
    total = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    if model.cfg.uses_loop:  # the attention MLP and query run once per history slot, not once
        att = model.loop.attention
        per_slot = sum(2 * m.in_features * m.out_features for m in att.score if isinstance(m, nn.Linear))
        total += per_slot * (model.cfg.history_length - 1)
    return total
