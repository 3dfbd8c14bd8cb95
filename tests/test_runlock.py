"""One run per output folder: the advisory run lock, stale-lock takeover and cleanup of killed runs' temporaries."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kronos.errors import BusyError
from kronos.runlock import LOCK_NAME, RunLock, clean_stale_temporaries, lock_file_for, run_locks

SRC = Path(__file__).resolve().parents[1] / "src"


def hold_lock(folder: Path, seconds: float, whole: bool = False) -> subprocess.Popen:
    """A child process that holds the run lock of ``folder`` for ``seconds`` (prints 'held' once it does)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SRC)!r})
        from kronos.runlock import run_locks
        with run_locks([] if {whole} else [{str(folder)!r}], whole=[{str(folder)!r}] if {whole} else []):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_stops_with_one_line_naming_the_owner_and_a_dead_owner_is_taken_over(tmp_path, caplog):
    out = tmp_path / "outputs"
    owner = hold_lock(out, 60)
    try:
        with pytest.raises(BusyError) as info:
            with run_locks([out]):
                pass
        msg = str(info.value)
        assert f"pid {owner.pid} on host" in msg and str(out) in msg and "\n" not in msg
        info_file = json.loads((out / LOCK_NAME).read_text())
        assert info_file["pid"] == owner.pid and info_file["host"] and info_file["run_id"]
    finally:
        owner.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays behind, full
        owner.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == owner.pid
    with caplog.at_level(logging.INFO, logger="kronos.runlock"):
        with run_locks([out]):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(f"pid {owner.pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    assert (out / LOCK_NAME).read_text() == ""  # released


def test_waiting_run_starts_when_the_owner_finishes(tmp_path):
    owner = hold_lock(tmp_path / "ds", 0.8, whole=True)
    try:
        start = time.monotonic()
        with run_locks([], whole=[tmp_path / "ds"], wait_s=20):
            assert time.monotonic() - start < 15
        assert lock_file_for(tmp_path / "ds", whole=True) == tmp_path / f".ds{LOCK_NAME}"
    finally:
        owner.wait(timeout=30)


def test_locks_are_reentrant_within_a_process(tmp_path):
    with run_locks([tmp_path / "a", tmp_path / "b"]):
        with run_locks([tmp_path / "a"]):  # e.g. a training stage inside the pipeline
            pass
        lock = RunLock(tmp_path / "a" / LOCK_NAME)
        lock.acquire()
        lock.release()
        assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == os.getpid()  # still held
    assert (tmp_path / "a" / LOCK_NAME).read_text() == ""


def test_stale_temporaries_of_killed_runs_are_removed_under_the_lock(tmp_path):
    out = tmp_path / "models"
    ckpt = out / "finetune_tokenizer_demo" / "checkpoints"
    (ckpt / ".best_model.tmp-4242").mkdir(parents=True)
    (ckpt / ".best_model.tmp-4242" / "model.safetensors").write_bytes(b"x")
    (ckpt / "best_model").mkdir()
    (ckpt / "best_model" / "config.json").write_text("{}")
    (out / ".summary.json.tmp-77").write_text("{")
    (out / "notes.tmp-1").write_text("kept: not a hidden temporary")
    (tmp_path / ".dataset.tmp-abc").mkdir()
    (tmp_path / ".other.tmp-abc").mkdir()
    with run_locks([out], whole=[tmp_path / "dataset"]):
        pass
    assert not (ckpt / ".best_model.tmp-4242").exists() and not (out / ".summary.json.tmp-77").exists()
    assert (ckpt / "best_model" / "config.json").is_file() and (out / "notes.tmp-1").is_file()
    assert not (tmp_path / ".dataset.tmp-abc").exists() and (tmp_path / ".other.tmp-abc").is_dir()
    assert clean_stale_temporaries(tmp_path / "missing") == []


@pytest.mark.slow
def test_pipeline_into_locked_folders_stops_with_one_line(tmp_path):
    cfg = {
        "data_source": "csv",
        "csv_data_path": str(Path(__file__).resolve().parent / "fixtures" / "kline_5min.csv"),
        "dataset_path": str(tmp_path / "data"),
        "save_path": str(tmp_path / "outputs" / "models"),
        "backtest_result_path": str(tmp_path / "outputs" / "results"),
        "run_folders": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    owner = hold_lock(tmp_path / "outputs" / "models", 120)
    try:
        env = dict(os.environ, PYTHONPATH=str(SRC))
        r = subprocess.run(
            [sys.executable, "-m", "kronos.cli", "pipeline", "--config-path", str(tmp_path / "config.json"), "--cpu"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        owner.kill()
        owner.wait()
    assert r.returncode == 1, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and len(err) == 1 and f"pid {owner.pid}" in err[0], r.stderr[-2000:]
    assert not (tmp_path / "data").exists()  # stopped before any work


def test_the_lock_moves_back_folders_left_at_prev_and_spares_kept_entries(tmp_path, caplog):
    from kronos import io as kio

    out = tmp_path / "models"
    best = out / "finetune_tokenizer_demo" / "checkpoints" / "best_model"
    kio.write_folder(best, lambda f: (f / "config.json").write_text("{}"))
    best.rename(best.with_name("best_model.prev"))  # an older version killed between its two renames
    dataset = tmp_path / "dataset"
    kio.write_folder(dataset, lambda f: (f / "manifest.json").write_text("{}"))
    (dataset / "raw").mkdir()
    dataset.rename(tmp_path / "dataset.prev")
    # the old copy of a swap killed before its kept entries were moved over: named after the folder it replaced
    kept = out / f".notes.tmp-1-ab{kio._KEEP_TAG}0"
    kept.mkdir()
    kept = kept.rename(kept.with_name(f".notes.tmp-1-ab{kio._KEEP_TAG}{kept.stat().st_ino}"))
    with caplog.at_level("WARNING", logger="kronos.io"), run_locks([out], whole=[dataset]):
        pass
    assert (best / "config.json").is_file() and not best.with_name("best_model.prev").exists()
    assert (dataset / "raw").is_dir() and not (tmp_path / "dataset.prev").exists()
    assert caplog.text.count("moved its complete previous version") == 2
    assert kept.is_dir()  # left to the next write of its folder, which moves its entries first
    assert kio.holds_kept_entries(kept) and not kio.holds_kept_entries(kept.with_name(".notes.tmp-1-ab-k1"))
