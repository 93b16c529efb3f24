"""The `fmx` command line: one-line errors with a non-zero exit (tracebacks only with --debug), compare's
input checks and its json / csv formats."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from fmx.cli import cli


def _invoke(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(cli, list(args))
    return out.exit_code, out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fm", "export", "--ds", "notadate"), "bad window day 'notadate': expected YYYY-MM-DD"),
        (("generate", "--days", "1", "--start", "2026-02-30"), "bad day '2026-02-30'"),
        (("ingest", "--ds", "2026-01-01", "--source", "lake"), "no events for window ds=2026-01-01"),
        (("compare", "--from", "2026-13-01"), "'2026-13-01' is not a date YYYY-MM-DD"),
        (("run", "--days", "0"), "0 is not in the range x>=1"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: tuple[str, ...], message: str, lake_uri: str) -> None:
    code, output = _invoke(*args, "--lake", lake_uri) if args[0] != "compare" else _invoke(*args)
    assert code != 0 and message in output, output
    assert "Traceback" not in output


def test_debug_shows_the_traceback(lake_uri: str) -> None:
    out = CliRunner().invoke(cli, ["--debug", "fm", "export", "--ds", "notadate", "--lake", lake_uri])
    assert out.exit_code != 0 and isinstance(out.exception, ValueError)  # raised, not turned into a line


def test_compare_formats_and_unknown_surface(tiny_lake: str, tmp_path) -> None:
    import shutil

    from experts.reference import reference_eval

    lake = str(tmp_path / "lake")
    shutil.copytree(tiny_lake, lake)
    reference_eval("2026-01-02", "feed", lake)  # one evaluated run in the store: variant ref
    code, output = _invoke("compare", "--format", "json")
    rows = json.loads(output)
    assert code == 0 and [(r["surface"], r["variant"]) for r in rows] == [("feed", "ref")]
    assert 0 < rows[0]["ne"] < 2 and rows[0]["gap_closure"] is None  # NaN as null: strict JSON
    code, output = _invoke("compare", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(output)))
    assert code == 0 and table[0]["variant"] == "ref" and float(table[0]["auc"]) == pytest.approx(rows[0]["auc"])
    code, output = _invoke("compare", "--surface", "nosuch")
    assert code == 1 and "surfaces with runs: ['feed']" in output
