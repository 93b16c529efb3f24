"""torch intra-op threads for a block of work, shared by the FM and expert stages.

On a small shared machine torch's default (one thread per core, beside polars' pool and Airflow in the same
process) oversubscribes the cores: in-process pipeline days ran 6-20x slower than with one thread. torch is
imported lazily so that the data layer stays importable without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch intra-op threads = n inside the block (n <= 0: leave torch's setting), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
