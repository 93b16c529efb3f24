"""Bounded-memory reading of expert_examples (issue 12): streamed statistics, training order and scores
against the whole partition in memory."""

from __future__ import annotations

import gc
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from experts.config import ExpertConfig
from experts.data import ExpertSource, concat, load_examples, standardize, to_tensors
from experts.evaluate import fm_probs, predict
from experts.promotion import score
from experts.stream import fitting, serving_logits, shuffled_batches
from experts.train import new_checkpoint, train_window
from features.expert_examples import build_expert_examples
from features.lake import DATA_FILE, Lake, SchemaError
from features.windows import Window
from tests.experts.synth import make_lake

TINY = 64  # rows per read and per shuffle buffer: the partitions below hold ~10 of each


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture()
def lake_days(lake_uri: str) -> tuple[Lake, list[Window]]:
    lake, ws = make_lake(lake_uri, days=3, rows=700)
    for w in ws[1:]:  # several row groups per partition
        build_expert_examples(lake, w, "feed", "small", chunk_rows=200)
    return lake, ws


def _source(lake: Lake, w: Window, rows: int | None = None) -> ExpertSource:
    sizes = {} if rows is None else {"buffer_rows": rows, "read_rows": rows}
    return ExpertSource(lake, "small", w.ds, "feed", 20, **sizes)


def test_streamed_standardisation_equals_the_whole_partitions(lake_days: tuple[Lake, list[Window]]) -> None:
    lake, ws = lake_days
    whole = load_examples(lake, "small", ws[1].ds, "feed", 20)
    tiny = _source(lake, ws[1], TINY)
    assert len(tiny.group_rows) > 2 and len(tiny) == len(whole) > 5 * TINY
    assert tiny.cache is not None and os.path.exists(tiny.cache.path)  # larger than its buffer: converted once
    streamed = concat(tiny.chunks(), len(tiny))
    for key in ("tae", "loop_repr"):
        np.testing.assert_allclose(streamed.tensors[key], whole.tensors[key], atol=1e-5, rtol=0)
    for key in ("cats", "loop_mask", "loop_click", "fm_logit", "counters"):
        assert torch.equal(streamed.tensors[key], whole.tensors[key]), key
    assert torch.equal(tiny.label, whole.label) and tiny.fm_versions == whole.fm_versions
    # the cache (raw tensors, standardised as they are read) round-trips exactly
    table = lake.read("expert_examples", fm="small", ds=ws[1].ds, surface="feed")
    direct = to_tensors(table, 20, tiny.stats)
    assert all(torch.equal(streamed.tensors[k], direct.tensors[k]) for k in direct.tensors)
    raw = lake.read("expert_examples", columns=["fm_tae"], fm="small", ds=ws[1].ds, surface="feed")["fm_tae"]
    reference = standardize(np.stack(raw.to_numpy(zero_copy_only=False)).astype(np.float32))
    np.testing.assert_allclose(streamed.tensors["tae"].numpy(), reference, atol=1e-5, rtol=0)
    # within the buffer: the statistics and every tensor exactly as the whole partition's
    exact = _source(lake, ws[1])
    assert exact.cache is None and all(torch.equal(exact.whole().tensors[k], whole.tensors[k]) for k in whole.tensors)
    path = tiny.cache.path
    del tiny
    gc.collect()
    assert not os.path.exists(os.path.dirname(path))  # the cache goes with its source


def test_the_history_is_the_fms_int8_codes_times_their_scales(lake_days: tuple[Lake, list[Window]]) -> None:
    """expert_examples keeps the FM's history compressed; the expert's float32 input is code * scale, then
    standardised over the real entries (padding stays 0)."""
    lake, ws = lake_days
    table = lake.read("expert_examples", fm="small", ds=ws[1].ds, surface="feed")
    code_type = table.schema.field("loop_hist_code").type.value_type
    assert code_type.value_type == pa.int8()
    codes = table["loop_hist_code"].to_pylist()
    scales = table["loop_hist_scale"].to_pylist()
    entries = np.concatenate([np.asarray(c, np.float32).reshape(-1, code_type.list_size) * np.asarray(s, np.float32)[:, None]
                              for c, s in zip(codes, scales, strict=True) if c])
    data = to_tensors(table, 20)
    assert "loop_code" not in data.tensors and len(entries) == int(data.tensors["loop_mask"].sum())
    want = standardize(entries)
    first = next(i for i, c in enumerate(codes) if len(c) >= 2)  # a row with two real entries, oldest first
    got = data.tensors["loop_repr"][first]
    np.testing.assert_array_equal(got[:len(codes[first])], want[sum(map(len, codes[:first])):][:len(codes[first])])
    assert not got[len(codes[first]):].any()


