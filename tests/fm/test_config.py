"""The FM presets: fm.config's settings cover exactly common.names.FM_PRESETS, the one list of their names."""

from __future__ import annotations

import pytest

from common.names import FM_PRESETS
from fm.config import _PRESETS, FMConfig


def test_the_settings_name_exactly_the_declared_presets_in_order() -> None:
    assert tuple(_PRESETS) == FM_PRESETS
    assert [FMConfig.from_preset(name).preset for name in FM_PRESETS] == list(FM_PRESETS)


def test_an_unknown_preset_names_the_declared_ones() -> None:
    with pytest.raises(ValueError, match="huge.*'small', 'base', 'large'"):
        FMConfig.from_preset("huge")
