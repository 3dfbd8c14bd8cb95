"""kronos.io: the one writer (atomic files and folders, strict JSON, tables)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos import io as kio


def test_write_file_replaces_atomically_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    kio.write_text(target, "one")
    assert target.read_text() == "one"

    def broken(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        kio.write_file(target, broken)
    assert target.read_text() == "one"  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]  # no temp file left behind
    kio.write_bytes(target, b"two")
    assert target.read_bytes() == b"two"


def test_strict_json_nan_inf_numpy_pandas_paths(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Result:
        path: Path
        values: list

    value = {
        "nan": float("nan"),
        "inf": math.inf,
        "-inf": -math.inf,
        "np_nan": np.float32("nan"),
        "i": np.int64(3),
        "f": np.float64(0.5),
        "b": np.bool_(True),
        "arr": np.array([1.0, np.inf]),
        "ts": pd.Timestamp("2024-01-02 09:30"),
        "nat": pd.NaT,
        "dt64": np.datetime64("2024-01-03"),
        "path": Path("/x/y"),
        7: "int key",
        "set": {"b", "a"},
        "result": Result(Path("p"), [np.int32(1)]),
    }
    text = kio.dumps_json(value)
    back = json.loads(text)  # strict: the standard parser (no NaN/Infinity tokens) reads it
    assert "NaN" not in text and "Infinity" not in text and "1e+308" not in text
    assert back["nan"] is None and back["inf"] is None and back["-inf"] is None and back["np_nan"] is None
    assert back["i"] == 3 and back["f"] == 0.5 and back["b"] is True and back["arr"] == [1.0, None]
    assert back["ts"] == "2024-01-02T09:30:00" and back["nat"] is None and back["dt64"].startswith("2024-01-03")
    assert back["path"] == "/x/y" and back["7"] == "int key" and back["set"] == ["a", "b"]
    assert back["result"] == {"path": "p", "values": [1]}
    kio.write_json(tmp_path / "v.json", value)
    assert json.loads((tmp_path / "v.json").read_text()) == back
    with pytest.raises(TypeError, match="object"):
        kio.dumps_json({"x": object()})


def test_write_table_parquet_and_csv(tmp_path: Path) -> None:
    frame = pd.DataFrame({"symbol": ["a", "b"], "close": [1.5, np.nan]})
    pq = kio.write_table(frame, tmp_path / "out" / "forecast.v1")  # dots in the stem are kept
    assert pq == tmp_path / "out" / "forecast.v1.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(pq), frame)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "forecast.v1.csv"), frame)


def test_folder_swap_keeps_a_complete_version_and_carries_named_entries(tmp_path: Path) -> None:
    target = tmp_path / "data"
    kio.write_folder(target, lambda f: (f / "a.txt").write_text("1"))
    (target / "cache").mkdir()
    (target / "cache" / "raw.json").write_text("{}")

    with pytest.raises(RuntimeError):
        kio.write_folder(target, lambda f: (_ for _ in ()).throw(RuntimeError("killed")))
    assert (kio.resolve_folder(target) / "a.txt").read_text() == "1"
    assert not list(tmp_path.glob(".data.tmp-*"))

    kio.write_folder(target, lambda f: (f / "a.txt").write_text("2"), keep=["cache"])
    assert (target / "a.txt").read_text() == "2" and (target / "cache" / "raw.json").is_file()
    assert not (tmp_path / "data.prev").exists()

    kio.write_folder(target, lambda f: (f / "b.txt").write_text("3"))  # no keep: the old entries go
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    # a crash between the two renames leaves only data.prev: it is found, and the next write recovers from it
    target.rename(tmp_path / "data.prev")
    assert kio.resolve_folder(target) == tmp_path / "data.prev"
    kio.write_folder(target, lambda f: (f / "c.txt").write_text("4"))
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"] and not (tmp_path / "data.prev").exists()
    assert kio.resolve_folder(tmp_path / "missing") is None


def test_logs_name_the_final_path_never_the_temporary(tmp_path: Path, caplog) -> None:
    from kronos.model import KronosTokenizer

    assert kio.final_path(tmp_path / ".best_model.tmp-12-ab12cd34") == tmp_path / "best_model"
    assert kio.final_path(tmp_path / ".x.csv.tmp-12-ab12cd34.csv") == tmp_path / "x.csv"
    assert kio.final_path(tmp_path / ".hidden") == tmp_path / ".hidden"
    tok = KronosTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "parity-tiny" / "tiny" / "tokenizer")
    with caplog.at_level("INFO", logger="kronos"):
        kio.write_folder(tmp_path / "best_model", tok.save_pretrained)  # the trainer's way: a temporary, renamed
    assert ".tmp-" not in caplog.text and f"checkpoint to {tmp_path / 'best_model'}" in caplog.text
