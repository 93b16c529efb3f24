"""Surfaces come from the lake's meta: an FM on a lake with other surface names, and the refusal to mix."""

from __future__ import annotations

import polars as pl
import pytest

from features.history import build_user_history
from features.lake import Lake
from features.schemas import EVENTS, SURFACE
from features.windows import Window
from fm import checkpoint
from fm.config import FMConfig
from fm.stage import fm_export, fm_train
from tests.fm.conftest import TINY, make_lake


def _renamed_lake(source_uri: str, uri: str, windows: list[Window], names: dict[str, str]) -> Lake:
    """Events of the generator lake with surfaces renamed by `names` (others dropped), via Lake.write."""
    src, lake = Lake(source_uri), Lake(uri)
    lake.update_meta(window_days=1, surfaces=list(names.values()), source="test", origin=windows[0].ds)
    for w in windows:
        events = src.scan_many(EVENTS.name, src.partitions(EVENTS.name, ds=w.ds)).collect()
        for old, new in names.items():
            part = events.filter(pl.col(SURFACE) == old).with_columns(pl.lit(new).alias(SURFACE))
            lake.write(EVENTS.name, part, ds=w.ds, surface=new)
        build_user_history(lake, w)
    return lake


def test_fm_takes_surfaces_from_lake_and_refuses_others(tmp_path, lake_uri: str, monkeypatch) -> None:
    windows = make_lake(lake_uri, 2, events_per_day=300)
    monkeypatch.setattr(FMConfig, "from_preset", classmethod(lambda cls, name="small", **o: cls(
        preset=name, **{**TINY, **o})))  # tiny sizes for the stage wrappers, which take only a preset name
    ab = _renamed_lake(lake_uri, str(tmp_path / "ab"), windows, {"feed": "a", "search": "b"})
    trained = fm_train(windows[0].ds, ab.uri)
    state = checkpoint.load(ab, "small", windows[0].ds, "final")
    assert state is not None
    assert tuple(state["cfg"]["surfaces"]) == ("a", "b")
    exported = fm_export(windows[1].ds, ab.uri)
    assert exported["fm_version"] == trained["fm_version"] and set(exported["metrics"]) == {"a", "b"}
    # the same FM directory on a lake whose meta names other surfaces: warm start and export refuse
    ab.update_meta(surfaces=["a", "c"])
    with pytest.raises(ValueError, match=r"surface heads \['a', 'b'\] but the lake's surfaces are \['a', 'c'\]"):
        fm_train(windows[1].ds, ab.uri)
    with pytest.raises(ValueError, match="surface heads"):
        fm_export(windows[1].ds, ab.uri)
