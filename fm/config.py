"""FMConfig: every setting of the foundation model, its training and its export, in one frozen dataclass.

Size presets (`FMConfig.preset(name, **overrides)`). Parameters of the FM (the LoopFM autoencoder adds
2-8 k) and forward FLOPs per example (torch.utils.flop_counter.FlopCounterMode, a multiply-add = 2
FLOPs; batch 256, history length 32), measured with `bench/bench_fm.py`:

| preset | dim | hash rows (user/item) | history blocks | mlp      | parameters | fwd FLOPs/example |
|--------|-----|-----------------------|----------------|----------|-----------:|------------------:|
| small  | 16  | 2^15 / 2^15           | 0 (DIN only)   | 64, 32   |  1,373,464 |           199,264 |
| base   | 32  | 2^16 / 2^16           | 1              | 128, 64  |  4,897,736 |         1,553,600 |
| large  | 64  | 2^17 / 2^17           | 2              | 256, 128 | 18,422,472 |         9,349,504 |

large has 13x the parameters of small and 47x its FLOPs; all fit easily in memory (large: ~74 MB of
fp32 weights, ~220 MB with AdamW state). Parameters are dominated by the hashed ID tables; FLOPs by
the history encoder (DIN scoring MLP over L tokens, self-attention blocks) and the interaction MLP.

Surfaces: the stages build the config with `lake_config(preset, lake.meta())`, so the heads are the lake's
surfaces (an imported lake names its own); the checkpoint stores them and a mismatch is refused.
Threads: train and export run with `threads` torch intra-op threads (default 1) and restore the caller's
setting. Measured on a shared 2-core machine: the torch default (one thread per core, beside polars' pool
and Airflow in the same process) made in-process days 6-20x slower; on a quiet machine 2 threads train
small 1.2x and base 1.7x faster than 1 (bench/bench_fm.py --threads), so raise it where cores are free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from common.names import FM_PRESETS

SURFACES = ("feed", "search", "video", "live")

_PRESETS: dict[str, dict[str, Any]] = {  # one entry per common.names.FM_PRESETS, in that order
    "small": dict(dim=16, user_buckets=2**15, item_buckets=2**15, n_blocks=0, n_heads=2, mlp=(64, 32)),
    "base": dict(dim=32, user_buckets=2**16, item_buckets=2**16, n_blocks=1, n_heads=2, mlp=(128, 64)),
    # large: lr 1e-3 for the dense layers (measured: 3e-3 overfits the first days; progressive NE
    # 0.956/0.936/0.926 vs 0.988/0.939/0.929), 3e-3 for the embedding tables as in small (7 days at 50k
    # events/day, before the DLRM fields: mean progressive NE 0.9669 vs 0.9693 with 1e-3 everywhere)
    "large": dict(dim=64, user_buckets=2**17, item_buckets=2**17, n_blocks=2, n_heads=4, mlp=(256, 128), lr=1e-3,
                  emb_lr=3e-3),
}


@dataclass(frozen=True)
class FMConfig:
    """Model size, training and export settings. Resolved copies travel with checkpoints and MLflow params."""

    preset: str = "small"
    # ---- model ----------------------------------------------------------------------------------
    dim: int = 16  # width of every ID / side-feature embedding and of the history tokens
    emb_std: float = 0.1  # init std of every embedding table (0.02 left products like user*item ~1e-4:
    # the interaction MLP and DIN saw no signal for most of the first day and the FM stayed near the base rate)
    user_buckets: int = 2**15  # hashed user-id table rows
    item_buckets: int = 2**15  # hashed item-id table rows (shared by candidate and history items)
    side_buckets: int = 1024  # hashed rows for each small categorical (segment, region, ...)
    n_blocks: int = 0  # self-attention blocks over the history before target attention
    n_heads: int = 2
    mlp: tuple[int, ...] = (64, 32)  # interaction MLP; its last width is the LoopFM source representation
    hist_len: int = 32  # L: most recent cross-surface interactions per event
    surfaces: tuple[str, ...] = SURFACES  # one head per (surface, label); stages take them from the lake's meta
    tasks: tuple[str, ...] = ("click", "like")
    repr_width: int = 32  # LoopFM autoencoder bottleneck (tanh) -> int8 fm_repr
    counters: bool = True  # point-in-time counter inputs (features.counters; fm.model docstring)
    # ---- training -------------------------------------------------------------------------------
    lr: float = 3e-3
    emb_lr: float | None = None  # learning rate of the embedding tables (None: lr)
    ae_lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 256  # global batch (split evenly across DDP ranks)
    seed: int = 0
    ckpt_every: int = 200  # steps between mid-window checkpoints
    log_every: int = 100  # steps between progress lines on stderr
    ema_decay: float = 0.995  # serving weights = EMA of the trained ones (common.ema.WeightEMA; 0: the last iterate)
    like_weight: float = 0.5  # loss weight of the like task
    threads: int = 1  # torch intra-op threads while training / exporting (restored afterwards): torch's
    # default (one per core) oversubscribes a shared machine where polars, Airflow and others also run
    # ---- streaming windows (fm.stream; issue 12) -------------------------------------------------
    stream: bool = True  # read the window as a stream of record batches (memory set by the sizes below)
    stream_chunk: int = 65_536  # events per feature chunk (point-in-time features are computed per chunk)
    shuffle_rows: int = 8_192  # rows per row group of the window's example cache (the unit of the shuffle)
    shuffle_buffer: int = 4  # row groups per shuffle buffer (rows are permuted within a buffer)
    stream_shards: int = 4  # virtual shards of the example cache; the DDP world size must divide it
    # ---- export ---------------------------------------------------------------------------------
    export_batch: int = 4096

    @classmethod
    def from_preset(cls, name: str = "small", **overrides: Any) -> FMConfig:
        """The preset's settings, then `overrides` (unknown keys raise with the valid names)."""
        if name not in FM_PRESETS:
            raise ValueError(f"unknown FM preset {name!r}; choose one of {list(FM_PRESETS)}")
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown FMConfig fields {bad}; valid: {sorted(valid)}")
        cfg = cls(preset=name, **_PRESETS[name])
        return replace(cfg, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FMConfig:
        tuples = {"mlp", "surfaces", "tasks"}
        known = {f.name for f in fields(cls)}  # checkpoints written before a field existed lack it: default
        values: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in data.items() if k in known}
        return cls(**values)

    def model_key(self) -> dict[str, Any]:
        """The settings that fix the parameter shapes: a warm start requires them equal."""
        keep = ("dim", "user_buckets", "item_buckets", "side_buckets", "n_blocks", "n_heads", "mlp", "counters")
        return {k: getattr(self, k) for k in keep} | {"surfaces": self.surfaces, "tasks": self.tasks,
                                                       "repr_width": self.repr_width}


def lake_config(preset: str, meta: dict[str, Any], **overrides: Any) -> FMConfig:
    """The preset with the lake's surfaces (`meta` = Lake.meta(); its "surfaces" list, if any) as heads.

    An imported lake names its own surfaces (MovieLens: genres); the FM must have exactly those heads.
    """
    surfaces = overrides.pop("surfaces", None) or meta.get("surfaces")
    extra = {"surfaces": tuple(surfaces)} if surfaces else {}
    return FMConfig.from_preset(preset, **extra, **overrides)
