"""kronos.io: the one writer (atomic files and folders, strict JSON, tables)."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import platform
import signal
import sys
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


# ---------------------------------------------------------------------------------------------- folder swaps
def _content(folder: Path) -> str:
    return (folder / "v.txt").read_text()


def _write_v(target: Path, version: str, **keep) -> Path:
    return kio.write_folder(target, lambda f: (f / "v.txt").write_text(version), **keep)


def test_swap_by_exchange_leaves_a_real_folder_and_nothing_beside_it(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = kio._exchange
    monkeypatch.setattr(kio, "_exchange", lambda a, b: calls.append(b) or real(a, b))
    target = tmp_path / "best_model"
    _write_v(target, "1")
    (target / "cache").mkdir()
    (target / "cache" / "raw.json").write_text("{}")
    _write_v(target, "2", keep=["cache"])
    assert calls == [target]  # the rewrite was one exchange
    assert target.is_dir() and not target.is_symlink() and _content(target) == "2"
    assert (target / "cache" / "raw.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


@pytest.mark.parametrize("how", ["switch", "einval", "no-symbol"])
def test_without_exchange_the_path_is_a_link_flipped_to_a_new_version(tmp_path: Path, monkeypatch, how) -> None:
    import ctypes
    import errno

    monkeypatch.setattr(kio, "_exchange_works", {})
    if how == "switch":
        monkeypatch.setattr(kio, "EXCHANGE", False)
    elif how == "einval":  # a filesystem that refuses RENAME_EXCHANGE

        def refuse(*args):
            ctypes.set_errno(errno.EINVAL)
            return -1

        monkeypatch.setattr(kio, "_renameat2_fn", refuse)
    else:  # no renameat2 at all (non-Linux, an old libc on an unknown machine)
        monkeypatch.setattr(kio, "_renameat2_fn", False)
    target = tmp_path / "data"
    _write_v(target, "1")
    assert target.is_symlink() and _content(target) == "1"  # a link from the first write: later swaps need it
    (target / "cache").mkdir()
    (target / "cache" / "raw.json").write_text("{}")
    first = os.readlink(target)
    _write_v(target, "2", keep_others=True)
    assert target.is_symlink() and os.readlink(target) != first and _content(target) == "2"
    assert (target / "cache" / "raw.json").is_file() and kio.resolve_folder(target) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", os.readlink(target)])  # old version gone
    assert os.readlink(target).startswith(".data.v-2-")
    _write_v(target, "3")
    assert sorted(p.name for p in (tmp_path / os.readlink(target)).iterdir()) == ["v.txt"]  # no keep: dropped


def test_a_real_folder_becomes_a_link_once_where_exchange_is_refused(tmp_path: Path, monkeypatch, caplog) -> None:
    target = tmp_path / "dataset"
    _write_v(target, "1")
    (target / "raw").mkdir()
    (target / "raw" / "bars.txt").write_text("cached")
    monkeypatch.setattr(kio, "EXCHANGE", False)
    with caplog.at_level("WARNING", logger="kronos.io"):
        _write_v(target, "2", keep_others=True)
    assert "cannot exchange folders atomically" in caplog.text
    assert target.is_symlink() and _content(target) == "2" and (target / "raw" / "bars.txt").read_text() == "cached"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dataset", os.readlink(target)])


def test_a_link_the_user_made_is_followed_not_replaced(tmp_path: Path) -> None:
    elsewhere = tmp_path / "big_disk" / "dataset"
    _write_v(elsewhere, "1")
    link = tmp_path / "dataset"
    link.symlink_to(elsewhere, target_is_directory=True)
    assert _write_v(link, "2") == link
    assert link.is_symlink() and os.readlink(link) == str(elsewhere) and _content(elsewhere) == "2"
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["dataset"]


def test_a_folder_left_at_prev_by_an_older_version_is_moved_back_with_a_log_line(tmp_path: Path, caplog) -> None:
    target = tmp_path / "best_model"
    _write_v(target, "1")
    target.rename(tmp_path / "best_model.prev")  # what a kill between the old code's two renames left
    with caplog.at_level("WARNING", logger="kronos.io"):
        assert kio.heal_folder(target) == target
    assert _content(target) == "1" and not (tmp_path / "best_model.prev").exists()
    assert "best_model was missing" in caplog.text and "moved its complete previous version" in caplog.text
    caplog.clear()
    assert kio.heal_folder(target) == target and caplog.text == ""  # nothing to heal: silent
    assert kio.heal_folder(tmp_path / "missing") is None
    target.rename(tmp_path / "best_model.prev")
    with caplog.at_level("WARNING", logger="kronos.io"):
        _write_v(target, "2")  # the writer heals first, and says so
    assert "moved its complete previous version" in caplog.text and _content(target) == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


def _killed_write(target: Path, version: str, kill_after: int, exchange: bool) -> bool:
    """Write ``version`` in a forked child killed after its ``kill_after``-th rename; True when it was killed."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.environ[kio.KILL_ENV] = str(kill_after)
            kio._renames = 0
            kio.EXCHANGE = exchange
            _write_v(target, version, keep=["cache"])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the writer child failed"
    return False


