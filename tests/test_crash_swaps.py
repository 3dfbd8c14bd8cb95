"""Crash-safe swaps: a writer SIGKILLed after any rename leaves every configured path loadable (old or new copy).

The io module's test-only hook (``KRONOS_TEST_KILL_AFTER_RENAME=N``) kills the writer right after its N-th
rename. A forked child process writes a new version of a dataset, a ``best_model`` and a ``last`` checkpoint folder and
the results files (metrics.json, pipeline_result.json); it is killed after rename 1, 2, ... in turn, each child
starting from what the killed one before it left. After every kill each path must load, holding either the
version it held before or the new one, and the results must carry run ids.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from _support.training import qlib_frame
from kronos import io as kio
from kronos.data.store import load_manifest, load_split, save_dataset
from kronos.model import Kronos, build_predictor

pytestmark = pytest.mark.slow  # forked writer processes


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
    kio.write_folder(
        root / "checkpoints" / "last", lambda f: (f / "trainer_state.json").write_text(json.dumps({"version": version}))
    )
    kio.write_json(root / "results" / "metrics.json", {"model/mse": 1.0, "run_id": f"run-{version}"})
    kio.write_json(root / "results" / "pipeline_result.json", {"run_id": f"run-{version}", "status": "finished"})


def write_version(root: Path, version: int, kill_after: int = 0) -> int:
    """Write ``version`` in a forked child (killed after its ``kill_after``-th rename); returns its exit code."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            os.environ.pop(kio.KILL_ENV, None)
            if kill_after:
                os.environ[kio.KILL_ENV] = str(kill_after)
            kio._renames = 0
            _write(root, version)
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
    """The version every configured path holds now; fails if any of them cannot be loaded."""
    out = {"dataset": int(load_manifest(root / "dataset")["version"])}
    for split in ("train", "val", "test"):
        assert len(load_split(root / "dataset", split)) > 0
    best = Kronos.from_pretrained(root / "checkpoints" / "best_model")
    out["best_model"] = int(best.norm.weight[0].item())
    assert torch.all(best.norm.weight == out["best_model"])
    last = kio.resolve_folder(root / "checkpoints" / "last")
    assert last is not None, "no complete last/ checkpoint"
    out["last"] = json.loads((last / "trainer_state.json").read_text())["version"]
    for name in ("metrics.json", "pipeline_result.json"):
        run_id = kio.read_json(root / "results" / name)["run_id"]  # every result names the run that wrote it
        out[name] = int(run_id.split("-")[1])
    return out


def test_kill_after_every_rename_leaves_every_path_loadable(tmp_path):
    assert write_version(tmp_path, 1) == 0
    held = versions(tmp_path)
    assert set(held.values()) == {1}
    kills = 0
    for n in range(1, 30):
        version = n + 1
        rc = write_version(tmp_path, version, kill_after=n)
        now = versions(tmp_path)
        for key, value in now.items():
            assert value in (held[key], version), (n, key, value, held[key])
        held = now
        if rc == 0:  # fewer than n renames in a whole write: every rename has been interrupted once
            break
        kills += 1
    else:
        pytest.fail("the writer was still being killed after 29 renames")
    assert kills >= 7  # dataset, best_model, last: 2 renames each; results: 1 each
    assert set(held.values()) == {version}
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".prev")]
    assert leftovers == [], leftovers
