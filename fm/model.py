"""The multi-surface foundation model (FM), nanoGPT style: one config (fm.config.FMConfig), small modules,
one top model.

Design choices (and why):

- **Hashed ID embeddings.** Users, items and every side feature (segment, region, category, brand,
  position, device) index fixed-size tables through a 64-bit mix of the raw id modulo the table size
  (`hash_ids`). New ids appear every day in a streaming log; hashing needs no vocabulary state to
  grow, checkpoint, ship to the exporter or keep consistent across DDP ranks, and the model takes raw
  lake ids. The trade-off is collisions: with n distinct ids in m rows a given id shares its row with
  about n/m others, so rare ids share (noisy) embeddings. Presets size m (2^15 .. 2^17 rows) above the
  synthetic data's active id counts, where collisions cost little. Surfaces are few and named, so they use a plain index (cfg.surfaces).
- **History encoder = DIN target attention, plus self-attention blocks in larger presets.** Each
  history token is item + category + brand + surface + click + recency embeddings. DIN-style attention
  with the candidate item as query pools the last L cross-surface interactions into a candidate-aware
  interest vector at O(L) cost, which keeps "small" CPU-cheap. `n_blocks` > 0 adds pre-LN
  self-attention blocks over the history (every token is strictly before the event, so no causal mask
  is needed), letting larger presets model cross-item context at O(L^2) cost. A learned "null" token
  is always present so users with no history attend to something (no NaN from a fully masked
  softmax). A log2-bucketed time-gap embedding per token was tried and dropped (mean progressive NE
  0.9586 with it, 0.9577 without; small FM, 2 seeds, bench/fm_ne_table.py).
- **Every feature its own field, DLRM-style pairwise dot products, three hashed crosses.** The MLP
  reads the field embeddings (user id, segment, region, item id, category, brand, position, device,
  surface, the DIN interest, the history mean, the two category-match fields below, and the hashed
  crosses segment x category, region x category, surface x category) plus the dot product of every
  pair of fields. Measured (7 days, 50k events/day, small FM; the FM's logit plus one true term of the
  generator's logit in a logistic regression on day 7, bench/fm_missing_terms.py):
  when side features were summed into the user and item embeddings, adding the true segment x category
  affinity improved the FM by 0.012 NE and region x category by 0.005, population-level crosses it had
  not learned. Separate fields with pairwise dots cut mean progressive NE by 0.008-0.010 (2 seeds);
  the explicit crosses by another 0.004 (0.006 over the last 3 days).
- **Category match (SIM-style hard search).** How recent and how many of the history's items share the
  candidate's category, as two small embeddings. The user's current intent is a category that persists
  along their day; adding "the previous impression had the candidate's category" to the FM's logit
  improved it by 0.008 NE before this field, 0.002 after.
- **Counters (issue 16).** The event's point-in-time counters (features.counters: item / user / per-surface
  impressions and Beta-smoothed click rates over every earlier window and over this window's earlier
  events; (B, C) dense inputs) enter twice: as one more field (a small MLP to D dims, so they take part
  in the pairwise dots) and raw beside the fields into the interaction MLP. Ids, side features and a
  32-interaction history remember no long-run click rate. Measured (FM small, bench/fm_vs_ref.py, mean
  NE / AUC; MovieLens-100K windows 3..12, built-in stream 4 days x 50k events days 2-4, seeds 0 / 1):
  MovieLens 0.928 / 0.691 -> 0.879 / 0.731 (seed 1: 0.922 -> 0.878), the counting reference 0.941 / 0.673;
  built-in 0.955 / 0.653 -> 0.949 / 0.674 (seed 1: 0.951 / 0.671 -> 0.948 / 0.678). A wide linear term
  per (surface, task) head on the counters was dropped: same MovieLens figures, built-in 0.953 / 0.669
  with live's calibration 1.19 (1.06 without). cfg.counters=False builds the FM without them.
- **Heads per (surface, task)**: one linear layer emits S*T logits; each example keeps its own surface's.

Forward returns `FMOutput`: logits (B, T) for cfg.tasks of the example's surface; hidden (B, H) the
interaction-level representation (H = cfg.mlp[-1]); interest (B, D) the history pooled by the candidate;
user (B, D) and item (B, D) embeddings (id + side features, candidate independent).

- **Target-aware embedding = `hidden`** (`FMOutput.tae`): the FM's top representation of the (user,
  candidate) pair, the input of its linear task heads. LoopFM stores the same activation, compressed,
  for *past* interactions; Foundation-Expert feeds the current event's, at full precision. Measured
  (7 days, 50k events/day, small FM, the fe expert's mean progressive NE change against base, feed /
  live): exporting the DIN interest vector gave -0.004 / +0.004; `hidden` gives -0.013 / -0.024 (with
  the expert's input change of experts.model), and the sparse live surface gains the most, as
  Foundation-Expert argues it should.
Batch keys are documented in fm.data.BATCH_KEYS.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from features.counters import DENSE_NAMES
from fm.config import FMConfig

ARCH = 4  # parameter layout version, stored in every checkpoint (fm.checkpoint refuses another one)
_MATCH_COUNTS = 8  # category-match counts above this share one row
_CROSSED = ("segment", "region", "surface")  # each crossed with the candidate's category as one more field
_CROSS_BASE = 1_000_003  # cross id = id * _CROSS_BASE + category (then hashed): distinct for categories < 1M
_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (splitmix64 constants)
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M3 = -7723592293110705685  # 0x94D049BB133111EB


def hash_ids(ids: Tensor, salt: int, buckets: int) -> Tensor:
    """splitmix64 finaliser of (id + salt) modulo `buckets`; int64 arithmetic wraps, as intended."""
    x = ids + salt * 0x632BE59BD9B4E019 % (2**62)
    x = (x ^ (x >> 30)) * _M2
    x = (x ^ (x >> 27)) * _M3
    x = x ^ (x >> 31)
    return torch.remainder(x * _M1, buckets)


class HashEmbedding(nn.Module):
    """An embedding table indexed by hashed raw ids (any int64, new ids welcome)."""

    def __init__(self, buckets: int, dim: int, salt: int) -> None:
        super().__init__()
        self.buckets, self.salt = buckets, salt
        self.table = nn.Embedding(buckets, dim)  # FoundationModel sets its init (cfg.emb_std)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(hash_ids(ids, self.salt, self.buckets))  # (*ids.shape, D)


class Block(nn.Module):
    """Pre-LN self-attention + MLP block over the history tokens, with a key padding mask."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, T, D/H)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TargetAttention(nn.Module):
    """DIN: score each history token against the candidate with a small MLP on [q, k, q-k, q*k]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # No bias on the last layer: softmax ignores a constant shift, so its gradient is pure float noise
        # that Adam would amplify into real updates.
        self.score = nn.Sequential(nn.Linear(4 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 1, bias=False))

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        q = query[:, None, :].expand_as(keys)  # (B, T, D)
        s = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)  # (B, T)
        w = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)  # (B, T); null token keeps a row finite
        return torch.einsum("bt,btd->bd", w, keys)  # (B, D)


class HistoryEncoder(nn.Module):
    """Cross-surface history (B, L) -> candidate-aware interest (B, D) and mean history (B, D)."""

    def __init__(self, cfg: FMConfig, items: HashEmbedding, category: HashEmbedding, brand: HashEmbedding) -> None:
        super().__init__()
        d = cfg.dim
        # shared with the candidate tower: history and candidates live in one space
        self.items, self.category, self.brand = items, category, brand
        self.surface = nn.Embedding(len(cfg.surfaces) + 1, d)  # last row: unknown surface
        self.click = nn.Embedding(2, d)
        self.recency = nn.Embedding(cfg.hist_len, d)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads) for _ in range(cfg.n_blocks))
        self.attn = TargetAttention(d)

    def forward(self, b: dict[str, Tensor], candidate: Tensor) -> tuple[Tensor, Tensor]:
        mask = b["hist_mask"]  # (B, L), True = real interaction; right-aligned, newest last
        B, L = mask.shape
        pos = torch.arange(L, device=mask.device).expand(B, L)
        tok = self.items(b["hist_item"]) + self.category(b["hist_category"]) + self.brand(b["hist_brand"])
        tok = tok + self.surface(b["hist_surface"]) + self.click(b["hist_click"])
        tok = (tok + self.recency(pos)) * mask[..., None]  # (B, L, D)
        x = torch.cat([self.null.expand(B, 1, -1), tok], dim=1)  # (B, L+1, D)
        m = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1)  # (B, L+1)
        for block in self.blocks:
            x = block(x, m)
        mean = tok.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return self.attn(candidate, x, m), mean


class FMOutput(NamedTuple):
    logits: Tensor  # (B, T) per task, of the example's surface
    hidden: Tensor  # (B, H) interaction representation (LoopFM source, compressed)
    interest: Tensor  # (B, D) the history pooled by target attention
    user: Tensor  # (B, D)
    item: Tensor  # (B, D)

    @property
    def tae(self) -> Tensor:
        """(B, H) target-aware (user, candidate) embedding (Foundation-Expert source): `hidden`."""
        return self.hidden


class FoundationModel(nn.Module):
    FIELDS = ("user", "segment", "region", "item", "category", "brand", "position", "device", "surface",
              "interest", "hist_mean", "match_recency", "match_count", "segment_x_category", "region_x_category",
              "surface_x_category")
    pairs: Tensor  # (2, F(F-1)/2) buffer: the field index pairs whose dot products the MLP reads

    def __init__(self, cfg: FMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.users = HashEmbedding(cfg.user_buckets, d, salt=1)
        self.items = HashEmbedding(cfg.item_buckets, d, salt=2)
        names = ("segment", "region", "category", "brand", "position", "device")
        self.side = nn.ModuleDict({n: HashEmbedding(cfg.side_buckets, d, salt=10 + i) for i, n in enumerate(names)})
        self.surface = nn.Embedding(len(cfg.surfaces) + 1, d)
        category, brand = self.side["category"], self.side["brand"]
        assert isinstance(category, HashEmbedding) and isinstance(brand, HashEmbedding)
        self.history = HistoryEncoder(cfg, self.items, category, brand)
        # SIM-style hard search by category: how recent (L = none) and how many of the history's items
        # share the candidate's category
        self.match_recency = nn.Embedding(cfg.hist_len + 1, d)
        self.match_count = nn.Embedding(_MATCH_COUNTS + 1, d)
        # crossed ids (segment, region, surface) x candidate category: hashed, one table each
        self.crosses = nn.ModuleList(HashEmbedding(4 * cfg.side_buckets, d, salt=20 + i) for i in range(len(_CROSSED)))
        self.fields = self.FIELDS + (("counters",) if cfg.counters else ())
        n, c = len(self.fields), len(DENSE_NAMES) if cfg.counters else 0
        if cfg.counters:
            self.counter_field = nn.Sequential(nn.Linear(c, d), nn.ReLU(), nn.Linear(d, d))  # (B, C) -> (B, D)
        self.register_buffer("pairs", torch.triu_indices(n, n, offset=1), persistent=False)
        layers: list[nn.Module] = []
        width = n * d + n * (n - 1) // 2 + c
        for h in cfg.mlp:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Linear(width, len(cfg.surfaces) * len(cfg.tasks))
        for m in self.modules():  # every table, hashed or not, starts at the same small scale
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.emb_std)

    def user_parts(self, b: dict[str, Tensor]) -> list[Tensor]:
        """The user's fields: id, segment, region embeddings, (B, D) each."""
        return [self.users(b["user_id"]), self.side["segment"](b["segment"]), self.side["region"](b["region"])]

    def item_parts(self, b: dict[str, Tensor]) -> list[Tensor]:
        """The candidate item's fields: id, category, brand embeddings, (B, D) each."""
        return [self.items(b["item_id"]), self.side["category"](b["category"]), self.side["brand"](b["brand"])]

    def user_embedding(self, b: dict[str, Tensor]) -> Tensor:
        return _total(self.user_parts(b))

    def item_embedding(self, b: dict[str, Tensor]) -> Tensor:
        return _total(self.item_parts(b))

    def category_match(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B,) recency of the newest history item in the candidate's category (0 = the last one, L = none)
        and (B,) how many there are (capped at _MATCH_COUNTS); an unknown category (-1) matches nothing."""
        cat = b["category"][:, None]
        match = b["hist_mask"] & (b["hist_category"] == cat) & (cat >= 0)  # (B, L)
        L = match.shape[1]
        pos = torch.arange(L, device=match.device).expand_as(match)
        newest = torch.where(match, pos, -1).amax(dim=1)  # (B,), right-aligned: L-1 is the newest slot
        recency = torch.where(newest >= 0, L - 1 - newest, L)
        return recency, match.sum(dim=1).clamp(max=_MATCH_COUNTS)

    def forward(self, b: dict[str, Tensor]) -> FMOutput:
        user_parts, item_parts = self.user_parts(b), self.item_parts(b)  # each table looked up once
        user, item = _total(user_parts), _total(item_parts)  # (B, D) each
        interest, hist_mean = self.history(b, item)  # (B, D) each
        recency, count = self.category_match(b)
        side = self.side
        parts = [  # (B, D) each, in self.fields order: each feature its own field (DLRM)
            *user_parts, *item_parts,
            side["position"](b["position"]), side["device"](b["device"]), self.surface(b["surface"]),
            interest, hist_mean, self.match_recency(recency), self.match_count(count),
            *(table(b[key] * _CROSS_BASE + b["category"]) for table, key in zip(self.crosses, _CROSSED, strict=True)),
        ]
        dense = [b["counters"]] if self.cfg.counters else []  # (B, C)
        fields = torch.stack(parts + [self.counter_field(x) for x in dense], dim=1)  # (B, F, D)
        dots = torch.bmm(fields, fields.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]  # (B, F(F-1)/2)
        hidden = self.mlp(torch.cat([fields.flatten(1), dots, *dense], dim=1))  # (B, H)
        S, T = len(self.cfg.surfaces), len(self.cfg.tasks)
        all_logits = self.heads(hidden).view(-1, S, T)  # (B, S, T)
        surface = b["surface"].clamp(max=S - 1)  # unknown surfaces (index S) are rejected by fm.data
        logits = all_logits[torch.arange(len(surface), device=surface.device), surface]  # (B, T)
        return FMOutput(logits, hidden, interest, user, item)


def _total(parts: list[Tensor]) -> Tensor:
    """parts[0] + parts[1] + ... (left to right, as one would write it)."""
    return functools.reduce(operator.add, parts)


class ReprAutoencoder(nn.Module):
    """LoopFM compression: hidden (B, H) -> tanh code (B, W) -> reconstruction (B, H)."""

    def __init__(self, cfg: FMConfig) -> None:
        super().__init__()
        self.enc = nn.Linear(cfg.mlp[-1], cfg.repr_width)
        self.dec = nn.Linear(cfg.repr_width, cfg.mlp[-1])

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        code = torch.tanh(self.enc(hidden))  # (B, W) in (-1, 1): int8-friendly
        return code, self.dec(code)


class FMBundle(nn.Module):
    """FM + its compression autoencoder, trained together; the AE sees hidden.detach() (stop-gradient)."""

    def __init__(self, cfg: FMConfig) -> None:
        super().__init__()
        self.fm = FoundationModel(cfg)
        self.ae = ReprAutoencoder(cfg)

    def forward(self, b: dict[str, Tensor]) -> tuple[FMOutput, Tensor, Tensor]:
        out = self.fm(b)
        target = out.hidden.detach()  # the FM never learns from the autoencoder
        code, recon = self.ae(target)
        return out, code, recon


def fm_loss(logits: Tensor, b: dict[str, Tensor], norm: Tensor, like_weight: float) -> Tensor:
    """Summed BCE over this rank's rows divided by `norm` = (global click rows, global like rows) / world.

    Dividing a local *sum* by the global count (times world size, which DDP's gradient average undoes)
    makes every rank's share add up to exactly the global-batch mean, even when shards differ in size.
    Rows with an unknown like label (like_mask False) contribute nothing to the like loss.
    """
    click = F.binary_cross_entropy_with_logits(logits[:, 0], b["click"], reduction="sum") / norm[0]
    if logits.shape[1] < 2:
        return click
    like_bce = F.binary_cross_entropy_with_logits(logits[:, 1], b["like"], reduction="none")
    like = (like_bce * b["like_mask"]).sum() / norm[1].clamp(min=1e-9)
    return click + like_weight * like


def ae_loss(target: Tensor, recon: Tensor, norm: Tensor) -> Tensor:
    """Summed squared reconstruction error / (global rows / world) — per-row MSE summed over dims."""
    return ((recon - target) ** 2).sum() / norm[0]
