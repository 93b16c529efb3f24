"""Export the FM's knowledge about window D as data: ExFM scores, LoopFM representations, FE embeddings.

`export_fm(cfg, window, lake) -> ExportResult` runs FM_{D-1} (the FM trained through window.prev(),
``final.pt`` — it never saw D) once over every event of D and writes
- ``fm_outputs(fm=<preset>, ds=D, surface=s)`` (schemas.FM_OUTPUTS), one row per event: fm_version,
  fm_logit_click / fm_logit_like (the event's surface head), fm_repr = int8 of the LoopFM autoencoder's
  tanh code (width cfg.repr_width) with fm_repr_scale = per-row max|code| / 127 (dequantise:
  fm_repr * fm_repr_scale), fm_tae = the target-aware embedding (float32, width cfg.mlp[-1]: fm.model.FMOutput.tae);
- ``user_embeddings(fm, ds=D)`` / ``item_embeddings(fm, ds=D)``: FM_{D-1}'s user and item embeddings
  (id + side features) of every user / item in the newest snapshot with ds <= D-1, i.e. the ids known
  at the end of D-1, as FM_{D-1} (the version that scored D) sees them;
- progressive metrics per surface on D (AUC, log loss, NE, calibration of sigmoid(fm_logit_click), and
  like_* the same for the like head, whose label is like, 0 on unclicked events). NE's
  base rate is the CTR of the FM's own training window D-1 for that surface (stored as train_ctr in
  final.pt); `base_rate_source` says so. Compression quality is measured on D too: the autoencoder's
  relative MSE (squared error / total variance of the hidden representation) and the int8 quantisation
  error relative to the code's energy.

Leakage guard: the checkpoint's trained_through must end before D (features.windows.assert_after).
First window of a lake (no FM yet): nothing is written; the result has fm_version None and `skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch

from common.ema import serving_weights
from common.metrics import MetricSums, all_metrics
from common.threads import torch_threads
from features.history import asof_snapshot
from features.lake import Lake
from features.schemas import FM_OUTPUTS, ITEM_EMBEDDINGS, ITEM_ID, ITEMS, USER_EMBEDDINGS, USER_ID, USERS
from features.windows import Window, assert_after
from fm import checkpoint, stream
from fm.compress import quantize_int8
from fm.config import FMConfig
from fm.data import WindowData, load_window
from fm.model import FMBundle
from fm.train import check_surfaces, is_first_window

log = logging.getLogger(__name__)

BASE_RATE_SOURCE = "ctr of the FM's training window (ds-1) per surface"


@dataclass
class ExportResult:
    fm_version: str | None
    ds: str
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    base_rates: dict[str, float] = field(default_factory=dict)
    compression: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    trained_through: str | None = None


def load_scorer(lake: Lake, cfg: FMConfig, window: Window, trained_through: Window) -> tuple[FMBundle, dict]:
    """FMBundle of the FM trained through `trained_through`, after the leakage guard; raises if absent."""
    state = checkpoint.load(lake, cfg.preset, trained_through.ds, "final")
    if state is None:
        raise FileNotFoundError(f"no FM {cfg.preset!r} trained through {trained_through} in lake {lake.uri}; "
                                f"run `fmx fm train --ds {trained_through.ds}` first")
    through = Window.parse(state["trained_through"], state["window_days"])
    assert_after(through, window, f"FM {state['fm_version']}")
    saved = FMConfig.from_dict(state["cfg"])
    check_surfaces(saved.surfaces, cfg.surfaces, f"FM {state['fm_version']}")
    bundle = FMBundle(saved)
    bundle.load_state_dict(serving_weights(state))
    return bundle.eval(), state


@torch.no_grad()
def score(bundle: FMBundle, data: WindowData, batch: int) -> dict[str, np.ndarray]:
    """logits (N, T), code (N, W), tae (N, D), and compression error sums, in data order."""
    parts: dict[str, list[np.ndarray]] = {"logits": [], "code": [], "tae": []}
    sse, hidden_sq, n = 0.0, 0.0, 0
    hidden_sum = torch.zeros(bundle.fm.cfg.mlp[-1], dtype=torch.float64)
    for lo in range(0, len(data), batch):
        b = data.batch(torch.arange(lo, min(lo + batch, len(data))))
        out, code, recon = bundle(b)
        parts["logits"].append(out.logits.numpy())
        parts["code"].append(code.numpy())
        parts["tae"].append(out.tae.numpy())
        sse += float(((recon - out.hidden) ** 2).sum())
        hidden_sum = hidden_sum + out.hidden.double().sum(0)
        hidden_sq += float((out.hidden.double() ** 2).sum())
        n += len(out.hidden)
    total_var = hidden_sq - float((hidden_sum**2).sum()) / max(n, 1)  # sum of squared deviations
    res = {k: np.concatenate(v) for k, v in parts.items()}
    res["ae_rel_mse"] = np.array(sse / max(total_var, 1e-12))
    res["sums"] = np.array([sse, hidden_sq, n])  # to combine chunks (`_Compression`)
    res["hidden_sum"] = hidden_sum.numpy()
    return res


class _Compression:
    """Compression errors summed over the chunks of a streamed window (the same ratios as `_export`'s)."""

    def __init__(self) -> None:
        self.sums, self.hidden_sum = np.zeros(3), np.zeros(0)
        self.quant_sq, self.code_sq, self.max_abs = 0.0, 0.0, 0.0

    def add(self, scores: dict[str, np.ndarray]) -> None:
        self.sums += scores["sums"]
        self.hidden_sum = scores["hidden_sum"] + (self.hidden_sum if len(self.hidden_sum) else 0)
        q, scale = quantize_int8(scores["code"])
        deq = q.astype(np.float32) * scale[:, None]
        self.quant_sq += float(((deq - scores["code"]) ** 2).sum())
        self.code_sq += float((scores["code"] ** 2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(deq - scores["code"]).max()) if len(deq) else 0.0)

    def result(self) -> dict[str, float]:
        sse, hidden_sq, n = self.sums
        total_var = hidden_sq - float((self.hidden_sum**2).sum()) / max(n, 1)
        return {"ae_rel_mse": float(sse / max(total_var, 1e-12)), "int8_rel_mse": self.quant_sq / max(self.code_sq, 1e-12),
                "int8_max_abs_err": self.max_abs}


def _fixed(vectors: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors).ravel(), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def outputs_table(data: WindowData, scores: dict[str, np.ndarray], version: str) -> pa.Table:
    """All of fm_outputs for the window (every surface), in event_id order."""
    q, scale = quantize_int8(scores["code"])
    t = data.tensors
    cols = {
        "event_id": pa.array(data.event_id), "ts": data.ts, "user_id": pa.array(t["user_id"].numpy()),
        "item_id": pa.array(t["item_id"].numpy()), "surface": pa.array(data.surface_names.astype(str)),
        "fm_version": pa.array([version] * len(data), pa.string()),
        "fm_logit_click": pa.array(scores["logits"][:, 0].astype(np.float32)),
        "fm_logit_like": pa.array(scores["logits"][:, 1].astype(np.float32)),
        "fm_repr": _fixed(q, pa.int8()), "fm_repr_scale": pa.array(scale),
        "fm_tae": _fixed(scores["tae"].astype(np.float32), pa.float32()),
    }
    return pa.table(cols)


def progressive_metrics(table: pa.Table, data: WindowData, train_ctr: dict[str, float],
                        train_like_rate: dict[str, float] | None = None) -> tuple[dict, dict]:
    """Per surface {auc, logloss, ne, calibration} of the click head and the base rate used (training
    window's CTR); with `train_like_rate` (checkpoints record it) also like_auc, like_logloss, like_ne,
    like_calibration of the like head (label: like, 0 on unclicked events; base rate: the training window's).

    A surface the FM never trained on uses the mean of the trained surfaces' rates; a degenerate base
    rate (0 or 1) gives ne = nan.
    """
    metrics, rates = _head_metrics(table, data, "click", train_ctr)
    if train_like_rate is not None:
        like, _ = _head_metrics(table, data, "like", train_like_rate)
        for s, m in like.items():
            metrics[s] |= {f"like_{k}": v for k, v in m.items()}
    return metrics, rates


def _head_metrics(table: pa.Table, data: WindowData, task: str, train_rate: dict[str, float]) -> tuple[dict, dict]:
    """progressive_metrics of one task's head: per surface metrics and base rate."""
    logit, y = table[f"fm_logit_{task}"].to_numpy(), data.tensors[task].numpy()
    per_surface = {}
    for s in sorted(set(data.surface_names.tolist())):
        rows = data.surface_names == s
        per_surface[s] = (y[rows], logit[rows])
    return surface_metrics(per_surface, train_rate)


def surface_metrics(per_surface: dict[str, tuple[np.ndarray, np.ndarray]], train_rate: dict[str, float]
                    ) -> tuple[dict, dict]:
    """Metrics and base rate per surface from its (labels, logits) (see `progressive_metrics`)."""
    rates, metrics = _base_rates(per_surface, train_rate), {}
    for s, (y, logit) in sorted(per_surface.items()):
        p = 1 / (1 + np.exp(-logit.astype(np.float64)))
        if 0 < rates[s] < 1:
            metrics[s] = all_metrics(y, p, rates[s])
        else:  # no positive (or only positives) in the training window: NE is undefined, the rest is not
            metrics[s] = all_metrics(y, p, 0.5) | {"ne": float("nan")}
    return metrics, rates


def summed_metrics(per_surface: dict[str, MetricSums], train_rate: dict[str, float]) -> tuple[dict, dict]:
    """`surface_metrics` of a streamed window, from each surface's MetricSums (its rows in fixed memory)."""
    rates = _base_rates(per_surface, train_rate)
    return {s: sums.result(rates[s]) for s, sums in sorted(per_surface.items())}, rates


def _base_rates(surfaces: Iterable[str], train_rate: dict[str, float]) -> dict[str, float]:
    """Each surface's base rate: its training rate, or the trained surfaces' mean for one the FM never trained on."""
    overall = float(np.mean(list(train_rate.values())))
    return {s: train_rate.get(s, overall) for s in surfaces}


def embedding_tables(bundle: FMBundle, lake: Lake, window: Window, data: WindowData | dict[str, np.ndarray],
                     version: str) -> dict:
    """User and item embedding snapshots (ids of the newest users/items snapshot <= D-1, else of D's events;
    `data` is the window, or {user_id, item_id: the window's distinct ids} for a streamed one)."""
    out = {}
    for table, source, key, cols, embed in (
        (USER_EMBEDDINGS.name, USERS.name, USER_ID, ("segment", "region"), bundle.fm.user_embedding),
        (ITEM_EMBEDDINGS.name, ITEMS.name, ITEM_ID, ("category", "brand"), bundle.fm.item_embedding),
    ):
        snap = asof_snapshot(lake, source, window)
        if snap is None:
            ids = np.unique(data[key] if isinstance(data, dict) else data.tensors[key].numpy())
            frame = pl.DataFrame({key: ids, **{c: np.full(len(ids), -1) for c in cols}})
        else:
            frame = snap.select(key, *cols).sort(key).collect()
        b = {c: torch.from_numpy(frame[c].cast(pl.Int64).to_numpy().copy()) for c in (key, *cols)}
        with torch.no_grad():
            vec = embed(b).numpy().astype(np.float32)  # (n_ids, D)
        out[table] = pa.table({key: pa.array(b[key].numpy()), "fm_version": pa.array([version] * len(vec)),
                               "vector": _fixed(vec, pa.float32())})
    return out


def export_fm(cfg: FMConfig, window: Window, lake: Lake, *, trained_through: Window | None = None) -> ExportResult:
    """See module docstring. `trained_through` (default window.prev()) picks another FM; it must end before D.

    cfg.surfaces must equal the checkpoint's (fm.config.lake_config gives the lake's); cfg.threads torch threads.
    """
    with torch_threads(cfg.threads):
        return _export(cfg, window, lake, trained_through)


def _export(cfg: FMConfig, window: Window, lake: Lake, trained_through: Window | None) -> ExportResult:
    through = trained_through or window.prev()
    if checkpoint.load(lake, cfg.preset, through.ds, "final") is None and trained_through is None \
            and is_first_window(lake, window):
        return ExportResult(None, window.ds, skipped=f"first window {window.ds}: no FM trained before it yet")
    bundle, state = load_scorer(lake, cfg, window, through)
    version = state["fm_version"]
    if cfg.stream:
        return _export_stream(cfg, window, lake, bundle, state)
    data = load_window(lake, window, FMConfig.from_dict(state["cfg"]))
    scores = score(bundle, data, cfg.export_batch)
    table = outputs_table(data, scores, version)
    rows = {}
    for s in sorted(set(data.surface_names.tolist())):
        part = table.filter(pc.equal(table["surface"], s))
        lake.write(FM_OUTPUTS.name, part, fm=cfg.preset, ds=window.ds, surface=s)
        rows[s] = part.num_rows
    for name, emb in embedding_tables(bundle, lake, window, data, version).items():
        lake.write(name, emb, fm=cfg.preset, ds=window.ds)
    metrics, rates = progressive_metrics(table, data, state["train_ctr"], state.get("train_like_rate"))
    q, scale = quantize_int8(scores["code"])
    deq = q.astype(np.float32) * scale[:, None]
    quant = float(((deq - scores["code"]) ** 2).sum() / max(float((scores["code"] ** 2).sum()), 1e-12))
    compression = {"ae_rel_mse": float(scores["ae_rel_mse"]), "int8_rel_mse": quant,
                   "int8_max_abs_err": float(np.abs(deq - scores["code"]).max()) if len(deq) else 0.0}
    return ExportResult(version, window.ds, rows, metrics, rates, compression, None, state["trained_through"])


def _export_stream(cfg: FMConfig, window: Window, lake: Lake, bundle: FMBundle, state: dict) -> ExportResult:
    """`_export` over the window read chunk by chunk (fm.stream): each chunk is scored and appended to its
    surfaces' fm_outputs partitions (chunked writers; every partition replaced atomically at the end).
    Kept for the metrics: per surface and head a common.metrics.MetricSums (fixed size), and the window's
    distinct ids."""
    version = state["fm_version"]
    feats = replace(FMConfig.from_dict(state["cfg"]), stream_chunk=cfg.stream_chunk)
    heads: dict[tuple[str, str], MetricSums] = {}  # (surface, task) -> sums over the window's rows
    ids: dict[str, np.ndarray] = {USER_ID: np.zeros(0, np.int64), ITEM_ID: np.zeros(0, np.int64)}
    compression = _Compression()
    with ExitStack() as stack:
        writers: dict[str, Any] = {}
        for data in stream.iter_window_data(lake, window, feats):
            scores = score(bundle, data, cfg.export_batch)
            compression.add(scores)
            table = outputs_table(data, scores, version)
            for s in sorted(set(data.surface_names.tolist())):
                if s not in writers:
                    writers[s] = stack.enter_context(
                        lake.chunked_writer(FM_OUTPUTS.name, fm=cfg.preset, ds=window.ds, surface=s))
                rows = data.surface_names == s
                writers[s].write(table.filter(pa.array(rows)))
                for col, task in enumerate(("click", "like")):
                    sums = heads.setdefault((s, task), MetricSums())
                    sums.add(data.tensors[task].numpy()[rows], scores["logits"][rows, col])
            for key in ids:
                ids[key] = np.unique(np.concatenate([ids[key], data.tensors[key].numpy()]))
    rows_out = {s: int(w.rows) for s, w in writers.items()}
    for name, emb in embedding_tables(bundle, lake, window, ids, version).items():
        lake.write(name, emb, fm=cfg.preset, ds=window.ds)
    metrics, rates = summed_metrics({s: m for (s, t), m in heads.items() if t == "click"}, state["train_ctr"])
    if state.get("train_like_rate") is not None:
        like, _ = summed_metrics({s: m for (s, t), m in heads.items() if t == "like"}, state["train_like_rate"])
        for s, m in like.items():
            metrics[s] |= {f"like_{k}": v for k, v in m.items()}
    return ExportResult(version, window.ds, rows_out, metrics, rates, compression.result(), None,
                        state["trained_through"])
