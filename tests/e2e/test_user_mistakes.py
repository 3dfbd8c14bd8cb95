"""A newcomer's mistakes: every subcommand given wrong paths, flags, values, config keys and files ends with exit 1
and ONE line ``error: ...`` on stderr that names the offending thing, never a traceback.

Most cases call ``kronos.cli.main`` in-process (the same parser and error printer as the command); a few run the
real command in a subprocess, where stderr must be exactly that one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kronos import cli

pytestmark = pytest.mark.slow  # many CLI runs (tiny checkpoints, a few subprocesses)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "parity-tiny" / "tiny"
CSV = ROOT / "tests" / "fixtures" / "kline_5min.csv"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The wrong inputs a newcomer produces, written once."""
    d = tmp_path_factory.mktemp("mistakes")
    (d / "unknown_key.json").write_text('{"epochz": 3}')
    (d / "wrong_type.json").write_text('{"epochs": "many"}')
    (d / "broken.json").write_text('{"epochs": ')
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "syntax.yaml").write_text("epochs: [1, 2\n")
    (d / "bad_date.yaml").write_text("train_time_range: [2018-13-45, 2020-01-01]\n")  # unquoted, impossible
    (d / "malformed.csv").write_text('a,b\n1,2,3,4\n"x')
    (d / "no_close.csv").write_text("timestamps,open,high,low\n2024-01-01,1,2,0.5\n")
    (d / "empty.csv").write_text("")
    (d / "bad_time.csv").write_text("timestamps,open,high,low,close\nnotadate,1,2,0.5,1\n2024-01-02,1,2,0.5,1\n")
    (d / "notes.txt").write_text("hello")
    (d / "my.toml").write_text("epochs = 2\n")
    pd.read_csv(CSV).iloc[:5].to_csv(d / "five_bars.csv", index=False)
    bars = pd.read_csv(CSV)
    pd.concat([bars.assign(symbol="AAA"), bars.assign(symbol="BBB")]).to_csv(d / "two_symbols.csv", index=False)
    return d


def forecast(*extra, input=CSV, tokenizer=TINY / "tokenizer"):
    return [
        "forecast",
        "--input",
        str(input),
        "--tokenizer",
        str(tokenizer),
        "--model",
        str(TINY / "predictor"),
        "--pred-len",
        "2",
        "--lookback",
        "64",
        *extra,
    ]


def nothing_on_disk(d):
    return [
        "--set",
        f"dataset_path={d / 'no_dataset'}",
        "--set",
        f"save_path={d / 'no_models'}",
        "--set",
        f"backtest_result_path={d / 'no_results'}",
    ]


