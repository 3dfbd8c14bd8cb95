"""No secret reaches a file, a log line or a tracker: a tiny pipeline with a Comet API key configured."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # end-to-end / subprocess test: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures"
SECRET = "kx-SECRET-7f3a9c2e51d04b8e"


def _texts(path: Path):
    """The bytes of ``path``, and of every member when it is a zip archive (Comet's offline experiments)."""
    data = path.read_bytes()
    yield path, data
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                yield f"{path}!{name}", z.read(name)


def test_comet_api_key_never_reaches_a_file_log_or_tracker(tmp_path):
    from e2e.test_pipeline import TINY  # the e2e pipeline test's tiny config

    raw = pd.read_csv(DATA / "kline_5min.csv")
    (tmp_path / "klines").mkdir()
    raw.to_csv(tmp_path / "klines" / "AAA.csv", index=False)
    # a second valid symbol (all prices scaled: a close above the high would drop every bar of BBB)
    raw.assign(**{c: raw[c] * 1.01 for c in ("open", "high", "low", "close")}).to_csv(
        tmp_path / "klines" / "BBB.csv", index=False
    )
    # backtest after the last validation bar (2024-08-15 09:50); the test range's earlier bars are history only
    cfg = dict(
        TINY,
        data_source="csv",
        csv_data_path="klines",
        split_ratios=[0.6, 0.2, 0.2],
        eval_max_anchors=40,
        calibration_min_forecasts=10,  # tiny data: keep the test fast
        test_time_range=["2024-08-01", "2024-08-31"],
        backtest_time_range=["2024-08-16", "2024-08-31"],
        dataset_path="data/processed",
        save_path="outputs/models",
        backtest_result_path="outputs/backtest_results",
        use_tensorboard=True,
        use_comet=True,
        comet_config={"api_key": SECRET, "project_name": "p", "workspace": "w"},
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    env = {"COMET_API_KEY": "", "PYTHONUNBUFFERED": "1"}
    import os

    r = subprocess.run(
        [sys.executable, "-m", "kronos.cli", "pipeline", "--cpu", "--fast-mode", "--config-path", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout and SECRET not in r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    names = {p.name for p in written}
    # the run wrote what a leak would have gone to: stage configs, trainer state, summaries, pipeline config,
    # the dataset manifest, TensorBoard event files and a Comet offline archive
    assert {"config.json", "trainer_state.json", "summary.json", "pipeline_config.json", "manifest.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names) and any(n.endswith(".zip") for n in names)
    leaks = [where for p in written for where, data in _texts(p) if SECRET.encode() in data]
    assert not leaks, leaks
    (saved,) = tmp_path.rglob("pipeline_config.json")
    assert json.loads(saved.read_text())["comet_config"]["api_key"] == "***"  # redacted, not dropped
