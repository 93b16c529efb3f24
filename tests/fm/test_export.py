"""Export: first-window skip, schema, one row per event, int8 bound, embeddings, leakage guard."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pytest
from sklearn.metrics import roc_auc_score

from features.lake import Lake
from features.schemas import FM_OUTPUTS, ITEM_EMBEDDINGS, USER_EMBEDDINGS
from fm.export import export_fm
from fm.train import train_fm
from tests.fm.conftest import make_lake, tiny_cfg


def test_export_contract(lake_uri: str) -> None:
    w1, w2 = make_lake(lake_uri, 2, events_per_day=400)
    lake, cfg = Lake(lake_uri), tiny_cfg()
    first = export_fm(cfg, w1, lake)
    assert first.fm_version is None and "first window" in (first.skipped or "")
    assert not lake.partitions(FM_OUTPUTS.name)
    v1 = train_fm(cfg, w1, lake)
    res = export_fm(cfg, w2, lake)
    assert res.fm_version == v1 and res.trained_through == w1.ds
    events = lake.scan_many("events", lake.partitions("events", ds=w2.ds)).collect()
    like_checked = []
    for surface, n in res.rows.items():
        out = lake.read(FM_OUTPUTS.name, fm="small", ds=w2.ds, surface=surface)  # schema-checked read
        assert out.column_names == FM_OUTPUTS.columns
        assert set(pc.unique(out["fm_version"]).to_pylist()) == {v1}
        assert out["fm_repr"].type.list_size == cfg.repr_width and out["fm_tae"].type.list_size == cfg.mlp[-1]
        mine = events.filter(events["surface"] == surface)["event_id"].sort().to_list()
        assert out["event_id"].to_pylist() == mine and n == len(mine)  # one row per event, no duplicates
        scale = out["fm_repr_scale"].to_numpy()
        assert (scale > 0).all() and (scale <= 1 / 127 + 1e-7).all()  # tanh codes: |x| < 1
        likes = events.filter(pl.col("surface") == surface).sort("event_id")["like"].to_numpy()
        if len(np.unique(likes)) == 2:  # the like head's progressive AUC against sklearn on the same rows
            want = roc_auc_score(likes, out["fm_logit_like"].to_numpy())
            assert res.metrics[surface]["like_auc"] == pytest.approx(want, abs=1e-9)
            like_checked.append(surface)
    assert like_checked, "no surface had both liked and unliked events"
    assert sum(res.rows.values()) == events.height
    # dequantised codes are within half a step of the codes: measured on the whole window
    assert res.compression["int8_max_abs_err"] <= 0.5 / 127 + 1e-6
    assert np.isfinite(res.compression["ae_rel_mse"])
    keys = {"auc", "logloss", "ne", "calibration"}
    assert set(res.metrics) == set(res.rows) and all(set(m) == keys | {f"like_{k}" for k in keys}
                                                     for m in res.metrics.values())
    users = lake.read(USER_EMBEDDINGS.name, fm="small", ds=w2.ds)
    items = lake.read(ITEM_EMBEDDINGS.name, fm="small", ds=w2.ds)
    assert users.num_rows == lake.read("users", ds=w1.ds).num_rows and items.num_rows > 0
    assert users["vector"].type.list_size == cfg.dim


def test_leakage_guard_refuses_fm_trained_on_the_scored_window(lake_uri: str) -> None:
    w1, w2 = make_lake(lake_uri, 2, events_per_day=300)
    lake, cfg = Lake(lake_uri), tiny_cfg()
    train_fm(cfg, w1, lake)
    train_fm(cfg, w2, lake)
    with pytest.raises(ValueError, match="leakage guard"):
        export_fm(cfg, w2, lake, trained_through=w2)
    with pytest.raises(ValueError, match="leakage guard"):
        export_fm(cfg, w1, lake, trained_through=w2)
    with pytest.raises(FileNotFoundError, match="no FM"):
        export_fm(cfg, w2.next(), lake, trained_through=w2.next())
