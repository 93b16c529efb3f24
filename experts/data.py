"""expert_examples partitions -> tensors the expert reads (see experts/model.py for shapes), in bounded memory.

- `ExpertData`: rows as tensors (a read chunk, a shuffle buffer, or a whole small partition).
- `ExpertSource` (issue 12: windows larger than memory): one partition (one day, one surface) read with
  pyarrow in record batches of `read_rows` rows, never whole. The LoopFM history arrives as the FM exported it,
  int8 codes and a scale per entry (loop_hist_code, loop_hist_scale); `_standardized` dequantises it (the
  float32 product ``code * scale``) just before standardising. Construction makes one pass for the per-row
  labels (N,) float32, the FM versions and the per-partition standardisation (`Standardization`); `chunks`
  then yields ExpertData in file order (or by Parquet row group, the shuffle unit of experts.stream).
  - A partition of at most `buffer_rows` rows: that pass reads the label, fm_version, fm_tae and history
    code and scale columns only, for exactly `standardize`'s float32 statistics, and each later pass reads
    Parquet (its callers read it once, whole: experts.stream.fitting).
  - A larger one: that pass converts every row into a tensor cache on local disk (`_TensorCache`, raw: the
    history still int8 codes, nothing standardised; ~1.1 KB a row of the bench lakes, 2.9 KB when it held
    float32 entries) and accumulates float64 statistics over the batches on the way (equal up to float32
    rounding, about 1e-7 relative); every later pass reads the cache and standardises each chunk as it is
    read. One Parquet decode of the nested history column instead of two: measured on the 1M events/day
    bench lake, the separate statistics pass was 8.8 s of the expert stage's 34 s.
- `load_examples`: a whole partition in one read (the in-memory reference: tests, benches).
- `examples_for`: the ExpertSource a stage reads for its window; it never builds the partition (the
  expert_examples stage is the table's only writer) and says which command does when it is missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from experts.config import OWN_FEATURES, ExpertConfig
from features.lake import DATA_FILE, Lake, PartitionNotFound, SchemaError, check_schema, parquet_reader
from features.schemas import CLICK, EXPERT_EXAMPLES, FM_OUTPUTS, FM_VERSION
from features.windows import Window

READ_ROWS = 8192  # rows per record batch read; a multiple of the scoring batch (experts.evaluate.predict)
TENSOR_COLUMNS = [*OWN_FEATURES, "fm_tae", "loop_hist_code", "loop_hist_scale", "loop_hist_click", "fm_logit_click",
                  "counters", CLICK, FM_VERSION]
STATS_COLUMNS = [CLICK, FM_VERSION, "fm_tae", "loop_hist_code", "loop_hist_scale"]


@dataclass
class ExpertData:
    """Rows of one window of one surface, as tensors; `fm_versions` are the distinct FM versions of its rows."""

    tensors: dict[str, torch.Tensor]
    label: torch.Tensor  # (N,) float32
    fm_versions: list[str]

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def repr_dim(self) -> int:
        return int(self.tensors["loop_repr"].shape[-1])

    @property
    def tae_dim(self) -> int:
        return int(self.tensors["tae"].shape[-1])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}

    def rows(self, idx: torch.Tensor) -> ExpertData:
        """The rows `idx` (a copy), labels included."""
        return ExpertData(self.batch(idx), self.label[idx], self.fm_versions)

    def span(self, start: int, stop: int) -> ExpertData:
        """Rows [start, stop) as views of these tensors (no copy)."""
        return ExpertData({k: v[start:stop] for k, v in self.tensors.items()}, self.label[start:stop],
                          self.fm_versions)


def concat(parts: Iterable[ExpertData], rows: int) -> ExpertData:
    """The first `rows` rows of `parts`, copied into tensors allocated once (no second copy of the list)."""
    out: ExpertData | None = None
    at, versions = 0, set[str]()
    for part in parts:
        if out is None:
            out = ExpertData({k: v.new_empty((rows, *v.shape[1:])) for k, v in part.tensors.items()},
                             part.label.new_empty(rows), [])
        take = min(len(part), rows - at)
        for k, v in part.tensors.items():
            out.tensors[k][at:at + take] = v[:take]
        out.label[at:at + take] = part.label[:take]
        at, versions = at + take, versions | set(part.fm_versions)
    if out is None or at != rows:
        raise ValueError(f"expected {rows} rows, got {at}")
    out.fm_versions = sorted(versions)
    return out


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float>[W] column -> (N, W) float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), width)


def _entries(arr: pa.Array, length: int, width: int | None, dtype: type = np.float32
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, slots, values) of the newest `length` entries of each list (they are ordered oldest -> newest),
    row-major: entry j of row i sits in slot j; values (M, width) of `dtype`, (M,) when width is None."""
    full = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    lengths = np.minimum(full, length)
    rows = np.repeat(np.arange(len(arr)), lengths)
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    inner = arr.flatten()
    if not len(rows):
        return rows, slots, np.zeros((0,) if width is None else (0, width), dtype)
    values = (inner if width is None else inner.flatten()).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    values = values if width is None else values.reshape(len(inner), width)
    offsets = arr.offsets.to_numpy()
    starts = offsets[:-1] - offsets[0] + (full - lengths)  # flatten() starts at the first offset
    return rows, slots, values[np.repeat(starts, lengths) + slots]


