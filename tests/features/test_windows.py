from datetime import date

import pytest

from features.windows import Window, assert_after, parse_window_length, window_series


def test_window_arithmetic() -> None:
    w = Window(date(2026, 1, 8), 7)
    assert w.ds == "2026-01-08" and w.end == date(2026, 1, 15)
    assert w.prev() == Window(date(2026, 1, 1), 7) and w.next().start == date(2026, 1, 15)
    assert w.index(date(2026, 1, 1)) == 1
    assert [x.ds for x in window_series(date(2026, 1, 1), 3)] == ["2026-01-01", "2026-01-02", "2026-01-03"]


@pytest.mark.parametrize("text, days", [("1d", 1), ("7d", 7), ("7", 7), (3, 3)])
def test_parse_window_length(text: str | int, days: int) -> None:
    assert parse_window_length(text) == days


@pytest.mark.parametrize("bad", ["0d", "week", "-1d", ""])
def test_parse_window_length_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="bad window length"):
        parse_window_length(bad)


def test_bad_ds_is_rejected() -> None:
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        Window.parse("2026-13-01")


def test_leakage_guard() -> None:
    d = Window.parse("2026-01-05")
    assert_after(d.prev(), d, "FM")  # trained through D-1: fine
    assert_after(None, d, "FM")  # no model yet: fine
    for trained in (d, d.next()):
        with pytest.raises(ValueError, match="leakage guard"):
            assert_after(trained, d, "FM")


def test_lake_window_takes_the_lakes_window_length(lake_uri: str) -> None:
    from features.lake import Lake

    lake = Lake(lake_uri)
    assert lake.window("2026-01-08") == Window(date(2026, 1, 8), 1)  # a new lake: 1-day windows
    lake.update_meta(window_days=7)
    assert lake.window("2026-01-08") == Window(date(2026, 1, 8), 7)
