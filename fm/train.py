"""Streaming FM training: one shuffled pass over one window, warm-started from the previous window's FM.

`train_fm(cfg, window, lake) -> fm_version` (contract):
- warm start: model and optimizer state of ``final.pt`` of window.prev() (fm.checkpoint). The first
  window of the lake (no earlier events partition) cold-starts; a later window whose predecessor FM is
  missing is an error unless ``cold_start=True``.
- data: every event of the window, all surfaces, point-in-time features, visited once.
  cfg.stream (default): the window is streamed (fm.stream): rank 0 writes its example cache chunk by
  chunk, and the pass follows fm.stream's bounded shuffle (row groups dealt to cfg.stream_shards virtual
  shards, permuted, then rows permuted within buffers of cfg.shuffle_buffer groups; seeded by (cfg.seed,
  window.ds)); step s takes each shard's next share of about B * n_shard / N rows. Memory is set by
  stream_chunk, shuffle_rows and shuffle_buffer, not by the window's size.
  cfg.stream=False: the whole window in memory (fm.data.load_window), step s covers
  permutation[s*B:(s+1)*B] of a permutation seeded by (cfg.seed, window.ds).
- global batch semantics: under DDP rank r takes the r-th of `world` contiguous slices of the global batch
  (streamed: the rows of its own shards, which it alone reads), its loss is a local sum over the global
  count (x world), and DDP's gradient average makes the update equal to the single-process one (up to
  float summation order).
- checkpoints (rank 0): ``progress.pt`` every cfg.ckpt_every steps (model, optimizers, step = the stream
  position: a step's rows are a pure function of it and the cache, which a resumed run reuses; RNG), and
  ``final.pt`` at the end; a killed run re-run with the same arguments resumes from progress.pt and ends
  with bit-identical weights (same seed, same device, same thread count).
- serving weights = an exponential moving average (EMA) of the trained weights (`cfg.ema_decay`, kept across
  windows and checkpointed with the rest): one shuffled pass with Adam leaves the *last* iterate's
  calibration off by +-15 % from one day to the next (measured in-sample, whatever the lr or batch size);
  the average of the last few hundred iterates is not. Training continues from the raw weights; export,
  embeddings and fm_version use ``serving_weights(state)``.
- fm_version = f"{preset}-{ds}-{serving weights hash}", stored in final.pt and models/fm/<preset>/versions.json.

Run it: ``python -m fm.train --ds 2026-01-02 --lake PATH [--preset small] [--set lr=0.001]``, or under
``torchrun --nproc_per_node=2 -m fm.train ...`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.ema import WeightEMA, serving_weights
from common.threads import torch_threads
from features.lake import Lake
from features.schemas import EVENTS
from features.windows import Window
from fm import checkpoint, stream, versions
from fm.config import FMConfig, lake_config
from fm.data import WindowData, load_window, surface_ctr
from fm.model import FMBundle, ae_loss, fm_loss

log = logging.getLogger("fm.train")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device


@dataclass(frozen=True)
class TrainResult:
    fm_version: str
    parent: str | None
    steps: int
    examples: int
    seconds: float
    mean_loss: float
    resumed_at: int  # step a progress checkpoint was resumed from (0: fresh start)


def dist_info() -> Dist:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if dist.get_backend() == "nccl":
            return Dist(rank, world, torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        return Dist(rank, world, torch.device("cpu"))
    return Dist(0, 1, torch.device("cpu"))


def check_surfaces(saved: tuple[str, ...], wanted: tuple[str, ...], what: str) -> None:
    """Refuse an FM whose heads are not exactly the lake's surfaces (names and order)."""
    if tuple(saved) != tuple(wanted):
        raise ValueError(f"{what} has surface heads {list(saved)} but the lake's surfaces are {list(wanted)}; "
                         "an FM cannot be warm-started or used on a lake with other surfaces — train a new "
                         "FM (another lake or preset) for these surfaces")


def is_first_window(lake: Lake, window: Window) -> bool:
    return not any(p["ds"] < window.ds for p in lake.partitions(EVENTS.name))


def permutation(seed: int, ds: str, n: int) -> Tensor:
    digest = hashlib.sha256(f"{seed}:{ds}".encode()).hexdigest()
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(digest[:15], 16)))


