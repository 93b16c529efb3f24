"""Nothing executes from the lake or the registry (issue 11): a crafted pickle in place of an expert or FM
checkpoint is refused on every load path without running, registry tags naming a checkpoint cannot leave
the lake, and a truncated checkpoint fails in one line naming the file."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experts.checkpoint import ckpt_relpath, load_checkpoint, trusted_ckpt_relpath
from experts.stage import compare_and_promote, expert_examples, expert_train
from features.lake import CorruptFile, Lake, UnsafeLake
from fm import checkpoint as fm_checkpoint
from tests.experts.synth import make_lake


class _Payload:
    """Unpickling this runs `touch marker` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"config": _Payload(marker), "model": {}}, buf)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Guards the tests below: the payload does create the marker when loaded the old way."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_evil_bytes(marker)), weights_only=False)
    assert marker.exists()


def test_a_crafted_expert_checkpoint_is_refused_on_warm_start(lake_uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    lake, ws = make_lake(lake_uri, days=3)
    for w in ws[1:]:
        expert_examples(w.ds, "feed", lake_uri)
    expert_train(ws[1].ds, "feed", "base", lake_uri, "small", pipeline_run="t")  # cold start, saves ds=1
    rel = ckpt_relpath("small", "feed", "base", ws[1].ds)
    assert load_checkpoint(lake, rel).trained_through == ws[1].ds  # a real checkpoint loads weights-only
    lake.write_bytes(rel, _evil_bytes(marker))  # someone with write access to the lake swaps it
    with pytest.raises(CorruptFile, match="not a weights-only checkpoint"):
        expert_train(ws[2].ds, "feed", "base", lake_uri, "small", pipeline_run="t")  # warm start + progressive eval
    with pytest.raises(CorruptFile):
        compare_and_promote(ws[2].ds, "feed", lake_uri, "small", pipeline_run="t")  # scores every variant
    assert not marker.exists()


def test_a_registry_tag_cannot_point_outside_the_lake_or_at_an_uploaded_payload(
    lake_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe: an anonymous client set the champion's `checkpoint` tag to a file it uploaded."""
    import experts.registry

    marker = tmp_path / "pwned"
    lake, ws = make_lake(lake_uri, days=3)
    for ds in (ws[1].ds, ws[2].ds):
        expert_examples(ds, "feed", lake_uri)
        expert_train(ds, "feed", "base", lake_uri, "small", pipeline_run="t")
    uploaded = tmp_path / "mlartifacts" / "evil.pt"
    uploaded.parent.mkdir()
    uploaded.write_bytes(_evil_bytes(marker))
    for tag, error in ((os.path.relpath(uploaded, lake_uri), UnsafeLake), (str(uploaded), UnsafeLake),
                       ("file://" + str(uploaded), UnsafeLake), ("models/fm/small/x.pt", UnsafeLake)):
        fake = SimpleNamespace(tags={"variant": "base", "checkpoint": tag, "trained_through": ws[0].ds}, version="1")
        monkeypatch.setattr(experts.registry, "champion", lambda surface, preset, fake=fake: fake)
        with pytest.raises(error):
            compare_and_promote(ws[2].ds, "feed", lake_uri, "small", pipeline_run="t")
    # a payload uploaded INTO the lake at a checkpoint-shaped path is refused by the weights-only load (a
    # champion of a variant no longer trained is scored from its recorded checkpoint)
    rel = ckpt_relpath("small", "feed", "kd", ws[0].ds)
    lake.write_bytes(rel, _evil_bytes(marker))
    fake = SimpleNamespace(tags={"variant": "kd", "checkpoint": rel, "trained_through": ws[0].ds}, version="1")
    monkeypatch.setattr(experts.registry, "champion", lambda surface, preset: fake)
    with pytest.raises(CorruptFile):
        compare_and_promote(ws[2].ds, "feed", lake_uri, "small", pipeline_run="t")
    assert not marker.exists()


def test_trusted_ckpt_relpath() -> None:
    good = "models/experts/small/feed/kd/ds=2026-01-02/expert.pt"
    assert trusted_ckpt_relpath(good, "small", "feed") == good
    for bad in ("models/experts/small/feed/kd/ds=2026-01-02/../../../../fm/x.pt", "/abs/expert.pt",
                "models/experts/large/feed/kd/ds=2026-01-02/expert.pt", "models/experts/small/feed/kd/x/expert.pt",
                "s3://b/models/experts/small/feed/kd/ds=2026-01-02/expert.pt"):
        with pytest.raises(UnsafeLake):
            trusted_ckpt_relpath(bad, "small", "feed")


def test_truncated_and_crafted_checkpoints_fail_in_one_line_naming_the_file(lake_uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    lake = Lake(lake_uri)
    fm_checkpoint.save(lake, "small", "2026-01-01", "final", {"model": {"w": torch.ones(1000)}, "step": 1})
    rel = fm_checkpoint.relpath("small", "2026-01-01", "final")
    raw = lake.read_bytes(rel)
    lake.write_bytes(rel, raw[: len(raw) // 2])
    with pytest.raises(CorruptFile) as err:
        fm_checkpoint.load(lake, "small", "2026-01-01", "final")
    assert lake.path(rel) in str(err.value) and "\n" not in str(err.value)
    lake.write_bytes(rel, _evil_bytes(marker))
    with pytest.raises(CorruptFile):
        fm_checkpoint.load(lake, "small", "2026-01-01", "final")
    erel = ckpt_relpath("small", "feed", "base", "2026-01-01")
    lake.write_bytes(erel, raw[:100])
    with pytest.raises(CorruptFile, match="truncated") as err:
        load_checkpoint(lake, erel)
    assert lake.path(erel) in str(err.value)
    assert not marker.exists()
