"""The `kronos` command: help with examples, one-line errors, and forecasting a user's file with checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # end-to-end / subprocess tests: `make test-fast` skips them

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "parity-tiny" / "tiny"
CSV = ROOT / "tests" / "fixtures" / "kline_5min.csv"


def kronos(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "kronos.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_every_step_with_examples():
    r = kronos("--help")
    assert r.returncode == 0
    for sub in (
        "data",
        "train-tokenizer",
        "train-predictor",
        "predict",
        "evaluate",
        "backtest",
        "pipeline",
        "forecast",
        "config",
    ):
        assert sub in r.stdout
    assert "examples:" in r.stdout and "torchrun" in r.stdout
    r = kronos("train-predictor", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "example:" in r.stdout


def test_forecast_a_csv_with_checkpoint_folders(tmp_path):
    out = tmp_path / "fc.csv"
    png = tmp_path / "fc.png"
    r = kronos(
        "-q",
        "forecast",
        "--input",
        str(CSV),
        "--tokenizer",
        str(TINY / "tokenizer"),
        "--model",
        str(TINY / "predictor"),
        "--pred-len",
        "12",
        "--lookback",
        "200",
        "--sample-count",
        "3",
        "--seed",
        "7",
        "--output",
        str(out),
        "--plot",
        str(png),
    )
    assert r.returncode == 0, r.stderr
    fc = pd.read_csv(out, parse_dates=["timestamps"])
    assert len(fc) == 12 and {"open", "close", "volume", "close_q0.1", "close_q0.9"} <= set(fc.columns)
    last = pd.to_datetime(pd.read_csv(CSV)["timestamps"]).iloc[-1]
    assert fc["timestamps"].iloc[0] > last
    assert png.stat().st_size > 1000
    again = tmp_path / "again.csv"
    r = kronos(
        "-q",
        "forecast",
        "--input",
        str(CSV),
        "--tokenizer",
        str(TINY / "tokenizer"),
        "--model",
        str(TINY / "predictor"),
        "--pred-len",
        "12",
        "--lookback",
        "200",
        "--sample-count",
        "3",
        "--seed",
        "7",
        "--output",
        str(again),
    )
    assert r.returncode == 0
    assert out.read_text() == again.read_text()  # seeded sampling is reproducible


def test_errors_are_one_line(tmp_path):
    cases = [
        (
            "forecast",
            "--input",
            str(tmp_path / "nope.csv"),
            "--tokenizer",
            str(TINY / "tokenizer"),
            "--model",
            str(TINY / "predictor"),
            "--pred-len",
            "3",
        ),
        (
            "forecast",
            "--input",
            str(CSV),
            "--tokenizer",
            str(tmp_path / "missing"),
            "--model",
            str(TINY / "predictor"),
            "--pred-len",
            "3",
        ),
        (
            "data",
            "--data-source",
            "csv",
            "--set",
            f"csv_data_path={tmp_path / 'nothing'}",
            "--set",
            f"dataset_path={tmp_path / 'ds'}",
        ),
        ("data", "--data-source", "nosuchsource"),
        (
            "predict",
            "--set",
            f"dataset_path={tmp_path / 'ds'}",
            "--set",
            f"save_path={tmp_path / 'models'}",
            "--set",
            f"backtest_result_path={tmp_path / 'results'}",
        ),  # not the checkout's own outputs/runs
        (
            "forecast",
            "--input",
            str(CSV),
            "--tokenizer",
            str(TINY / "tokenizer"),
            "--model",
            str(TINY / "predictor"),
            "--pred-len",
            "3",
            "--lookback",
            "-5",
        ),
        (
            "forecast",
            "--input",
            str(CSV),
            "--tokenizer",
            str(TINY / "tokenizer"),
            "--model",
            str(TINY / "predictor"),
            "--pred-len",
            "3",
            "--top-p",
            "2",
        ),
        (
            "forecast",
            "--input",
            str(CSV),
            "--tokenizer",
            str(TINY / "tokenizer"),
            "--model",
            str(TINY / "predictor"),
            "--pred-len",
            "3",
            "--lookback",
            "2",
        ),
    ]
    for args in cases:
        r = kronos(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("error:") and r.stderr.strip().count("\n") == 0, r.stderr


def test_config_command_prints_resolved_paths():
    r = kronos("config", "--config-path", "examples/configs/demo.json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["finetuned_tokenizer_path"].endswith("finetune_tokenizer_demo/checkpoints/best_model")
    assert Path(data["qlib_data_path"]).is_dir()
    # the demo finetunes the committed starter pair and keeps its tokenizer
    for key in ("pretrained_tokenizer_path", "pretrained_predictor_path"):
        assert (Path(data[key]) / "model.safetensors").is_file() and Path(data[key]).parent.name == "starter"
    assert data["finetune_tokenizer"] is False and data["keep_better"] is True


def test_front_door_as_a_user_runs_it(tmp_path):
    # bare `kronos`: help, exit 0; --version; -q before or after the subcommand; one-line errors from a script
    r = kronos()
    assert r.returncode == 0 and "usage: kronos" in r.stdout and r.stderr == ""
    r = kronos("--version")
    assert r.returncode == 0 and r.stdout.startswith("kronos ")
    for args in (("-q", "config", "--set", "epochs=2"), ("config", "--set", "epochs=2", "-q")):
        r = kronos(*args)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["epochs"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lookback_window": 0}))
    for script in ("train_complete_pipeline.py", "qlib_data_preprocess.py", "train_predictor_cpu.py"):
        r = subprocess.run(
            [sys.executable, str(ROOT / "finetune" / script), "--config-path", str(bad), "-q"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert r.returncode == 1 and r.stderr.count("\n") == 1, (script, r.stderr)
        assert r.stderr.startswith("error: ") and "lookback_window" in r.stderr and ">= 1" in r.stderr