@pytest.mark.parametrize("mode", ["exchange", "link", "convert"])
def test_a_kill_after_any_rename_keeps_the_path_complete_and_the_kept_entries(
    tmp_path: Path, monkeypatch, mode
) -> None:
    """exchange: the Linux swap; link: the fallback on a path that is already a link; convert: the fallback meeting
    a real folder, whose one window (the path missing, the folder at .prev) the next command heals."""
    from kronos.runlock import clean_stale_temporaries

    exchange = mode == "exchange"
    for n in range(1, 20):
        root = tmp_path / str(n)
        target = root / "data"
        monkeypatch.setattr(kio, "EXCHANGE", mode != "link")
        _write_v(target, "1")
        (target / "cache").mkdir()
        (target / "cache" / "raw.json").write_text("kept")
        monkeypatch.setattr(kio, "EXCHANGE", exchange)
        killed = _killed_write(target, "2", n, exchange)
        if mode == "convert" and not target.exists():  # killed inside the one window of a conversion
            assert (root / "data.prev").is_dir() and _content(kio.resolve_folder(target)) == "1"
        else:
            assert target.is_dir() and _content(target) in ("1", "2"), n  # the path itself, complete
        assert _content(kio.resolve_folder(target)) in ("1", "2")
        clean_stale_temporaries(root, "data")  # the next run's lock cleans up first: never the kept entries
        _write_v(target, "3", keep=["cache"])  # the next write settles what the killed one left
        assert _content(target) == "3" and (target / "cache" / "raw.json").read_text() == "kept", n
        expected = ["data"] if exchange else sorted(["data", os.readlink(target)])
        assert sorted(p.name for p in root.iterdir()) == expected, n
        if not killed:  # fewer than n renames in the whole write: every one has been interrupted once
            break
    else:
        pytest.fail("the writer was still being killed after 19 renames")
    # renames of one write: exchange, carry-over; link: new version, link, carry-over; convert: new version, old
    # folder to .prev, link, carry-over
    assert n - 1 == {"exchange": 2, "link": 3, "convert": 4}[mode]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine().lower() not in kio._RENAMEAT2_SYSCALL,
    reason="the renameat2 system-call stand-in is for Linux machines in its table",
)
def test_the_system_call_stand_in_exchanges_like_libc(tmp_path: Path) -> None:
    import ctypes

    call = kio._syscall_renameat2(ctypes.CDLL(None, use_errno=True), kio._RENAMEAT2_SYSCALL[platform.machine().lower()])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from_a").write_text("")
    (tmp_path / "b").mkdir()
    a, b = os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "b")
    assert call(kio._AT_FDCWD, a, kio._AT_FDCWD, b, kio._RENAME_EXCHANGE) == 0
    assert (tmp_path / "b" / "from_a").is_file() and not (tmp_path / "a" / "from_a").exists()
    assert call(kio._AT_FDCWD, a + b"-missing", kio._AT_FDCWD, b, kio._RENAME_EXCHANGE) == -1
    assert ctypes.get_errno() == errno.ENOENT


def test_without_exchange_or_links_two_renames_still_swap_and_keep_entries(tmp_path: Path, monkeypatch) -> None:
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kio, "EXCHANGE", False)
    monkeypatch.setattr(os, "symlink", no_links)
    target = tmp_path / "data"
    _write_v(target, "1")
    (target / "cache").mkdir()
    _write_v(target, "2", keep=["cache"])
    assert not target.is_symlink() and _content(target) == "2" and (target / "cache").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
