"""Real logs through the front door: `fmx import` then `fmx run` (the real DAGs), and a REST trigger.

- MovieLens-100K (1997-98, weekly windows, genre surfaces): imported, then `fmx run --lake L --days 6`
  with every variant; every (surface, variant) result and the FM's are read back from MLflow. Then a
  real `fmx up` serves the same lake: fmx_experts triggered through the REST API with
  surfaces ["comedy"] retrains only comedy's experts of window 6; an unknown surface fails at `plan`
  with the lake's surfaces listed; an unsafe name is refused by the Param (HTTP 400).
- tests/fixtures/tsv2022: a tab-separated log of 2022 (text timestamps, tab codes mapped to surfaces,
  quoted fields) imported with a user-written mapping file and run through `fmx run`.

Marked e2e (CI runs them); MovieLens comes from ../shared/data and the tests skip where it is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from features.lake import Lake
from features.stage import lake_windows
from tests.conftest import require_ml100k
from tests.e2e.conftest import EXPERTS_DAG, fmx, running_servers, task_log_tails, wait_success

pytestmark = pytest.mark.e2e

VARIANTS = ("base", "loopfm", "kd", "fe", "loopfm_kd")
GENRES = ("action", "comedy", "drama", "family", "thriller")
TSV2022 = Path(__file__).resolve().parents[1] / "fixtures" / "tsv2022"
ML_DAYS = 6


def _compare(home: Path, monkeypatch: pytest.MonkeyPatch, **selection: str) -> list[dict]:
    """`fmx compare`'s rows, read from the MLflow store under `home`."""
    from experts.compare import compare_rows

    monkeypatch.setenv("FMX_HOME", str(home))
    return compare_rows(**selection)


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(FMX_HOME, lake, stdout of `fmx run`) after importing ML-100K and running its first 6 windows."""
    source = require_ml100k()
    home = tmp_path_factory.mktemp("movielens")
    lake = str(home / "lake")
    fmx("import", "movielens", str(source), "--lake", lake, home=home)
    out = fmx("run", "--lake", lake, "--days", str(ML_DAYS), "--no-retries", home=home, timeout=2400)
    return home, lake, out.stdout


def test_movielens_runs_through_the_dags_with_every_variant(
    movielens: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, lake, stdout = movielens
    windows = lake_windows(lake)[:ML_DAYS]
    assert windows[0] == "1997-09-20" and all(f"== day {ds}" in stdout for ds in windows)
    rows = _compare(home, monkeypatch, ds_from=windows[0], ds_to=windows[-1])
    found = {(r["surface"], r["variant"]): r for r in rows if r["fm_preset"] == "small"}
    # window 1: no FM yet; window 2: first experts (cold); windows 3..6 scored progressively
    for surface in GENRES:
        for variant in (*VARIANTS, "fm", "ref"):
            row = found.get((surface, variant))
            assert row is not None, f"no MLflow result for {surface}/{variant}: {sorted(found)}"
            assert row["days"] >= ML_DAYS - 2 - (variant != "fm"), row
            assert math.isfinite(row["ne"]) and 0.5 < row["auc"] <= 1.0, row
    for ds in windows[1:]:
        assert {p["surface"] for p in Lake(lake).partitions("fm_outputs", fm="small", ds=ds)} == set(GENRES)


def test_movielens_experts_triggered_through_rest_for_one_surface(
    movielens: tuple[Path, str, str], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from fmx.servers.airflow_api import AirflowAPIError

    _, lake, _ = movielens
    ds = lake_windows(lake)[ML_DAYS - 1]
    conf = {"ds": ds, "lake_uri": lake, "source": "lake", "surfaces": ["comedy"], "variants": list(VARIANTS)}
    with running_servers(tmp_path / "home") as srv:
        srv.api.wait_for_dag(EXPERTS_DAG, timeout=180)
        srv.api.unpause(EXPERTS_DAG)
        run_id = srv.api.trigger(EXPERTS_DAG, conf)
        wait_success(srv, EXPERTS_DAG, run_id)
        trained = {k for k in srv.api.task_states(EXPERTS_DAG, run_id) if k.startswith("expert_train")}
        assert len(trained) == len(VARIANTS), trained  # comedy's five variants, nothing else

        client = MlflowClient(tracking_uri=srv.state.mlflow_url)
        experiment = client.get_experiment_by_name("fmx")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], f"tags.ds = '{ds}'", max_results=1000)
        variants = {r.data.tags.get("variant") for r in runs if r.data.tags.get("surface") == "comedy"}
        assert variants >= set(VARIANTS)
        assert {r.data.tags.get("surface") for r in runs} - {None, "all"} == {"comedy"}

        bad = srv.api.trigger(EXPERTS_DAG, {**conf, "surfaces": ["nosuch"]})
        assert srv.api.wait_run(EXPERTS_DAG, bad, timeout=300) == "failed"
        assert "valid surfaces: ['action', 'comedy', 'drama', 'family', 'thriller']" in task_log_tails(
            srv.home, EXPERTS_DAG, bad
        )
        with pytest.raises(AirflowAPIError) as refused:
            srv.api.trigger(EXPERTS_DAG, {**conf, "surfaces": ["../etc"]})
        assert refused.value.status == 400 and "surfaces" in refused.value.body


def test_tab_separated_2022_log_with_own_mapping_runs_through_fmx_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, lake = tmp_path / "home", str(tmp_path / "lake")
    out = fmx("import", "custom", str(TSV2022 / "log.tsv"), "--mapping", str(TSV2022 / "mapping.toml"),
              "--lake", lake, home=home)  # fmt: skip
    assert '"first_ds": "2022-03-01"' in out.stdout and '"quarantined": 0' in out.stdout
    assert lake_windows(lake) == ["2022-03-01", "2022-03-02", "2022-03-03", "2022-03-04"]
    run = fmx("run", "--lake", lake, "--days", "4", "--variants", "base", "--variants", "kd",
              "--no-retries", home=home, timeout=1200)  # fmt: skip
    assert "== day 2022-03-04" in run.stdout
    rows = _compare(home, monkeypatch, ds_from="2022-03-01", ds_to="2022-03-04")
    found = {(r["surface"], r["variant"]) for r in rows}
    assert found >= {(s, v) for s in ("home", "search", "shorts") for v in ("base", "kd", "fm", "ref")}, found