def make_optimizers(bundle: FMBundle, cfg: FMConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW over the FM in two groups, embedding tables (cfg.emb_lr) then the rest (cfg.lr); Adam for the AE."""
    tables = {id(m.weight) for m in bundle.fm.modules() if isinstance(m, nn.Embedding)}
    groups = [[p for p in bundle.fm.parameters() if (id(p) in tables) == is_table] for is_table in (True, False)]
    fm = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, _fm_lrs(cfg), strict=True)],
                           weight_decay=cfg.weight_decay)
    ae = torch.optim.Adam(bundle.ae.parameters(), lr=cfg.ae_lr)
    return fm, ae


def _fm_lrs(cfg: FMConfig) -> tuple[float, float]:
    """(embedding tables, everything else) learning rates of the FM optimizer's two groups."""
    return (cfg.lr if cfg.emb_lr is None else cfg.emb_lr), cfg.lr


def load_parent(lake: Lake, cfg: FMConfig, window: Window, cold_start: bool) -> dict[str, Any] | None:
    """final.pt of window.prev(), or None for a cold start (see module docstring for when that is allowed)."""
    parent = checkpoint.load(lake, cfg.preset, window.prev().ds, "final")
    if parent is None:
        if not cold_start and not is_first_window(lake, window):
            raise FileNotFoundError(
                f"FM {cfg.preset!r} trained through {window.prev()} is missing in lake {lake.uri}, so window "
                f"{window} cannot warm-start; train {window.prev().ds} first, or pass cold_start=True / --cold-start"
            )
        return None
    saved = FMConfig.from_dict(parent["cfg"])
    check_surfaces(saved.surfaces, cfg.surfaces, f"FM {parent['fm_version']}")
    if saved.model_key() != cfg.model_key():
        raise ValueError(f"cannot warm-start {cfg.preset!r} from {parent['fm_version']}: model shape differs "
                         f"({saved.model_key()} vs {cfg.model_key()})")
    return parent


def restore(bundle: FMBundle, opts: tuple[torch.optim.Optimizer, ...], state: dict[str, Any], cfg: FMConfig) -> None:
    bundle.load_state_dict(state["model"])
    for opt, key, lrs in zip(opts, ("opt_fm", "opt_ae"), (_fm_lrs(cfg), (cfg.ae_lr,)), strict=True):
        opt.load_state_dict(state[key])
        for group, lr in zip(opt.param_groups, lrs, strict=True):  # today's config decides the rates
            group["lr"] = lr


@torch.no_grad()
def init_head_bias(bundle: FMBundle, data: WindowData, cfg: FMConfig) -> None:
    """Cold start: each (surface, task) head's bias = logit of that task's rate in the training window.

    Starting at p = 0.5 with rates of a few percent wastes the first day's steps on the bias (Adam moves
    it ~lr per step) and leaves the first FM badly calibrated; the rates come from the window being trained.
    """
    bias = bundle.fm.heads.bias.view(len(cfg.surfaces), len(cfg.tasks))  # (S, T)
    s, t = data.tensors["surface"], data.tensors
    for i in range(len(cfg.surfaces)):
        rows = s == i
        for j, (label, mask) in enumerate((("click", None), ("like", "like_mask"))[: len(cfg.tasks)]):
            w = t[mask][rows] if mask else torch.ones(int(rows.sum()))
            rate = float(((t[label][rows] * w).sum() + 1) / (w.sum() + 2))  # smoothed: never 0 or 1
            bias[i, j] = math.log(rate / (1 - rate))


@torch.no_grad()
def init_head_bias_from_sums(bundle: FMBundle, sums: dict[str, list[float]], cfg: FMConfig) -> None:
    """init_head_bias from per-surface sums [rows, click, like, like_mask] (the streamed window's cache)."""
    bias = bundle.fm.heads.bias.view(len(cfg.surfaces), len(cfg.tasks))  # (S, T)
    for i, name in enumerate(cfg.surfaces):
        n, click, like, mask = sums.get(name, [0.0] * 4)
        for j, rate in enumerate(((click + 1) / (n + 2), (like + 1) / (mask + 2))[: len(cfg.tasks)]):
            bias[i, j] = math.log(rate / (1 - rate))


class MemoryBatches:
    """The in-memory window: step s = permutation[s*B:(s+1)*B] (module docstring); rank r its r-th slice."""

    def __init__(self, data: WindowData, cfg: FMConfig, ds: str, d: Dist) -> None:
        self.data, self.cfg, self.d = data, cfg, d
        self.perm = permutation(cfg.seed, ds, len(data))
        self.examples, self.n_steps = len(data), math.ceil(len(data) / cfg.batch_size)

    def batch(self, step: int) -> tuple[dict[str, Tensor], Tensor]:
        """This rank's rows of global batch `step` and the loss normaliser (global rows, likes) / world."""
        gidx = self.perm[step * self.cfg.batch_size : (step + 1) * self.cfg.batch_size]
        n_like = self.data.tensors["like_mask"].index_select(0, gidx).sum()
        norm = torch.stack([torch.tensor(float(len(gidx))), n_like]) / self.d.world
        return self.data.batch(gidx.tensor_split(self.d.world)[self.d.rank]), norm

    def init_bias(self, bundle: FMBundle) -> None:
        init_head_bias(bundle, self.data, self.cfg)

    def rates(self) -> dict[str, Any]:
        return {"train_ctr": surface_ctr(self.data, self.cfg.surfaces),
                "train_like_rate": surface_ctr(self.data, self.cfg.surfaces, "like")}

    def close(self) -> None:
        pass


class StreamBatches:
    """The streamed window (fm.stream): example cache (built by rank 0), shuffled; each rank reads its shards."""

    def __init__(self, lake: Lake, window: Window, cfg: FMConfig, d: Dist) -> None:
        self.lake, self.window, self.cfg, self.d = lake, window, cfg, d
        if d.rank == 0:
            stream.build_cache(lake, cfg, window)
        if d.world > 1:
            dist.barrier()
        info = stream.load_cache(lake, cfg, window)
        if info is None:
            raise FileNotFoundError(f"FM example cache of {window} missing in lake {lake.uri} after rank 0 built it")
        self.info = info
        self.stream = stream.ExampleStream(lake, info, cfg, window.ds, d.rank, d.world)
        self.examples, self.n_steps = info.rows, self.stream.n_steps

    def batch(self, step: int) -> tuple[dict[str, Tensor], Tensor]:
        b = self.stream.local_batch(step)
        n_like = b["like_mask"].sum()
        if self.d.world > 1:  # the likes of the other ranks' rows (row counts are known to every rank)
            n_like = n_like.to(self.d.device)
            dist.all_reduce(n_like)
            n_like = n_like.cpu()
        norm = torch.stack([torch.tensor(float(self.stream.global_count(step))), n_like]) / self.d.world
        return b, norm

    def init_bias(self, bundle: FMBundle) -> None:
        init_head_bias_from_sums(bundle, self.info.sums, self.cfg)

    def rates(self) -> dict[str, Any]:
        sums = self.info.sums
        return {"train_ctr": {s: v[1] / v[0] for s, v in sums.items() if v[0]},
                "train_like_rate": {s: v[2] / v[0] for s, v in sums.items() if v[0]}}

    def close(self) -> None:
        self.stream.close()
        if self.d.rank == 0:
            stream.remove_cache(self.lake, self.cfg, self.window)


def train_step(model: nn.Module, opts: tuple[torch.optim.Optimizer, ...], local: dict[str, Tensor], norm: Tensor,
               d: Dist, cfg: FMConfig) -> float:
    """One update: this rank's rows `local` of the global batch, loss normaliser `norm`. Returns the local loss."""
    b = {k: v.to(d.device, non_blocking=True) for k, v in local.items()}
    norm = norm.to(d.device)
    out, _, recon = model(b)
    loss = fm_loss(out.logits, b, norm, cfg.like_weight)
    total = loss + ae_loss(out.hidden.detach(), recon, norm)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in opts:
        opt.step()
    return float(loss.detach())


def _state(bundle: FMBundle, opts: tuple[torch.optim.Optimizer, ...], ema: WeightEMA, cfg: FMConfig,
           window: Window, step: int, n_steps: int, parent: str | None) -> dict[str, Any]:
    return {
        "cfg": cfg.to_dict(), "model": bundle.state_dict(), "opt_fm": opts[0].state_dict(),
        "opt_ae": opts[1].state_dict(), "ema": ema.state(), "step": step, "n_steps": n_steps, "ds": window.ds,
        "window_days": window.days, "parent": parent, "rng": torch.get_rng_state(),
    }


def run_training(cfg: FMConfig, window: Window, lake: Lake, *, cold_start: bool = False,
                 data: WindowData | None = None) -> TrainResult:
    """train_fm with its statistics (see module docstring). `data` skips loading (bench, tests).

    Runs with cfg.threads torch threads (the caller's setting is restored on return).
    """
    with torch_threads(cfg.threads):
        return _run_training(cfg, window, lake, cold_start, data)


def _run_training(cfg: FMConfig, window: Window, lake: Lake, cold_start: bool, data: WindowData | None) -> TrainResult:
    d = dist_info()
    torch.manual_seed(cfg.seed)
    bundle = FMBundle(cfg)
    opts = make_optimizers(bundle, cfg)
    parent = load_parent(lake, cfg, window, cold_start)
    parent_version = parent["fm_version"] if parent else None
    if parent:
        restore(bundle, opts, parent, cfg)
    start = 0
    progress = checkpoint.load(lake, cfg.preset, window.ds, "progress")
    if progress and progress["parent"] == parent_version and FMConfig.from_dict(progress["cfg"]) == cfg:
        restore(bundle, opts, progress, cfg)
        torch.set_rng_state(progress["rng"])
        start = progress["step"]
        log.info("fm train %s: resuming from step %d", window.ds, start)
    if data is None and cfg.stream:
        batches: MemoryBatches | StreamBatches = StreamBatches(lake, window, cfg, d)
    else:
        batches = MemoryBatches(data if data is not None else load_window(lake, window, cfg), cfg, window.ds, d)
    if parent is None and start == 0:
        batches.init_bias(bundle)
    bundle.to(d.device)
    saved_ema = (progress if start and progress else parent or {}).get("ema")
    ema = WeightEMA(bundle, cfg.ema_decay, {k: v if k == "updates" else {n: t.to(d.device) for n, t in v.items()}
                                            for k, v in saved_ema.items()} if saved_ema else None)
    model: nn.Module = bundle
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(bundle, device_ids=[d.device] if d.device.type == "cuda" else None)
    n_steps = batches.n_steps
    t0, losses = time.perf_counter(), []
    for step in range(start, n_steps):
        losses.append(train_step(model, opts, *batches.batch(step), d, cfg))
        ema.update()
        if (step + 1) % cfg.log_every == 0:
            rate = (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0)
            log.info("fm train %s: step %d/%d loss %.4f %.0f examples/s", window.ds, step + 1, n_steps,
                     sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]), rate)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < n_steps and d.rank == 0:
            checkpoint.save(lake, cfg.preset, window.ds, "progress", _state(bundle, opts, ema, cfg, window,
                                                                               step + 1, n_steps, parent_version))
            log.info("fm train %s: checkpoint step=%d", window.ds, step + 1)
    seconds = time.perf_counter() - t0
    bundle.cpu()
    final = _state(bundle, opts, ema, cfg, window, n_steps, n_steps, parent_version)
    served = FMBundle(cfg)
    served.load_state_dict(serving_weights(final))
    version = checkpoint.fm_version(cfg.preset, window.ds, served)
    if d.rank == 0:
        final |= {"fm_version": version, "trained_through": window.ds, **batches.rates()}
        path = checkpoint.save(lake, cfg.preset, window.ds, "final", final)
        versions.record_version(lake, cfg.preset, window.ds,
                                {"fm_version": version, "parent": parent_version, "path": path, "steps": n_steps})
        checkpoint.remove(lake, cfg.preset, window.ds, "progress")
    if d.world > 1:
        dist.barrier()
    batches.close()
    mean_loss = sum(losses) / max(len(losses), 1)
    log.info("fm train %s: done %s (%d steps, %.1fs, loss %.4f)", window.ds, version, n_steps - start, seconds, mean_loss)
    return TrainResult(version, parent_version, n_steps, batches.examples, seconds, mean_loss, start)


def train_fm(cfg: FMConfig, window: Window, lake: Lake, *, cold_start: bool = False) -> str:
    """Train the FM on `window` (warm start from window.prev()); return its fm_version."""
    return run_training(cfg, window, lake, cold_start=cold_start).fm_version


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['lr=0.001', 'mlp=[64,32]'] -> {'lr': 0.001, 'mlp': (64, 32)} (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"override {pair!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def main(argv: list[str] | None = None) -> TrainResult:
    """``python -m fm.train``: train one window (under torchrun: one DDP worker); prints the fm_version on rank 0
    and returns this worker's TrainResult (fm.launch reports it to the launcher)."""
    p = argparse.ArgumentParser(prog="python -m fm.train", description=__doc__.splitlines()[0])
    p.add_argument("--ds", required=True)
    p.add_argument("--lake", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FMConfig override")
    p.add_argument("--cold-start", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: FMConfig.threads)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    lake = Lake(args.lake)
    cfg = lake_config(args.preset, lake.meta(), **parse_overrides(args.set))
    cfg = replace(cfg, threads=args.threads) if args.threads else cfg
    res = run_training(cfg, lake.window(args.ds), lake, cold_start=args.cold_start)
    if dist_info().rank == 0:
        print(res.fm_version)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
