"""Passes over an expert's rows in bounded memory: the training order, and every row in order.

`Rows` is either ExpertData (rows in memory) or an ExpertSource (a partition read in record batches,
experts.data). Every pass holds at most one shuffle buffer or one read chunk of feature tensors; what it
returns per row (scores, logits) is 1-D.

Training order (`shuffled_batches`), deterministic given the generator:
- rows in memory, or a partition of at most `buffer_rows` rows (read whole, once: `fitting`): one
  permutation of all rows, ``torch.randperm(N, generator=gen).split(batch_size)`` — the order of every
  partition of the built-in job and the tests;
- a larger partition: its Parquet row groups in the order ``torch.randperm(G, generator=gen)``, their rows
  poured into a buffer of `buffer_rows` rows; each full buffer is permuted (``torch.randperm``, same
  generator) and its whole batches are emitted, the leftover rows (fewer than a batch) stay for the next
  buffer; the last buffer is emitted whole. A row's neighbours in a batch come from the row groups of its
  buffer (the expert_examples writer's row groups hold ~65k events of time order each), as fm.stream does
  with its cache groups.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import torch

from experts.data import ExpertData, ExpertSource
from experts.model import Expert

Rows = ExpertData | ExpertSource
SCORE_ROWS = 8192  # rows per scoring chunk of rows in memory (experts.evaluate.predict's batch)


def fitting(rows: Rows, buffer_rows: int) -> Rows:
    """`rows` as ExpertData when it has at most `buffer_rows` rows (one read), else the source unchanged."""
    if isinstance(rows, ExpertSource) and len(rows) <= buffer_rows:
        return rows.whole()
    return rows


def chunks(rows: Rows) -> Iterator[ExpertData]:
    """Every row once, in order: SCORE_ROWS-row slices of rows in memory, the read chunks of a source."""
    if isinstance(rows, ExpertSource):
        yield from rows.chunks()
        return
    for start in range(0, len(rows), SCORE_ROWS):
        yield rows.rows(torch.arange(start, min(start + SCORE_ROWS, len(rows))))


def shuffled_batches(rows: Rows, gen: torch.Generator, batch_size: int, buffer_rows: int
                     ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(batch, label) in training order (module docstring)."""
    data = fitting(rows, buffer_rows)
    if isinstance(data, ExpertData):
        for idx in torch.randperm(len(data), generator=gen).split(batch_size):
            yield data.batch(idx), data.label[idx]
        return
    order = torch.randperm(len(data.group_rows), generator=gen).tolist()
    buffer: ExpertData | None = None
    held = 0
    for chunk in data.chunks(order):
        at = 0
        while at < len(chunk):
            take = min(buffer_rows - held, len(chunk) - at)
            part = chunk.span(at, at + take)
            buffer = _put(buffer, part, held, buffer_rows)
            held, at = held + take, at + take
            if held == buffer_rows:
                held = yield from _drain(buffer, held, gen, batch_size, last=False)
    if buffer is not None and held:
        yield from _drain(buffer, held, gen, batch_size, last=True)


def _put(buffer: ExpertData | None, part: ExpertData, at: int, capacity: int) -> ExpertData:
    """`part` copied into rows [at, at + len(part)) of `buffer` (allocated with `capacity` rows on first use)."""
    if buffer is None:
        buffer = ExpertData({k: v.new_empty((capacity, *v.shape[1:])) for k, v in part.tensors.items()},
                            part.label.new_empty(capacity), part.fm_versions)
    for k, v in part.tensors.items():
        buffer.tensors[k][at:at + len(part)] = v
    buffer.label[at:at + len(part)] = part.label
    return buffer


def _drain(buffer: ExpertData, held: int, gen: torch.Generator, batch_size: int, last: bool
           ) -> Generator[tuple[dict[str, torch.Tensor], torch.Tensor], None, int]:
    """Emit the permuted whole batches of the buffer's first `held` rows (every row when `last`); the rows
    left over move to the buffer's front. Returns how many are left."""
    perm = torch.randperm(held, generator=gen)
    emit = held if last else held - held % batch_size
    for idx in perm[:emit].split(batch_size):
        yield buffer.batch(idx), buffer.label[idx]
    rest = perm[emit:]
    _put(buffer, buffer.rows(rest), 0, len(buffer))
    return len(rest)


@torch.no_grad()
def serving_logits(model: Expert, rows: Rows) -> torch.Tensor:
    """The serving head's logits (N,) on every row, in order."""
    model.eval()
    return torch.cat([model(chunk.tensors)["logit"] for chunk in chunks(rows)])
