"""fmx's data layer: the lake, its table contracts, the generator and importers, point-in-time features.

Memory of streamed stages: polars's allocator (jemalloc) keeps freed pages for 10 s by default, and a
stage streaming a large window frees a chunk's memory several times a second, so the pages it holds grow
with the window's throughput, not its chunk size (measured: expert_examples at 1M events/day peaked at
~1.0-1.2 GB vs ~0.95 GB with a 1 s decay, ~0.76 GB with none; the no-decay setting cost ~20% more CPU).
A 1 s decay is set here, before polars is first imported (an explicit _RJEM_MALLOC_CONF wins).
"""

import os

os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:1000,muzzy_decay_ms:1000")
