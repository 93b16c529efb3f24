"""The expert's configuration: one frozen dataclass, resolved into MLflow params and every checkpoint;
and `ExpertKey`, the typed reference to the one expert (day, surface, variant, FM preset) a stage works on.

Variants (`VARIANTS`) switch FM-fed parts on and off; everything else is shared so that variants
differ only in the FM knowledge they consume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

VARIANTS = ("base", "loopfm", "kd", "fe", "loopfm_kd")

# Hashed categorical inputs the expert embeds (its "own features"), in a fixed order.
OWN_FEATURES = ("user_id", "item_id", "segment", "region", "category", "brand", "position", "device")


@dataclass(frozen=True)
class ExpertKey:
    """One expert's day: window `ds`, `surface`, `variant` and the FM `preset` whose outputs it reads."""

    ds: str
    surface: str
    variant: str
    preset: str = "small"

    @property
    def name(self) -> str:
        """``<preset>/<surface>/<variant>`` (MLflow run names, log lines)."""
        return f"{self.preset}/{self.surface}/{self.variant}"


@dataclass(frozen=True)
class ExpertConfig:
    """Sizes, loss weights and optimisation settings of one surface expert.

    kd_alpha: label scaling of the FM prediction the auxiliary head fits (target = clip(alpha * p_fm)).
    kd_weight: loss weight w of the auxiliary (distillation) loss.
    kd_beta: gradient scale from the auxiliary loss into the shared layers (0 = aux head only).
    adapter_weight: loss weight of the second distillation target (the student adapter's output).
    kd_tau: both distillation losses are weighted by min(1, max(0, teacher advantage / kd_tau)), the
      advantage = student NE - FM NE on the window before training on it (experts.distill.kd_scale).
    """

    variant: str = "base"
    id_buckets: int = 2**14  # hashed rows for user_id and item_id (unseen ids need no vocabulary)
    side_buckets: int = 512  # hashed rows for each small categorical (segment, ..., device)
    emb_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    history_length: int = 20
    counters: bool = True  # point-in-time counters (features.counters) as own inputs, every variant
    fm_proj: int = 16  # width the FM inputs of loopfm / fe are projected to
    att_hidden: int = 4  # DIN scorer width: it runs once per history slot
    kd_alpha: float = 1.0
    kd_weight: float = 3.0  # measured (150k events/day, kd NE gain over base): w=1 feed -0.004 live -0.008; w=3 -0.007 / -0.015
    kd_beta: float = 1.0  # the full distillation gradient reaches the shared tower (measured: 0.5 barely moves NE)
    adapter_hidden: int = 8
    adapter_weight: float = 0.25
    kd_tau: float = 0.005  # teacher NE advantage over the student at which distillation gets full weight (distill.kd_scale)
    lr: float = 3e-3
    emb_lr_scale: float = 1.0  # learning rate of the hashed embeddings = lr * emb_lr_scale
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay of the dense layers
    batch_size: int = 256
    min_steps: int = 64  # a sparse surface's window still gets this many updates (smaller batches, one pass)
    epochs: int = 1
    # training order: rows of at most this many per shuffle buffer (experts.stream.shuffled_batches); a partition
    # this small is read whole and shuffled as one permutation. Memory ~3 KB a row (L=20 history of R=32 codes):
    # 65,536 rows ~ 0.2 GB, about the whole feed partition at 0.1M events a day (issue 12: peak RSS flat in N)
    shuffle_rows: int = 65_536
    fm_gate_windows: int = 2  # confident FM-over-base windows before loopfm / fe read the FM (experts.train.fm_gate)
    fm_gate_step: float = 0.5  # the most the FM inputs' scale rises per window
    calib_gain: float = 0.5  # gain of the next-day calibration controller (experts.train.next_offset)
    ema_decay: float = 0.99  # the expert serves an EMA of its weights (common.ema; 0: the last iterate)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown expert variant {self.variant!r}; known: {VARIANTS}")

    @property
    def buckets(self) -> tuple[int, ...]:
        """Hash rows per OWN_FEATURES entry."""
        return tuple(self.id_buckets if f in ("user_id", "item_id") else self.side_buckets for f in OWN_FEATURES)

    @property
    def uses_loop(self) -> bool:
        return self.variant in ("loopfm", "loopfm_kd")

    @property
    def uses_kd(self) -> bool:
        return self.variant in ("kd", "loopfm_kd")

    @property
    def uses_tae(self) -> bool:
        return self.variant == "fe"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExpertConfig:
        known = {f.name for f in fields(cls)}
        clean = {k: v for k, v in values.items() if k in known}
        if "hidden" in clean:
            clean["hidden"] = tuple(clean["hidden"])
        return cls(**clean)

    def with_overrides(self, **overrides: Any) -> ExpertConfig:
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown ExpertConfig fields {sorted(unknown)}")
        return replace(self, **overrides)
