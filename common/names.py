"""Names every layer spells alike, declared once and light to import (no third-party import: DAG files read them
at parse time).

- `FM_PRESETS`: the FM size presets, smaller to larger (fm.config's settings per name; the ``fm=`` partition
  value of fm_outputs, loop_state, expert_examples; the transfer-ratio order of experts.evaluate).
"""

from __future__ import annotations

FM_PRESETS = ("small", "base", "large")