def test_a_partition_of_the_float32_history_schema_names_the_command_that_rebuilds_it(
        lake_days: tuple[Lake, list[Window]]) -> None:
    lake, ws = lake_days
    path = f"{lake.partition_dir('expert_examples', fm='small', ds=ws[1].ds, surface='feed')}/{DATA_FILE}"
    table = pq.read_table(path)
    width = table.schema.field("loop_hist_code").type.value_type.list_size
    old = table.drop_columns(["loop_hist_code", "loop_hist_scale"]).append_column(
        "loop_hist_repr", table["loop_hist_code"].cast(pa.list_(pa.list_(pa.float32(), width))))
    pq.write_table(old, path)
    with pytest.raises(SchemaError, match=r"loop_hist_code.*rebuild it with `fmx experts examples --ds "
                                          rf"{ws[1].ds} --surface feed --preset small`"):
        _source(lake, ws[1])
    build_expert_examples(lake, ws[1], "feed", "small")
    assert len(_source(lake, ws[1])) == table.num_rows


def test_a_partition_within_the_buffer_trains_exactly_as_in_memory(lake_days: tuple[Lake, list[Window]]) -> None:
    lake, ws = lake_days
    whole, source = load_examples(lake, "small", ws[1].ds, "feed", 20), _source(lake, ws[1])
    lineage = [(ws[1].ds, whole.fm_versions[0])]
    cfg = ExpertConfig(variant="loopfm")
    a, loss_a = train_window(new_checkpoint(cfg, whole, "small", "feed"), whole, ws[1], lineage, fm_gate=1.0)
    b, loss_b = train_window(new_checkpoint(cfg, source, "small", "feed"), source, ws[1], lineage, fm_gate=1.0)
    assert loss_a == loss_b and a.calib_bias == b.calib_bias
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_streamed_training_order_is_bounded_complete_and_deterministic(lake_days: tuple[Lake, list[Window]]) -> None:
    lake, ws = lake_days
    source = _source(lake, ws[1], TINY)

    def order(seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return list(shuffled_batches(source, torch.Generator().manual_seed(seed), 16, TINY))

    first, again, other = order(1), order(1), order(2)
    logits = torch.cat([b["fm_logit"] for b, _ in first])
    assert all(len(lab) == 16 for _, lab in first[:-1]) and len(logits) == len(source)
    assert torch.equal(logits.sort().values, concat(source.chunks(), len(source)).tensors["fm_logit"].sort().values)
    assert all(torch.equal(x["fm_logit"], y["fm_logit"]) for (x, _), (y, _) in zip(first, again, strict=True))
    assert not torch.equal(logits, torch.cat([b["fm_logit"] for b, _ in other]))
    cfg = ExpertConfig(shuffle_rows=TINY, batch_size=16)
    lineage = [(ws[1].ds, source.fm_versions[0])]
    runs = [train_window(new_checkpoint(cfg, source, "small", "feed"), source, ws[1], lineage)[0] for _ in range(2)]
    assert all(torch.equal(runs[0].model[k], runs[1].model[k]) for k in runs[0].model)
    reseeded, _ = train_window(new_checkpoint(cfg.with_overrides(seed=5), source, "small", "feed"), source, ws[1],
                               lineage)
    assert not torch.equal(reseeded.model["head.weight"], runs[0].model["head.weight"])


def test_streamed_scores_equal_the_in_memory_scores(lake_days: tuple[Lake, list[Window]]) -> None:
    lake, ws = lake_days
    day1, whole2 = load_examples(lake, "small", ws[1].ds, "feed", 20), load_examples(lake, "small", ws[2].ds, "feed", 20)
    ckpt, _ = train_window(new_checkpoint(ExpertConfig(variant="fe"), day1, "small", "feed"), day1, ws[1],
                           [(ws[1].ds, day1.fm_versions[0])], fm_gate=1.0)
    expected = predict(ckpt.build(), whole2)
    # within the buffer the stages read the partition whole (fitting): exactly today's scores; streamed, the
    # chunks are other predict batches and the statistics float64 sums: equal to float32 rounding
    whole_read = fitting(_source(lake, ws[2]), ExpertConfig().shuffle_rows)
    for source, tol in ((whole_read, 0.0), (_source(lake, ws[2], TINY), 1e-6)):
        probs, fm = score({"fe": (ckpt, "expert feed/fe")}, source, ws[2])
        np.testing.assert_allclose(probs["fe"], expected, atol=tol, rtol=0)
        np.testing.assert_allclose(fm, fm_probs(whole2), atol=tol, rtol=0)  # sigmoid: vector body vs scalar tail
        np.testing.assert_allclose(serving_logits(ckpt.build(), source), serving_logits(ckpt.build(), whole2),
                                   atol=10 * tol, rtol=0)
    with pytest.raises(ValueError, match="leakage guard"):
        score({"fe": (ckpt, "expert feed/fe")}, _source(lake, ws[1]), ws[1])