# (case id, argv from the files folder, words the one-line error must contain)
MISTAKES = [
    ("unknown flag", lambda d: forecast("--nope"), ["--nope"]),
    ("unknown command", lambda d: ["frobnicate"], ["frobnicate"]),
    ("flag without its value", lambda d: ["config", "--config-path"], ["--config-path"]),
    ("text for a number", lambda d: forecast("--pred-len", "abc"), ["--pred-len", "abc"]),
    ("config file missing", lambda d: ["config", "--config-path", str(d / "none.json")], ["none.json"]),
    ("config path is a folder", lambda d: ["config", "--config-path", str(d)], ["mistakes", "--config-path"]),
    ("unknown config key", lambda d: ["config", "--config-path", str(d / "unknown_key.json")], ["epochz", "epochs"]),
    (
        "config value of the wrong type",
        lambda d: ["config", "--config-path", str(d / "wrong_type.json")],
        ["epochs", "integer"],
    ),
    ("broken JSON", lambda d: ["config", "--config-path", str(d / "broken.json")], ["broken.json", "line 1"]),
    ("YAML list instead of keys", lambda d: ["data", "--config-path", str(d / "list.yaml")], ["list.yaml"]),
    ("YAML syntax error", lambda d: ["config", "--config-path", str(d / "syntax.yaml")], ["syntax.yaml", "line 2"]),
    (
        "YAML unquoted impossible date",
        lambda d: ["config", "--config-path", str(d / "bad_date.yaml")],
        ["train_time_range", "2018-13-45"],
    ),
    ("--set without =", lambda d: ["config", "--set", "epochs"], ["--set", "epochs"]),
    ("--set unknown key", lambda d: ["config", "--set", "nokey=1"], ["nokey"]),
    ("negative lookback_window", lambda d: ["config", "--set", "lookback_window=-1"], ["lookback_window"]),
    ("unknown data source", lambda d: ["data", "--data-source", "nosuch"], ["nosuch", "csv"]),
    (
        "CSV folder missing",
        lambda d: [
            "data",
            "--data-source",
            "csv",
            "--set",
            f"csv_data_path={d / 'no_csvs'}",
            "--set",
            f"dataset_path={d / 'ds'}",
        ],
        ["no_csvs"],
    ),
    (
        "Qlib folder missing",
        lambda d: ["data", "--set", f"qlib_data_path={d / 'no_qlib'}"],
        ["no_qlib", "qlib_data_path"],
    ),
    (
        "pipeline skip flags, nothing on disk",
        lambda d: [
            "pipeline",
            "--skip-data-process",
            "--skip-tokenizer",
            "--skip-predictor",
            "--cpu",
            *nothing_on_disk(d),
        ],
        ["no_dataset"],
    ),
    ("train-tokenizer without a dataset", lambda d: ["train-tokenizer", *nothing_on_disk(d)], ["no_dataset"]),
    ("train-predictor without a dataset", lambda d: ["train-predictor", *nothing_on_disk(d)], ["no_dataset"]),
    ("predict without a dataset", lambda d: ["predict", *nothing_on_disk(d)], ["no_dataset"]),
    ("evaluate without a dataset", lambda d: ["evaluate", *nothing_on_disk(d)], ["no_dataset"]),
    ("backtest without a dataset", lambda d: ["backtest", *nothing_on_disk(d)], ["no_dataset"]),
    ("calibrate without checkpoints", lambda d: ["calibrate", *nothing_on_disk(d)], ["tokenizer", "no_models"]),
    ("serve without models", lambda d: ["serve"], ["--tokenizer", "--model"]),
    (
        "serve with missing checkpoints",
        lambda d: ["serve", "--tokenizer", str(d / "tok"), "--model", str(d / "m")],
        ["tok"],
    ),
    ("input file missing", lambda d: forecast(input=d / "nope.csv"), ["nope.csv"]),
    ("input not CSV/Parquet", lambda d: forecast(input=d / "notes.txt"), ["notes.txt", "CSV"]),
    ("empty CSV", lambda d: forecast(input=d / "empty.csv"), ["empty.csv"]),
    ("malformed CSV", lambda d: forecast(input=d / "malformed.csv"), ["malformed.csv"]),
    ("missing close column", lambda d: forecast(input=d / "no_close.csv"), ["no_close.csv", "'close'"]),
    ("unparseable timestamp", lambda d: forecast(input=d / "bad_time.csv"), ["bad_time.csv", "line 2", "notadate"]),
    ("several symbols, no --symbol", lambda d: forecast(input=d / "two_symbols.csv"), ["--symbol", "AAA"]),
    ("unknown symbol", lambda d: forecast("--symbol", "ZZZ", input=d / "two_symbols.csv"), ["ZZZ", "AAA"]),
    ("tokenizer folder missing", lambda d: forecast(tokenizer=d / "no_tokenizer"), ["no_tokenizer"]),
    ("calibration file missing", lambda d: forecast("--calibration", str(d / "cal.json")), ["cal.json"]),
    ("negative --lookback", lambda d: forecast("--lookback", "-3"), ["--lookback", "-3"]),
    ("--pred-len 0", lambda d: forecast("--pred-len", "0"), ["--pred-len"]),
    ("--sample-count 0", lambda d: forecast("--sample-count", "0"), ["--sample-count"]),
    ("--top-p 2", lambda d: forecast("--top-p", "2"), ["top_p", "2"]),
    ("--T 0", lambda d: forecast("--T", "0"), ["T", "0"]),
    ("--quantiles 1.5", lambda d: forecast("--quantiles", "0.1,1.5", "--sample-count", "3"), ["--quantiles", "1.5"]),
    (
        "--quantiles not numbers",
        lambda d: forecast("--quantiles", "low,high", "--sample-count", "3"),
        ["--quantiles", "low"],
    ),
    ("--quantiles from one path", lambda d: forecast("--quantiles", "0.2,0.8"), ["--quantiles", "--sample-count"]),
    ("--device nonsense", lambda d: forecast("--device", "tpu9"), ["tpu9"]),
    ("--output is a folder", lambda d: forecast("--output", str(d)), ["--output", "is a folder"]),
    (
        "--output under a file",
        lambda d: forecast("--output", str(d / "notes.txt" / "fc.csv")),
        ["--output", "notes.txt"],
    ),
    ("--plot is a folder", lambda d: forecast("--plot", str(d)), ["--plot", "forecast.png"]),
    ("input is a folder", lambda d: forecast(input=d), ["is a folder", "csv_data_path"]),
    ("too few bars", lambda d: forecast(input=d / "five_bars.csv"), ["5 row", "8"]),
    ("config file of another format", lambda d: ["config", "--config-path", str(d / "my.toml")], ["my.toml", ".yaml"]),
    ("config device unknown", lambda d: ["predict", "--set", "device=tpu"], ["device", "tpu"]),
    ("batch_size 0", lambda d: ["config", "--set", "batch_size=0"], ["batch_size", ">= 1"]),
    ("split_ratios not summing to 1", lambda d: ["config", "--set", "split_ratios=[0.5,0.6]"], ["split_ratios"]),
    ("Sina symbol malformed", lambda d: ["data", "--data-source", "sina", "--set", 'sina_symbols=["zz!!"]'], ["zz!!"]),
    ("calibration file garbage", lambda d: forecast("--calibration", str(d / "broken.json")), ["broken.json"]),
    ("checkpoint path is a file", lambda d: forecast(tokenizer=CSV), ["kline_5min.csv", "folder"]),
    ("mcp without models", lambda d: ["mcp"], ["--tokenizer", "--run"]),
    (
        "mcp with a missing checkpoint",
        lambda d: ["mcp", "--tokenizer", str(d / "no_tok"), "--model", str(d / "m")],
        ["no_tok"],
    ),
    ("serve --run without a run", lambda d: ["serve", "--run", str(d / "no_run")], ["no_run", "pipeline_config.json"]),
    (
        "dataset_path is a file",
        lambda d: [
            "data",
            "--data-source",
            "csv",
            "--set",
            f"csv_data_path={CSV}",
            "--set",
            f"dataset_path={d / 'notes.txt'}",
            "--set",
            "split_ratios=[0.6,0.2,0.2]",
            "--set",
            "lookback_window=30",
            "--set",
            "predict_window=5",
        ],
        ["notes.txt", "dataset_path"],
    ),
]
if not torch.cuda.is_available():
    MISTAKES += [
        ("--device cuda without CUDA", lambda d: forecast("--device", "cuda"), ["cuda", "CPU-only", "install"]),
        ("--set device=cuda without CUDA", lambda d: ["predict", "--set", "device=cuda"], ["device", "cuda"]),
    ]