def _history(column: pa.ChunkedArray, length: int, width: int | None, dtype: type = np.float32
             ) -> tuple[np.ndarray, np.ndarray]:
    """list<fixed_size_list<T>[R]> -> (N, L, R) of `dtype` (list<scalar> with width None -> (N, L)), zero padded
    after the entries, and the (N, L) mask."""
    arr = column.combine_chunks()
    n = len(arr)
    out: np.ndarray = np.zeros((n, length) if width is None else (n, length, width), dtype=dtype)
    mask = np.zeros((n, length), dtype=bool)
    rows, slots, values = _entries(arr, length, width, dtype)
    out[rows, slots] = values
    mask[rows, slots] = True
    return out, mask


def _dequantised(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """History entries as float32: int8 codes (..., R) times their scales (...), one float32 product per value
    (as LoopFM's int8 representation is read everywhere: fm_outputs' fm_repr * fm_repr_scale)."""
    return np.multiply(codes, scales[..., None], dtype=np.float32)


@dataclass(frozen=True)
class Moments:
    """Column mean and std (floored at 1e-3) of one standardised input, each (1, W) float32."""

    mean: np.ndarray
    std: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.apply_(x.astype(np.float32))  # a copy

    def apply_(self, x: np.ndarray) -> np.ndarray:
        """`x` (..., W) float32 standardised in place (float32 throughout), returned."""
        x -= self.mean
        x /= self.std
        return x


def moments(x: np.ndarray) -> Moments:
    """The Moments of the rows of (N, W) float32 `x` (float32 arithmetic, as numpy reduces it)."""
    return Moments(x.mean(axis=0, keepdims=True), np.maximum(x.std(axis=0, keepdims=True), 1e-3))


def standardize(x: np.ndarray) -> np.ndarray:
    """Each column of (N, W) `x` centred and scaled by its mean and std over these rows (std floored at 1e-3).

    Applied per partition, i.e. per (day, surface, FM version), to the FM's target-aware embedding and to the
    LoopFM codes of the history entries: the expert trained on day D-1 read FM_{D-2}'s outputs and is scored
    on D with FM_{D-1}'s, and the raw outputs' location and scale move from one FM version to the next
    (measured: fe over-/under-predicted by up to 19% on days when base was calibrated, loopfm by 10% more
    than base on the first scored day; bench/calibration_hypotheses.py). Label-free: serving computes the
    same statistics on the FM version's recent traffic.
    """
    return moments(x).apply(x)


@dataclass(frozen=True)
class Standardization:
    """A partition's `standardize` statistics: of fm_tae's rows and of the real history entries (None: none)."""

    tae: Moments
    hist: Moments | None


class _Accumulator:
    """Column Moments of a stream of (n, W) float32 blocks: `moments` of their concatenation when `exact`
    (the blocks are kept), else float64 running means and squared deviations (Chan et al.'s merge)."""

    def __init__(self, exact: bool) -> None:
        self.exact, self.n = exact, 0
        self.parts: list[np.ndarray] = []
        self.mean, self.m2 = np.zeros(0), np.zeros(0)

    def add(self, x: np.ndarray) -> None:
        if self.exact or not len(x):
            self.parts += [x] if len(x) else []
            return
        n, mean = len(x), x.mean(axis=0, dtype=np.float64)  # float64 sums without a float64 copy of x
        dev = x - mean.astype(np.float32)
        m2 = np.square(dev, out=dev).sum(axis=0, dtype=np.float64)
        total = self.n + n
        delta = mean - self.mean if self.n else np.zeros_like(mean)
        self.mean = mean if not self.n else self.mean + delta * n / total
        self.m2 = m2 if not self.n else self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total

    def result(self) -> Moments | None:
        if self.exact:
            return moments(np.concatenate(self.parts)) if self.parts else None
        if not self.n:
            return None
        std = np.maximum(np.sqrt(self.m2 / self.n), 1e-3)
        return Moments(self.mean[None].astype(np.float32), std[None].astype(np.float32))


def to_tensors(table: pa.Table, history_length: int, stats: Standardization | None = None) -> ExpertData:
    """An EXPERT_EXAMPLES table -> ExpertData, standardised with `stats` (default: this table's own, i.e.
    `standardize` over its rows). Fails on an empty table."""
    data = _raw_tensors(table, history_length)
    if stats is None:
        hist = _real_entries(data)
        stats = Standardization(moments(data.tensors["tae"].numpy()), moments(hist) if len(hist) else None)
    return _standardized(data, stats)


def _raw_tensors(table: pa.Table, history_length: int) -> ExpertData:
    """`to_tensors` without the standardisation: tae as the table holds it, the history as int8 codes
    ``loop_code`` (N, L, R) and scales ``loop_scale`` (N, L) in place of ``loop_repr``."""
    if table.num_rows == 0:
        raise ValueError("expert_examples partition has no rows")
    cats = np.stack([table[c].to_numpy().astype(np.int64) for c in OWN_FEATURES], axis=1)  # (N, F)
    width = table["loop_hist_code"].type.value_type.list_size
    codes, mask = _history(table["loop_hist_code"], history_length, width, np.int8)
    scales, _ = _history(table["loop_hist_scale"], history_length, None)  # aligned with the codes' slots
    clicks, _ = _history(table["loop_hist_click"], history_length, None)
    tensors = {
        "cats": torch.from_numpy(cats),
        "loop_code": torch.from_numpy(codes),
        "loop_scale": torch.from_numpy(scales),
        "loop_mask": torch.from_numpy(mask),
        "loop_click": torch.from_numpy(clicks),
        "tae": torch.from_numpy(_vectors(table["fm_tae"])),
        "fm_logit": torch.from_numpy(table["fm_logit_click"].to_numpy().astype(np.float32)),
        "counters": torch.from_numpy(_vectors(table["counters"])),
    }
    label = torch.from_numpy(table[CLICK].to_numpy().astype(np.float32))
    versions = sorted(pc.unique(table[FM_VERSION]).to_pylist())
    return ExpertData(tensors, label, versions)


def _table_entries(table: pa.Table, length: int, width: int) -> np.ndarray:
    """The real history entries (each row's newest `length`) of an EXPERT_EXAMPLES table, dequantised: (M, width)
    float32, as `_real_entries` gives them from the tensors."""
    codes = _entries(table["loop_hist_code"].combine_chunks(), length, width, np.int8)[2]
    return _dequantised(codes, _entries(table["loop_hist_scale"].combine_chunks(), length, None)[2])


def _real_entries(raw: ExpertData) -> np.ndarray:
    """The real (unmasked) history entries of raw ExpertData, dequantised: (M, R) float32."""
    mask = raw.tensors["loop_mask"]
    return _dequantised(raw.tensors["loop_code"][mask].numpy(), raw.tensors["loop_scale"][mask].numpy())


def _standardized(data: ExpertData, stats: Standardization) -> ExpertData:
    """`data` (raw, as `_raw_tensors` gives it) with the history dequantised into ``loop_repr`` (N, L, R)
    float32, and tae and the real history entries standardised with `stats` in place (`Moments.apply_` on the
    tensors' memory); padding stays 0."""
    t = data.tensors
    stats.tae.apply_(t["tae"].numpy())
    hist = _dequantised(t.pop("loop_code").numpy(), t.pop("loop_scale").numpy())
    if stats.hist is not None:
        stats.hist.apply_(hist)
        hist[~t["loop_mask"].numpy()] = 0.0
    t["loop_repr"] = torch.from_numpy(hist)
    return data


class ExpertSource:
    """expert_examples(fm=preset, ds, surface) read in record batches (module docstring); PartitionNotFound
    when absent, ValueError when empty. `group_rows`: the rows of each Parquet row group, in file order."""

    def __init__(self, lake: Lake, preset: str, ds: str, surface: str, history_length: int,
                 buffer_rows: int = ExpertConfig.shuffle_rows, read_rows: int = READ_ROWS) -> None:
        keys = {"fm": preset, "ds": ds, "surface": surface}
        if not lake.exists(EXPERT_EXAMPLES.name, **keys):
            raise PartitionNotFound(f"{EXPERT_EXAMPLES.name} {keys} does not exist in lake {lake.uri}")
        self.lake, self.path = lake, f"{lake.partition_dir(EXPERT_EXAMPLES.name, **keys)}/{DATA_FILE}"
        self.history_length, self.buffer_rows, self.read_rows = history_length, buffer_rows, read_rows
        with lake.fs.open_input_file(self.path) as f:
            meta = pq.ParquetFile(f)
            try:
                check_schema(EXPERT_EXAMPLES, meta.schema_arrow, f"{EXPERT_EXAMPLES.name} {keys}")
            except SchemaError as exc:  # e.g. written before the history kept int8 codes: derived data, rebuild it
                raise SchemaError(f"{exc}: rebuild it with {_build_command(preset, ds, surface)}") from None
            self.group_rows = [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]
            self.repr_dim = int(meta.schema_arrow.field("loop_hist_code").type.value_type.list_size)
            self.tae_dim = int(meta.schema_arrow.field("fm_tae").type.list_size)
        if not len(self):
            raise ValueError("expert_examples partition has no rows")
        self.cache: _TensorCache | None = None
        if len(self) <= buffer_rows:
            self.label, self.fm_versions, self.stats = self._scan()
        else:  # read more than once (eval, training, serving logits): convert once, in the statistics' pass
            self.cache, self.label, self.fm_versions, self.stats = self._convert_once()

    def __len__(self) -> int:
        return sum(self.group_rows)

    def _tables(self, columns: list[str], groups: Iterable[int] | None = None) -> Iterator[pa.Table]:
        """Record batches of at most read_rows rows: of `groups` in that order (default: every row, in file order).

        One batch reader per row group, without pre-buffering (features.lake.parquet_reader): a pre-buffering
        reader over the whole file kept the nested history column's row groups until the file closed
        (measured: 1.4 GB of Arrow memory held after one pass over 591k rows)."""
        with self.lake.fs.open_input_file(self.path) as f:
            reader = parquet_reader(f)
            for g in range(len(self.group_rows)) if groups is None else groups:
                for batch in reader.iter_batches(batch_size=self.read_rows, row_groups=[g], columns=columns):
                    yield pa.Table.from_batches([batch])

    def _scan(self) -> tuple[torch.Tensor, list[str], Standardization]:
        """A partition within the buffer: one pass over the few columns of its labels (N,), FM versions and
        exact standardisation (module docstring)."""
        tae, hist = _Accumulator(exact=True), _Accumulator(exact=True)
        labels, versions = [], set[str]()
        for table in self._tables(STATS_COLUMNS):
            labels.append(table[CLICK].to_numpy().astype(np.float32))
            versions |= set(pc.unique(table[FM_VERSION]).to_pylist())
            tae.add(_vectors(table["fm_tae"]))
            hist.add(_table_entries(table, self.history_length, self.repr_dim))
        return torch.from_numpy(np.concatenate(labels)), sorted(versions), _standardization(tae, hist)

    def _convert_once(self) -> tuple[_TensorCache, torch.Tensor, list[str], Standardization]:
        """A larger partition: one pass that converts every row group into the tensor cache, raw, and gathers
        the labels (N,), FM versions and float64 standardisation on the way (module docstring)."""
        tae, hist = _Accumulator(exact=False), _Accumulator(exact=False)
        labels, versions = [], set[str]()

        def raw() -> Iterator[tuple[int, ExpertData]]:
            for g in range(len(self.group_rows)):
                for table in self._tables(TENSOR_COLUMNS, [g]):
                    chunk = _raw_tensors(table, self.history_length)
                    labels.append(chunk.label)
                    versions.update(chunk.fm_versions)
                    tae.add(chunk.tensors["tae"].numpy())
                    hist.add(_real_entries(chunk))
                    yield g, chunk

        cache = _TensorCache.write(raw(), len(self.group_rows))
        return cache, torch.cat(labels), sorted(versions), _standardization(tae, hist)

    def chunks(self, groups: Iterable[int] | None = None) -> Iterator[ExpertData]:
        """ExpertData of at most read_rows rows, standardised with the partition's statistics: of `groups` in
        that order (default: every row, in file order), from the tensor cache when there is one."""
        if self.cache is not None:
            for raw in self.cache.read(range(len(self.group_rows)) if groups is None else groups, self.fm_versions):
                yield _standardized(raw, self.stats)
            return
        for table in self._tables(TENSOR_COLUMNS, groups):
            yield to_tensors(table, self.history_length, self.stats)

    def whole(self) -> ExpertData:
        """Every row in file order, as one ExpertData (callers keep this to partitions they may hold)."""
        return concat(self.chunks(), len(self))


def _standardization(tae: _Accumulator, hist: _Accumulator) -> Standardization:
    moments_tae = tae.result()
    assert moments_tae is not None  # the partition has rows
    return Standardization(moments_tae, hist.result())


class _TensorCache:
    """A partition's raw ExpertData chunks (`_raw_tensors`; standardised as they are read), converted once, in
    an uncompressed Arrow IPC file in a temporary folder (removed with the object): later passes read tensors
    instead of decoding Parquet again (the nested history column's decode and conversion cost ~20 us a row a
    pass, more than a training step's share; as fm.stream's example cache). One record batch per chunk;
    `batches[g]`: the batches of row group g."""

    def __init__(self, path: str, batches: list[list[int]], shapes: dict[str, tuple[int, ...]]) -> None:
        self.path, self.batches, self.shapes = path, batches, shapes
        weakref.finalize(self, shutil.rmtree, os.path.dirname(path), True)

    @classmethod
    def write(cls, chunks: Iterator[tuple[int, ExpertData]], groups: int) -> _TensorCache:
        path = os.path.join(tempfile.mkdtemp(prefix="fmx-expert-cache-"), "chunks.arrow")
        batches: list[list[int]] = [[] for _ in range(groups)]
        shapes: dict[str, tuple[int, ...]] = {}
        writer, n = None, 0
        with pa.OSFile(path, "wb") as sink:
            for g, chunk in chunks:
                cols = {**chunk.tensors, "label": chunk.label}
                shapes = {k: tuple(v.shape[1:]) for k, v in cols.items()}
                batch = pa.record_batch({k: _flat(v) for k, v in cols.items()})
                writer = writer or pa.ipc.new_file(sink, batch.schema)
                writer.write_batch(batch)
                batches[g].append(n)
                n += 1
            if writer is not None:
                writer.close()
        return cls(path, batches, shapes)

    def read(self, groups: Iterable[int], versions: list[str]) -> Iterator[ExpertData]:
        with pa.OSFile(self.path) as source:
            reader = pa.ipc.open_file(source)
            for g in groups:
                for i in self.batches[g]:
                    batch = reader.get_batch(i)
                    cols = {k: _unflat(batch.column(k), self.shapes[k]) for k in self.shapes}
                    cols["loop_mask"] = cols["loop_mask"].bool()
                    label = cols.pop("label")
                    yield ExpertData(cols, label, versions)


def _flat(t: torch.Tensor) -> pa.Array:
    """(n, ...) tensor -> Arrow array of n rows (fixed_size_list of the flattened rest); bool as uint8."""
    values = t.numpy().astype(np.uint8) if t.dtype == torch.bool else t.numpy()
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    width = int(np.prod(t.shape[1:]))
    return flat if t.dim() == 1 else pa.FixedSizeListArray.from_arrays(flat, width)


def _unflat(col: pa.Array, shape: tuple[int, ...]) -> torch.Tensor:
    values = (col.flatten() if shape else col).to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.reshape(len(col), *shape).copy())


