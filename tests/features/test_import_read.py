"""Importer reading real files: quoting, line breaks in fields, U+2028, BOM, exact lines, ragged rows,
"::" delimiters, empty / header-only / corrupt sources (one clear line), and boolean labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from features.importers import import_source
from features.importers.mapping import SourceTable
from features.importers.read import FIELDS, LINE, RAW, read_strings
from features.lake import Lake
from fmx.cli import cli

# header, then one record per data line except the quoted line break (data lines 2-3) and a blank line 6
TRICKY = (
    "\ufeffuid,iid,ts,note\n"
    '1,10,100,"a,b"\n'
    '2,11,101,"two\nlines"\n'
    "3,12,102,x\u2028y\x0cz\n"
    "4,13\n"
    "\n"
    '5,14,104,"q""uote"\r\n'
    "6,15,105,z,extra\n"
    "7,16,106,end"
)


def test_csv_reader_quotes_line_breaks_bom_and_exact_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(TRICKY.encode())
    names, rows = read_strings(SourceTable(files=("log.csv",)), [path])
    assert names == ["uid", "iid", "ts", "note"]  # no BOM in the first name
    # LINE: the data line (header excluded) on which the record starts; the 2-line record shifts the rest
    assert rows[LINE].to_list() == [1, 2, 4, 5, 7, 8, 9]
    assert rows[FIELDS].to_list() == [4, 4, 4, 2, 4, 5, 4]
    assert rows["note"].to_list() == ["a,b", "two\nlines", "x\u2028y\x0cz", None, 'q"uote', None, "end"]
    assert rows[RAW].to_list() == [
        '1,10,100,"a,b"',
        '2,11,101,"two\nlines"',
        "3,12,102,x\u2028y\x0cz",
        "4,13",
        '5,14,104,"q""uote"',
        "6,15,105,z,extra",
        "7,16,106,end",
    ]


def test_multi_character_delimiter_and_latin1(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_bytes('1::10::Misérables::a\n2::11::"x::y"::b\n3::12\n'.encode("latin-1"))
    table = SourceTable(
        files=("ratings.dat",), delimiter="::", header=False, columns=("u", "i", "t", "g"), encoding="latin-1"
    )
    _, rows = read_strings(table, [path])
    assert rows["t"].to_list() == ["Misérables", "x::y", None]  # a quoted "::" is data
    assert rows[FIELDS].to_list() == [4, 4, 2] and rows[LINE].to_list() == [1, 2, 3]
    assert rows[RAW].to_list()[1:] == ['2::11::"x::y"::b', "3::12"]
    unquoted = read_strings(replace(table, quote=""), [path])[1]  # quote = "": quotes are data
    assert unquoted[FIELDS].to_list() == [4, 5, 2] and unquoted["t"].to_list()[0] == "Misérables"


MAPPING = """name = "shop"
window = "1d"
ts_min = "1970-01-01"
[events]
files = ["*.{ext}"]
format = "{fmt}"
[fields]
user_id = "uid"
item_id = "iid"
ts = "ts"
click = "{click}"
like = "{like}"
[surface]
constant = "app"
"""


def _mapping(tmp_path: Path, fmt: str = "csv", click: str = "clicked", like: str = "liked = true") -> Path:
    path = tmp_path / "m.toml"
    path.write_text(MAPPING.format(ext=fmt, fmt=fmt, click=click, like=like))
    return path


def _cli(source: Path, mapping: Path, lake_uri: str) -> tuple[int, str]:
    out = CliRunner().invoke(
        cli, ["import", "custom", str(source), "--mapping", str(mapping), "--lake", lake_uri]
    )
    return out.exit_code, out.output


@pytest.mark.parametrize("content", ["", "uid,iid,ts,clicked,liked\n", "\n\n"])
def test_empty_or_header_only_file_is_one_clear_line(tmp_path: Path, lake_uri: str, content: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "log.csv").write_text(content)
    code, output = _cli(src, _mapping(tmp_path), lake_uri)
    assert code != 0 and "Traceback" not in output
    assert "no rows in" in output and "log.csv" in output and len(output.strip().splitlines()) == 1


def test_a_quote_that_never_closes_is_one_clear_line(tmp_path: Path, lake_uri: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rows = "".join(f"{i},{i},{i},true,false\n" for i in range(120_000))  # > the reader's 1 MiB block
    (src / "log.csv").write_text(f'uid,iid,ts,clicked,liked\n1,"2,3,true,false\n{rows}')
    code, output = _cli(src, _mapping(tmp_path), lake_uri)
    assert code != 0 and "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert "log.csv: the CSV reader failed" in output and 'set quote = ""' in output


def test_corrupt_parquet_names_the_file(tmp_path: Path, lake_uri: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    frame = pl.DataFrame({"uid": [1, 2], "iid": [3, 4], "ts": [100, 200], "clicked": [True, False]})
    frame.with_columns(liked=pl.col("clicked")).write_parquet(src / "log.parquet")
    data = (src / "log.parquet").read_bytes()
    (src / "log.parquet").write_bytes(data[: len(data) // 2])  # truncated
    code, output = _cli(src, _mapping(tmp_path, "parquet"), lake_uri)
    assert code != 0 and "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert "log.parquet: not a readable Parquet file" in output


def test_boolean_labels_from_csv_text_and_parquet_booleans(tmp_path: Path, lake_uri: str) -> None:
    csv_src = tmp_path / "csv"
    csv_src.mkdir()
    (csv_src / "log.csv").write_text(
        "uid,iid,ts,clicked,liked\n1,10,100,True,false\n1,11,200,FALSE,TRUE\n2,10,300,true,False\n2,11,400,maybe,true\n"
    )
    result = import_source("custom", str(csv_src), lake_uri, str(_mapping(tmp_path)), max_bad_share=0.5)
    lake = Lake(lake_uri)
    events = lake.scan_many("events", lake.partitions("events")).collect().sort("ts")
    assert events["click"].to_list() == [1, 0, 1] and events["like"].to_list() == [0, 1, 0]
    bad = lake.read("quarantine", import_id=result["import_id"]).to_pylist()
    assert [(r["source_line"], r["reason"]) for r in bad] == [(4, "bad type: clicked is not a boolean")]

    pq_src = tmp_path / "pq"
    pq_src.mkdir()
    frame = pl.DataFrame({"uid": [1, 2], "iid": [3, 4], "ts": [100, 200], "clicked": [True, False]})
    frame.with_columns(liked=~pl.col("clicked")).write_parquet(pq_src / "log.parquet")
    pq_lake = str(tmp_path / "pq-lake")
    mapping = _mapping(tmp_path, "parquet", click="clicked = true", like="liked")
    assert import_source("custom", str(pq_src), pq_lake, str(mapping))["events"] == 2
    events = Lake(pq_lake).scan_many("events", Lake(pq_lake).partitions("events")).collect().sort("ts")
    assert events["click"].to_list() == [1, 0] and events["like"].to_list() == [0, 1]


def test_quoted_csv_imports_with_exact_quarantine_lines(tmp_path: Path, lake_uri: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "log.csv").write_text(
        "uid,iid,ts,clicked,liked\n"
        '1,10,100,true,"multi\nline"\n'  # data lines 1-2: bad label, reported at its first line
        "2,x,200,true,false\n"  # data line 3: bad item id
        "3,12,300,false,false\n"
    )
    result = import_source("custom", str(src), lake_uri, str(_mapping(tmp_path)), max_bad_share=0.9)
    bad = Lake(lake_uri).read("quarantine", import_id=result["import_id"]).to_pylist()
    assert [(r["source_line"], r["reason"]) for r in bad] == [
        (1, "bad type: liked is not a boolean"),
        (3, "bad type: item_id is not an integer"),
    ]
    assert bad[0]["raw"] == '1,10,100,true,"multi\nline"' and result["events"] == 1
