"""Crash-safe swaps: a writer SIGKILLed after any rename leaves every configured path itself a complete folder.

The io module's test-only hook (``KRONOS_TEST_KILL_AFTER_RENAME=N``) kills the writer right after its N-th rename
or exchange. A forked child process writes a new version of a dataset (with a raw-data cache beside its files, which
every version keeps), a predictor and a tokenizer ``best_model``, a ``last`` checkpoint folder and the results files
(metrics.json, pipeline_result.json); it is killed after rename 1, 2, ... in turn, each child starting from what the
killed one before it left (after the stale-temporary cleanup a run lock does). After every kill each configured path
must load with plain readers (pandas on the dataset's files, ``from_pretrained(path)``, no ``.prev`` fallback),
holding either the version it held before or the new one, the results must carry run ids, and the raw-data cache
must never be lost. Both swap kinds run: the Linux exchange and the symbolic-link fallback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from _support.training import REPO, qlib_frame, tiny_config
from kronos import io as kio
from kronos.data.store import save_dataset
from kronos.model import Kronos, KronosTokenizer, build_predictor, build_tokenizer
from kronos.runlock import clean_stale_temporaries

pytestmark = pytest.mark.slow  # forked writer processes

CACHE = Path("raw_cache") / "bars.json"  # an entry of the dataset folder that is no dataset file: kept by every write
FOLDERS = ("dataset", "checkpoints/best_model", "tokenizer/best_model", "checkpoints/last")


def _write(root: Path, version: int) -> None:
    frame = qlib_frame(symbols=2)
    ts = frame["timestamps"]
    splits = {
        "train": frame[ts < "2023-07-01"],
        "val": frame[(ts >= "2023-07-01") & (ts < "2024-04-01")],
        "test": frame[ts >= "2024-04-01"],
    }
    save_dataset(root / "dataset", splits, {"version": version})
    model = build_predictor("tiny")
    with torch.no_grad():
        model.norm.weight.fill_(float(version))
    kio.write_folder(root / "checkpoints" / "best_model", lambda f: model.save_pretrained(f))
    tok = build_tokenizer("tiny")
    with torch.no_grad():
        for p in tok.parameters():
            p.fill_(float(version))
    kio.write_folder(root / "tokenizer" / "best_model", lambda f: tok.save_pretrained(f))
    kio.write_folder(
        root / "checkpoints" / "last", lambda f: (f / "trainer_state.json").write_text(json.dumps({"version": version}))
    )
    kio.write_json(root / "results" / "metrics.json", {"model/mse": 1.0, "run_id": f"run-{version}"})
    kio.write_json(root / "results" / "pipeline_result.json", {"run_id": f"run-{version}", "status": "finished"})


def write_version(root: Path, version: int, kill_after: int = 0, exchange: bool = True) -> int:
    """Write ``version`` in a forked child (killed after its ``kill_after``-th rename); returns its exit code."""
    return in_child(lambda: _write(root, version), kill_after, exchange)


def in_child(work: Callable[[], object], kill_after: int = 0, exchange: bool = True) -> int:
    """Run ``work`` in a forked child (killed after its ``kill_after``-th rename); returns its exit code."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            os.environ.pop(kio.KILL_ENV, None)
            if kill_after:
                os.environ[kio.KILL_ENV] = str(kill_after)
            kio._renames = 0
            kio.EXCHANGE = exchange
            work()
            code = 0
        except BaseException:  # noqa: BLE001 - report and exit the child
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the writer child hung")
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -signal.SIGKILL
    assert os.WEXITSTATUS(status) == 0, "the writer child failed (traceback above)"
    return 0


def versions(root: Path) -> dict[str, int]:
    """The version every configured path holds now, read by plain readers at the path itself; fails if any of
    them is missing or incomplete."""
    for rel in FOLDERS:
        path = root / rel
        assert path.is_dir(), f"{rel} is missing"
        assert not path.with_name(path.name + kio.PREV_SUFFIX).exists(), f"{rel}.prev exists"
    dataset = root / "dataset"
    out = {"dataset": int(json.loads((dataset / "manifest.json").read_text())["version"])}
    for split in ("train", "val", "test"):
        assert len(pd.read_parquet(dataset / f"{split}.parquet")) > 0
    best = Kronos.from_pretrained(root / "checkpoints" / "best_model")
    out["best_model"] = int(best.norm.weight[0].item())
    assert torch.all(best.norm.weight == out["best_model"])
    tok = KronosTokenizer.from_pretrained(root / "tokenizer" / "best_model")
    values = torch.cat([p.flatten() for p in tok.parameters()])
    out["tokenizer"] = int(values[0].item())
    assert torch.all(values == out["tokenizer"])
    out["last"] = json.loads((root / "checkpoints" / "last" / "trainer_state.json").read_text())["version"]
    for name in ("metrics.json", "pipeline_result.json"):
        run_id = kio.read_json(root / "results" / name)["run_id"]  # every result names the run that wrote it
        out[name] = int(run_id.split("-")[1])
    return out


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "link"])
def test_kill_after_every_rename_leaves_every_path_loadable(tmp_path, exchange):
    assert write_version(tmp_path, 1, exchange=exchange) == 0
    assert (tmp_path / "dataset").is_symlink() is not exchange  # the swap kind under test is the one in use
    (tmp_path / "dataset" / CACHE).parent.mkdir()
    (tmp_path / "dataset" / CACHE).write_text("cached raw bars")
    held = versions(tmp_path)
    assert set(held.values()) == {1}
    kills = 0
    for n in range(1, 60):
        version = n + 1
        rc = write_version(tmp_path, version, kill_after=n, exchange=exchange)
        now = versions(tmp_path)
        for key, value in now.items():
            assert value in (held[key], version), (n, key, value, held[key])
        held = now
        # the cache is in the folder, or in the old copy the next write moves it from (never a temporary to drop)
        assert (tmp_path / "dataset" / CACHE).is_file() or any(
            (p / CACHE).is_file() for p in tmp_path.glob(".dataset.*")
        ), n
        clean_stale_temporaries(tmp_path, "dataset")  # what the next run's lock on the dataset does first
        if rc == 0:  # fewer than n renames in a whole write: every rename has been interrupted once
            break
        kills += 1
    else:
        pytest.fail("the writer was still being killed after 59 renames")
    # exchange: 1 per folder, 1 for the cache carried over, 1 per result file, and 2 files that save_pretrained
    # replaces one by one in each best_model's temporary; link: 2 per folder (new version, then link) instead of 1
    assert kills >= (11 if exchange else 15)
    assert set(held.values()) == {version}
    assert (tmp_path / "dataset" / CACHE).read_text() == "cached raw bars"  # never lost, whatever the kill point
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".prev")]
    assert leftovers == [], leftovers
    versions_left = sorted(p.name for p in tmp_path.rglob(".*.v-*"))
    assert len(versions_left) == (0 if exchange else len(FOLDERS)), versions_left  # old versions are pruned