def load_examples(lake: Lake, preset: str, ds: str, surface: str, history_length: int) -> ExpertData:
    """Read expert_examples(fm=preset, ds, surface) whole, as tensors (raises PartitionNotFound when absent)."""
    return to_tensors(lake.read(EXPERT_EXAMPLES.name, fm=preset, ds=ds, surface=surface), history_length)


def fm_started(lake: Lake, preset: str, window: Window) -> bool:
    """Whether FM `preset` scored any window up to and including `window`."""
    return any(p["ds"] <= window.ds for p in lake.partitions(FM_OUTPUTS.name, fm=preset))


class ExamplesMissing(PartitionNotFound):
    """expert_examples(fm, ds, surface) was not built although the FM scored that window or an earlier one."""


def _build_command(preset: str, ds: str, surface: str) -> str:
    return f"`fmx experts examples --ds {ds} --surface {surface} --preset {preset}` (the DAG's expert_examples task)"


def examples_for(lake: Lake, window: Window, surface: str, preset: str, history_length: int,
                 buffer_rows: int = ExpertConfig.shuffle_rows) -> ExpertSource | None:
    """expert_examples(window, surface) as an ExpertSource; None before the FM's first scores.

    Only the expert_examples stage (experts.stage.expert_examples) writes the table: a missing partition
    after the FM's first scores is `ExamplesMissing`, one line naming it and the command that builds it."""
    if not lake.exists(EXPERT_EXAMPLES.name, fm=preset, ds=window.ds, surface=surface):
        if not fm_started(lake, preset, window):
            return None
        raise ExamplesMissing(
            f"{EXPERT_EXAMPLES.name}(fm={preset}, ds={window.ds}, surface={surface}) does not exist in lake {lake.uri}: "
            f"build it first with {_build_command(preset, window.ds, surface)}")
    return ExpertSource(lake, preset, window.ds, surface, history_length, buffer_rows)
