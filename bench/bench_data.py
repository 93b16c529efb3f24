"""Data-layer throughput, measured in one run (a script, not a test).

    .venv/bin/python bench/bench_data.py [--scale tiny|small|default] [--length 50] [--repeat 3]

Prints:
1. generator: events/s of `generate_window` for the second day (carry-over read + all writes);
2. Parquet write MB/s of `Lake.write` (cast + checks + temp file + rename) vs a raw
   `pyarrow.parquet.write_table` of the same conformed table, and their ratio (best of --repeat);
3. history features: rows/s of `features.history.history_features` vs the same result computed with
   DuckDB SQL (window functions number each user's timeline and find each row's same-ts group; one
   ordered list per user is then sliced per event) on the same events and state, and asserts both
   are identical ("identical: True").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import date

import duckdb
import polars as pl
import pyarrow.parquet as pq

from features.generate import SCALES, GeneratorConfig, generate_window
from features.history import HISTORY_PAYLOAD, advance_state, history_features
from features.lake import Lake, conform
from features.schemas import EVENTS
from features.windows import Window

DAY1, DAY2 = Window(date(2026, 1, 1)), Window(date(2026, 1, 2))


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Fastest wall time of `repeat` calls (seconds)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_generator(lake: Lake, cfg: GeneratorConfig) -> None:
    generate_window(lake, cfg, DAY1)
    out = generate_window(lake, cfg, DAY2)
    print(f"generator   : {out['events']:,} events in {out['seconds']:.2f}s = {out['events'] / out['seconds']:,.0f} "
          f"events/s (day 2: carry-over read, generation, 6 partition writes)")


def bench_parquet(lake: Lake, repeat: int, scratch: str) -> None:
    frame = lake.scan(EVENTS.name, ds=DAY2.ds, surface="feed").collect()
    table = conform(EVENTS, frame.to_arrow(), "bench")
    raw_path = os.path.join(scratch, "raw.parquet")
    t_lake, t_raw = float("inf"), float("inf")
    for _ in range(repeat):  # alternate the two, so that machine load hits both alike
        t_raw = min(t_raw, _best(lambda: pq.write_table(table, raw_path), 1))
        t_lake = min(t_lake, _best(lambda: lake.write(EVENTS.name, frame, ds="2099-01-01", surface="feed"), 1))
    mb = os.path.getsize(raw_path) / 1e6
    print(f"parquet     : {table.num_rows:,} rows, {mb:.1f} MB file; Lake.write {mb / t_lake:,.1f} MB/s "
          f"({t_lake:.3f}s), raw pq.write_table {mb / t_raw:,.1f} MB/s ({t_raw:.3f}s); "
          f"Lake.write / raw time ratio {t_lake / t_raw:.2f}")


_DUCKDB_HISTORY = """
with state_rows as (
    select user_id, unnest(hist_ts) as ts, unnest(hist_item_id) as item_id, unnest(hist_surface) as surface,
           unnest(hist_click) as click, unnest(range(len(hist_ts))) as ord
    from state_frame
), all_rows as (
    select user_id, ts, item_id, surface, click, 0 as src, ord, null::bigint as event_id from state_rows
    union all
    select user_id, ts, item_id, surface, click, 1 as src, event_id as ord, event_id from events_frame
), numbered as (
    -- rn: position in the user's timeline; tie_start: first position of the row's same-ts group,
    -- so the history of a row is positions [tie_start - L, tie_start - 1] (ties excluded)
    select *, row_number() over (partition by user_id order by ts, src, ord) as rn from all_rows
), tied as (
    select event_id, user_id, min(rn) over (partition by user_id, ts) as tie_start from numbered
), timeline as (
    select user_id, list(ts order by rn) as l_ts, list(item_id order by rn) as l_item_id,
           list(surface order by rn) as l_surface, list(click order by rn) as l_click
    from numbered group by user_id
)
select t.event_id,
    list_slice(l.l_ts, greatest(1, t.tie_start - {L}), t.tie_start - 1) as hist_ts,
    list_slice(l.l_item_id, greatest(1, t.tie_start - {L}), t.tie_start - 1) as hist_item_id,
    list_slice(l.l_surface, greatest(1, t.tie_start - {L}), t.tie_start - 1) as hist_surface,
    list_slice(l.l_click, greatest(1, t.tie_start - {L}), t.tie_start - 1) as hist_click
from tied t join timeline l using (user_id)
where t.event_id is not null
"""


def bench_history(lake: Lake, length: int, repeat: int) -> None:
    def day(w: Window) -> pl.DataFrame:
        frame = lake.scan_many(EVENTS.name, lake.partitions(EVENTS.name, ds=w.ds)).collect()
        return frame.select("event_id", "user_id", "ts", *HISTORY_PAYLOAD)

    events_frame = day(DAY2)
    state_frame = advance_state(day(DAY1).lazy(), None, length, HISTORY_PAYLOAD).collect()
    result: dict[str, pl.DataFrame] = {}

    def run_polars() -> None:
        result["polars"] = history_features(events_frame.lazy(), state_frame.lazy(), length, HISTORY_PAYLOAD).collect()

    def run_duckdb() -> None:
        con = duckdb.connect()
        con.register("events_frame", events_frame)
        con.register("state_frame", state_frame)
        result["duckdb"] = con.sql(_DUCKDB_HISTORY.replace("{L}", str(length))).pl()
        con.close()

    t_pl, t_duck = _best(run_polars, repeat), _best(run_duckdb, repeat)
    ours = result["polars"].sort("event_id")
    theirs = result["duckdb"].cast(dict(ours.schema)).sort("event_id")  # type: ignore[arg-type]
    n = events_frame.height
    mean_len = float(ours["hist_ts"].list.len().mean() or 0.0)  # type: ignore[arg-type]
    print(f"history     : {n:,} events, state of {state_frame.height:,} users, L={length}, mean history "
          f"{mean_len:.1f}; history_features {n / t_pl:,.0f} rows/s ({t_pl:.2f}s), DuckDB SQL {n / t_duck:,.0f} "
          f"rows/s ({t_duck:.2f}s); ratio {t_duck / t_pl:.2f}x")
    identical = ours.equals(theirs)
    print(f"identical: {identical}")
    assert identical, "history_features and the DuckDB SQL disagree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--length", type=int, default=50, help="history length L")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats (best is printed)")
    args = parser.parse_args()
    print(f"scale {args.scale}: {SCALES[args.scale].events_per_day:,} events/day; cpus {os.cpu_count()}, "
          f"polars threads {pl.thread_pool_size()}, duckdb {duckdb.__version__}")
    with tempfile.TemporaryDirectory(prefix="fmx-bench-") as scratch:
        lake = Lake(os.path.join(scratch, "lake"))
        bench_generator(lake, GeneratorConfig(scale=args.scale))
        bench_parquet(lake, args.repeat, scratch)
        bench_history(lake, args.length, args.repeat)


if __name__ == "__main__":
    main()