def _tokenizer_run(tmp: Path, dataset: Path, **overrides):
    cfg = tiny_config(tmp, dataset, **{"epochs": 2, **overrides})
    ckpt = Path(cfg.tokenizer_dir) / "checkpoints"
    return cfg, ckpt / "best_model", ckpt / "last"


def _no_leftovers(root: Path) -> None:
    left = [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(kio.PREV_SUFFIX)]
    assert left == [], left


def _record_renames(log: Path, work: Callable[[], object]) -> Callable[[], None]:
    """``work`` with the name of every rename's or exchange's destination appended to ``log`` (one a line)."""

    def run() -> None:
        for fn in ("_replace", "_exchange"):
            orig = getattr(kio, fn)

            def wrapped(a, b, orig=orig):
                with open(log, "a") as f:
                    f.write(Path(b).name + "\n")
                return orig(a, b)

            setattr(kio, fn, wrapped)
        work()

    return run


def test_train_tokenizer_killed_in_any_checkpoint_swap_resumes_to_a_loadable_best_model(dataset: Path, tmp_path):
    from kronos.train import train_tokenizer

    # which renames of a whole run swap best_model/ and last/ (or write the model card into best_model/)
    log = tmp_path / "renames.txt"
    cfg, _, _ = _tokenizer_run(tmp_path / "warm", dataset)
    assert in_child(lambda: train_tokenizer(cfg)) == 0  # builds the dataset's array cache once (its renames vary)
    cfg, _, _ = _tokenizer_run(tmp_path / "probe", dataset)
    assert in_child(_record_renames(log, lambda: train_tokenizer(cfg))) == 0
    renames = log.read_text().splitlines()
    points = [i for i, name in enumerate(renames, 1) if name in ("best_model", "last", "model_card.json")]
    assert len(points) >= 5, renames  # best_model and last written at each of the 2 epoch ends, then the card
    for n in points:
        cfg, best, last = _tokenizer_run(tmp_path / f"kill{n}", dataset)
        assert in_child(lambda cfg=cfg: train_tokenizer(cfg), kill_after=n) == -signal.SIGKILL
        if "best_model" in renames[:n]:  # the path itself, complete: what a plain from_pretrained(path) reads
            assert best.is_dir() and (best / "config.json").is_file(), n
            KronosTokenizer.from_pretrained(best)
        if "last" in renames[:n]:
            assert (last / "trainer_state.json").is_file(), n
        assert in_child(lambda cfg=cfg: train_tokenizer(cfg, resume=True)) == 0, n
        assert best.is_dir() and (Path(cfg.tokenizer_dir) / "summary.json").is_file(), n
        KronosTokenizer.from_pretrained(best)
        _no_leftovers(Path(cfg.save_path))


def test_resume_moves_back_a_best_model_left_at_prev_by_an_older_version(dataset: Path, tmp_path):
    """The reported leftover: ``train-tokenizer --resume`` found best_model missing and best_model.prev complete
    (an older version killed between its two renames), and finished without best_model. Now the command moves it
    back first, says so, and ends with a loadable best_model."""
    from kronos.train import train_tokenizer

    cfg, best, last = _tokenizer_run(tmp_path, dataset, epochs=1)
    assert in_child(lambda: train_tokenizer(cfg)) == 0
    best.rename(best.with_name("best_model.prev"))
    last.rename(last.with_name("last.prev"))
    cfg.save(tmp_path / "cfg.json")
    resumed = subprocess.run(
        [sys.executable, "-m", "kronos.cli", "train-tokenizer", "--config-path", str(tmp_path / "cfg.json"), "--cpu"]
        + ["--resume"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src")),
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    err = resumed.stderr
    assert "best_model was missing" in err and "last was missing" in err and "moved its complete previous" in err
    assert best.is_dir() and (last / "trainer_state.json").is_file()
    KronosTokenizer.from_pretrained(best)
    _no_leftovers(tmp_path)