def test_the_list_is_long_enough():
    assert len(MISTAKES) >= 25


@pytest.mark.parametrize("argv_of, words", [(m[1], m[2]) for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_naming_it(argv_of, words, files, capsys, one_thread):
    try:
        rc = cli.main(argv_of(files))
    except SystemExit as exc:  # argparse's own errors (through the CLI's parser)
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0]  # the error is the last word (progress bars may precede it)
    for word in words:
        assert word in lines[0], (word, lines[0])


def run_kronos(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "kronos.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_real_command_prints_exactly_one_line(files):
    for args, word in (
        ((*forecast(), "--bogus"), "--bogus"),
        (("-q", "config", "--config-path", str(files / "bad_date.yaml")), "train_time_range"),
        (("data", "-q", "--data-source", "nosuch"), "nosuch"),
    ):
        r = run_kronos(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and word in r.stderr, r.stderr


def test_forecast_output_and_plot_into_new_folders(tmp_path, capsys, one_thread):
    out = tmp_path / "not" / "yet" / "fc.csv"
    png = tmp_path / "figures" / "fc.png"
    rc = cli.main(
        forecast(
            "--symbol",
            "BBB",
            "--sample-count",
            "4",
            "--seed",
            "1",
            "--quantiles",
            "0.05,0.5,0.95",
            "--output",
            str(out),
            "--plot",
            str(png),
            input=_two_symbols(tmp_path),
        )
    )
    assert rc == 0, capsys.readouterr().err
    fc = pd.read_csv(out)
    assert {"close_q0.05", "close_q0.5", "close_q0.95", "p_up"} <= set(fc.columns)
    assert (fc["close_q0.05"] <= fc["close_q0.95"]).all() and fc["p_up"].between(0, 1).all()
    assert fc["close"].iloc[0] > 1.5 * pd.read_csv(CSV)["close"].iloc[-1]  # BBB's (doubled) prices, not AAA's
    assert png.stat().st_size > 10_000


def _two_symbols(d: Path) -> Path:
    path = d / "two.csv"
    bars = pd.read_csv(CSV)
    doubled = bars.assign(symbol="BBB", **{c: bars[c] * 2 for c in ("open", "high", "low", "close")})
    pd.concat([bars.assign(symbol="AAA"), doubled]).to_csv(path, index=False)
    return path


def test_forecast_help_shows_every_flag_with_meaning_and_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["forecast", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--symbol",
        "--quantiles",
        "--calibration",
        "--device",
        "--output",
        "--plot",
        "--top-k",
        "--top-p",
        "--sample-count",
        "--max-context",
        "--lookback",
        "--seed",
        "--T",
    ):
        assert flag in text
    for shown in (
        "(default: 512)",
        "(default: 0.9)",
        "(default: 1.0)",
        "default: 0.1,0.9",
        "default: print it",
        "0 = off (default: 0)",
    ):
        assert shown in text, shown


def test_yaml_unquoted_dates_are_read_and_saved(tmp_path):
    from kronos.config import Config

    path = tmp_path / "my.yaml"
    path.write_text("train_time_range: [2018-01-01, 2020-06-30]\ndataset_end_time: 2024-12-31\n")
    config = Config.from_file(path)
    assert config.train_time_range == ["2018-01-01", "2020-06-30"] and config.dataset_end_time == "2024-12-31"
    config.save(tmp_path / "saved.json")
    assert json.loads((tmp_path / "saved.json").read_text())["train_time_range"] == ["2018-01-01", "2020-06-30"]


def test_yaml_numbers_in_e_notation_are_numbers(tmp_path):
    # YAML 1.1 reads 4e-5 (no dot) as a string: a learning rate written so, or a config saved as .yaml, is a number
    import yaml

    from kronos.config import Config

    path = tmp_path / "lr.yaml"
    path.write_text("predictor_learning_rate: 4e-5\ntokenizer_learning_rate: 1E-4\nclip: 5\n")
    config = Config.from_file(path)
    assert (config.predictor_learning_rate, config.tokenizer_learning_rate, config.clip) == (4e-5, 1e-4, 5)
    config.save(tmp_path / "saved.yaml")  # JSON text, which YAML reads
    again = Config.from_file(tmp_path / "saved.yaml")  # (paths come back resolved)
    assert (again.predictor_learning_rate, again.tokenizer_learning_rate) == (4e-5, 1e-4)
    assert yaml.safe_load("x: 4e-5") == {"x": "4e-5"}  # PyYAML's own loader is left as it is


def test_a_python_without_the_dependencies_is_one_line(monkeypatch, capsys):
    # `python finetune/train_complete_pipeline.py` with a Python that is not the project's environment
    def missing(args):
        raise ModuleNotFoundError("No module named 'pandas'", name="pandas")

    monkeypatch.setattr(cli, "run", missing)
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Python package 'pandas' is not installed in ")
    assert sys.executable in err and "source .venv/bin/activate" in err

    def broken(args):  # a module of kronos itself missing is a bug: the traceback stays
        raise ModuleNotFoundError("No module named 'kronos.nothing'", name="kronos.nothing")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["config"])
