"""The complete pipeline end to end on real data (fast mode, tiny models): qlib, csv and sina sources,
the seed's flags, skip flags reusing what is on disk, the outputs layout, and the CLI's one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # end-to-end / subprocess tests: `make test-fast` skips them

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures"

TINY = {
    "lookback_window": 30,
    "predict_window": 5,
    "epochs": 1,
    "batch_size": 8,
    "n_train_iter": 48,
    "n_val_iter": 16,
    "log_interval": 2,
    "pretrained_tokenizer_path": "",
    "pretrained_predictor_path": "",
    "tokenizer_preset": "tiny",
    "predictor_preset": "tiny",
    "tokenizer_learning_rate": 0.002,
    "predictor_learning_rate": 0.002,
    "inference_sample_count": 2,
    "eval_max_anchors": 8,
    "calibration_min_forecasts": 10,  # tiny data: keep the test fast
    "plot_n_symbols": 2,
    "backtest_n_symbol_hold": 3,
    "backtest_n_symbol_drop": 1,
    "backtest_hold_thresh": 1,
    "num_workers": 0,
}


def write_config(tmp: Path, **overrides) -> Path:
    cfg = dict(TINY)
    cfg.update(
        {
            "dataset_path": "data/processed",
            "save_path": "outputs/models",
            "backtest_result_path": "outputs/backtest_results",
        }
    )
    cfg.update(overrides)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def latest_run(tmp: Path) -> Path:
    """The newest finished run folder (runs/latest) of a config written by write_config."""
    link = tmp / "outputs" / "runs" / "latest"
    assert link.is_symlink() and (tmp / "outputs" / "runs" / "LATEST").is_file()
    return link.resolve()


def run_script(args, cwd=ROOT, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


QLIB = {
    "data_source": "qlib",
    "qlib_data_path": str(DATA / "qlib_cn"),
    "instrument": "csi300",
    "dataset_begin_time": "2021-01-01",
    "dataset_end_time": "2024-12-31",
    "train_time_range": ["2021-01-01", "2023-06-30"],
    "val_time_range": ["2023-04-01", "2023-12-31"],
    "test_time_range": ["2023-10-01", "2024-12-31"],
    "backtest_time_range": ["2024-11-01", "2024-12-31"],
}


@pytest.fixture(scope="module")
def qlib_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlib_pipeline")
    cfg = write_config(tmp, **QLIB)
    # from finetune/, as the seed's guide runs it
    r = run_script(
        ["train_complete_pipeline.py", "--cpu", "--fast-mode", "--config-path", str(cfg)], cwd=ROOT / "finetune"
    )
    return tmp, cfg, r


def test_qlib_pipeline_leaves_every_output(qlib_run):
    tmp, cfg, r = qlib_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Kronos pipeline finished" in r.stdout
    run = latest_run(tmp)
    models = run / "models"
    for stage in ("finetune_tokenizer_demo", "finetune_predictor_demo"):
        best = models / stage / "checkpoints" / "best_model"
        assert (best / "config.json").is_file() and (best / "model.safetensors").is_file()
        summary = json.loads((models / stage / "summary.json").read_text())
        assert np.isfinite(summary["best_val_loss"])
        assert (models / stage / "training_curves.png").is_file()
    assert json.loads((models / "pipeline_config.json").read_text())["data_source"] == "qlib"
    res = run / "backtest_results" / "finetune_backtest_demo"
    fc = pd.read_parquet(res / "forecast_latest.parquet")
    assert (pd.to_datetime(fc["anchor"]) == pd.Timestamp("2024-12-31")).all()  # as-of bar; stale symbols elsewhere
    assert not (pd.to_datetime(fc["timestamps"]) == pd.Timestamp("2025-01-01")).any()  # XSHG calendar: a holiday
    assert fc["symbol"].nunique() >= 3 and set(fc["step"]) == set(range(1, 6))
    assert {"close", "close_q0.1", "close_q0.9"} <= set(fc.columns)
    assert (fc["close_q0.1"] <= fc["close_q0.9"] + 1e-9).all()
    assert (res / "forecast_latest.csv").is_file()
    assert len(list((res / "plots").glob("forecast_*.png"))) == 2
    # the walk-forward report: the model in use beside the baselines on the same test anchors
    report = json.loads((res / "report.json").read_text())
    assert (res / "report.md").is_file()
    in_use = report["model_in_use"]
    assert in_use == "finetuned"  # no pretrained paths: the finetuned model is the run's only model
    forecasters = report["forecasters"]
    assert {in_use, "last_value", "random_walk", "drift"} <= set(forecasters)
    assert forecasters[in_use]["kind"] == "model"
    assert all(forecasters[name]["kind"] == "baseline" for name in ("last_value", "random_walk", "drift"))
    anchors = report["anchors"]
    assert anchors["n_forecasts"] >= anchors["n_dates"] >= 1 and anchors["n_symbols"] >= 2
    # every target after the last validation bar and within the test split
    assert (
        pd.Timestamp(report["splits"]["val_end"])
        <= pd.Timestamp(anchors["first"])
        <= pd.Timestamp(anchors["last"])
        < pd.Timestamp(report["splits"]["test_end"])
    )
    headline = report["headline"]
    assert headline["model_in_use"] == in_use
    for name in (in_use, "last_value", "random_walk", "drift"):
        scores = headline[name]
        assert np.isfinite(scores["crps_rel"]) and scores["crps_rel"] > 0, (name, scores)
        assert np.isfinite(scores["mae_ret"]) and scores["mae_ret"] > 0, (name, scores)
    # metrics.json holds the report's headline numbers of the model in use, whatever their names
    metrics = json.loads((res / "metrics.json").read_text())
    assert headline[in_use] and metrics.items() >= headline[in_use].items()
    # ... and so do pipeline_result.json and the console: one set of model numbers everywhere
    result = json.loads((res / "pipeline_result.json").read_text())
    assert result["report_headline"] == headline and result["metrics"]["ic"] == metrics["ic"]
    printed = next(line for line in r.stdout.splitlines() if line.strip().startswith(f"{in_use} "))
    assert f"crps_rel={metrics['crps_rel']:.4g}" in printed and f"mase={metrics['mase']:.4g}" in printed
    assert printed.count("ic=") <= 1 and "model/" not in r.stdout
    # adaptive bands: the validation fit rescaled by the outcomes realised up to each anchor, saved for the service
    calibration = report["calibration"][in_use]
    adaptive = calibration["adaptive"]
    assert adaptive and adaptive["half_life_bars"] == 60 and adaptive["n_outcomes"] > 0
    assert pd.Timestamp(adaptive["last_outcome"]) <= pd.Timestamp(report["splits"]["test_end"])
    assert (
        "vol_scaled_adaptive" in calibration["candidates"]
        and "Bands adapted to realised outcomes" in (res / "report.md").read_text()
    )
    best = models / "finetune_predictor_demo" / "checkpoints"
    outcomes = pd.read_parquet(best / "calibration_outcomes.parquet")
    assert pd.to_datetime(outcomes["target"]).max() > pd.Timestamp(report["splits"]["val_end"])  # test included
    records = pd.read_parquet(res / "forecast_records.parquet")  # the backtest's signals: the same test pass
    assert records["anchor"].nunique() == anchors["n_dates"] and len(records) == anchors["n_forecasts"] * 5
    # the top-k backtest of each signal: its report, also gathered in comparison.json
    bt = res / "backtest"
    assert list(bt.rglob("*.png")), "backtest plot missing"
    comparison = json.loads((bt / "comparison.json").read_text())
    assert set(comparison) == {"last", "mean", "max", "min"}
    for signal, summary in comparison.items():
        assert json.loads((bt / signal / "report.json").read_text()) == summary
    assert not list(tmp.rglob("*.pkl")) and not list(tmp.rglob("*.pickle"))


def test_evaluate_and_backtest_on_the_run_reuse_its_config_and_forecasts(qlib_run):
    """`kronos evaluate` and `kronos backtest` with no flags, beside the run's outputs: the latest run's saved
    config and test pass, no new forecasts, the pipeline's numbers."""
    tmp, _, r = qlib_run
    assert r.returncode == 0, r.stderr[-3000:]
    res = latest_run(tmp) / "backtest_results" / "finetune_backtest_demo"
    before = json.loads((res / "report.json").read_text())
    backtest_before = json.loads((res / "backtest" / "comparison.json").read_text())
    ev = run_script(["-m", "kronos.cli", "evaluate"], cwd=tmp)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "with its saved config" in ev.stderr and "reusing the run's test pass" in ev.stderr
    assert "test pass:" not in ev.stderr and "forecast:" not in ev.stderr  # nothing forecast again
    after = json.loads((res / "report.json").read_text())
    assert after["headline"] == before["headline"] and after["anchors"] == before["anchors"]
    bt = run_script(["-m", "kronos.cli", "backtest"], cwd=tmp)
    assert bt.returncode == 0, bt.stderr[-3000:]
    assert "reusing the run's forecast records" in bt.stderr and "forecast:" not in bt.stderr
    after_bt = json.loads((res / "backtest" / "comparison.json").read_text())
    assert set(after_bt) == set(backtest_before)
    for signal, stats in backtest_before.items():  # Qlib's sums may differ in the last bits, nothing more
        for key, value in stats.items():
            if isinstance(value, float):
                assert after_bt[signal][key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
            else:
                assert after_bt[signal][key] == value, key


def test_skip_flags_reuse_what_is_on_disk(qlib_run):
    tmp, cfg, r = qlib_run
    assert r.returncode == 0
    first = latest_run(tmp)
    best = first / "models/finetune_predictor_demo/checkpoints/best_model/model.safetensors"
    before = best.stat().st_mtime_ns
    r2 = run_script(
        [
            "finetune/train_complete_pipeline.py",
            "--cpu",
            "--fast-mode",
            "--config-path",
            str(cfg),
            "--skip-data-process",
            "--skip-tokenizer",
            "--skip-predictor",
        ]
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert best.stat().st_mtime_ns == before  # models untouched, prediction redone
    assert "==== data ====" not in r2.stderr and "==== predict ====" in r2.stderr
    second = latest_run(tmp)  # a new run folder: the first run's results are not overwritten
    assert second != first and (first / "backtest_results/finetune_backtest_demo/metrics.json").is_file()
    result = json.loads((second / "backtest_results/finetune_backtest_demo/pipeline_result.json").read_text())
    assert result["predictor_path"].startswith(str(first)) and result["run_id"] == second.name
    # `kronos backtest` alone works on the latest run and reuses its saved forecast records: it needs no model
    (first / "models").rename(first / "models-away")
    try:
        r3 = run_script(["-m", "kronos.cli", "backtest", "--config-path", str(cfg), "--cpu"])
    finally:
        (first / "models-away").rename(first / "models")
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert f"working on run {second.name}" in r3.stderr and "reusing the run's forecast records" in r3.stderr
    assert str(second / "backtest_results/finetune_backtest_demo/backtest") in r3.stdout


def test_skip_flags_say_what_is_missing(tmp_path):
    cfg = write_config(tmp_path, **QLIB)
    r = run_script(["finetune/train_complete_pipeline.py", "--cpu", "--config-path", str(cfg), "--skip-data-process"])
    assert r.returncode == 1
    assert "no processed dataset" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert not list((tmp_path / "outputs").rglob("*.json"))  # a run that stopped at once leaves no run folder


def test_csv_pipeline(tmp_path):
    raw = pd.read_csv(DATA / "kline_5min.csv")
    folder = tmp_path / "klines"
    folder.mkdir()
    raw.to_csv(folder / "AAA.csv", index=False)
    other = raw.copy()
    for c in ("open", "high", "low", "close"):
        other[c] = other[c] * 1.5
    other.to_parquet(folder / "BBB.parquet")
    # a symbol is data, never a path: this one would write <tmp_path>/ESCAPED.png through forecast_<symbol>.png
    hostile = "x/" + "../" * 40 + str(tmp_path.relative_to(tmp_path.anchor) / "ESCAPED")
    raw.assign(symbol=hostile).to_csv(folder / "long.csv", index=False)
    # with split_ratios the test and backtest periods are the test split (no date ranges needed)
    cfg = write_config(
        tmp_path, data_source="csv", csv_data_path="klines", split_ratios=[0.6, 0.2, 0.2], plot_n_symbols=3
    )
    before = set(tmp_path.iterdir())
    r = run_script(
        [
            "finetune/train_complete_pipeline.py",
            "--cpu",
            "--fast-mode",
            "--data-source",
            "csv",
            "--config-path",
            str(cfg),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(tmp_path.iterdir()) - before == {tmp_path / "data", tmp_path / "outputs"}  # nothing outside
    run = latest_run(tmp_path)
    assert (run / "models" / "pipeline_config.json").is_file()
    res = run / "backtest_results/finetune_backtest_demo"
    plots = sorted(p.name for p in (res / "plots").iterdir())
    assert len(plots) == 3 and "forecast_AAA.png" in plots and all(p.startswith("forecast_") for p in plots)
    fc = pd.read_parquet(res / "forecast_latest.parquet")
    assert set(fc["symbol"]) == {"AAA", "BBB", hostile}
    # 5-minute bars: the forecast continues inside trading hours
    times = pd.to_datetime(fc["timestamps"]).dt.strftime("%H:%M")
    assert times.isin(pd.to_datetime(raw["timestamps"]).dt.strftime("%H:%M")).all()
    assert (res / "metrics.json").is_file()


def test_sina_pipeline_against_loopback_server(tmp_path):
    from _support.sina_server import SinaTestServer

    with SinaTestServer() as server:
        cfg = write_config(
            tmp_path,
            data_source="sina",
            sina_symbols=["sh600000", "sz000001"],
            sina_scale=5,
            sina_base_url=server.jsonp_url,
            sina_pause=0.0,
            sina_retries=1,
            sina_timeout=5.0,
            split_ratios=[0.6, 0.2, 0.2],
        )  # test and backtest periods: the test split
        r = run_script(
            [
                "finetune/train_complete_pipeline.py",
                "--cpu",
                "--fast-mode",
                "--data-source",
                "sina",
                "--config-path",
                str(cfg),
                "--skip-backtest",
            ]
        )
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "data/processed/manifest.json").read_text())
    assert sorted(manifest["symbols"]) == ["sh600000", "sz000001"]
    fc = pd.read_parquet(latest_run(tmp_path) / "backtest_results/finetune_backtest_demo/forecast_latest.parquet")
    assert set(fc["symbol"]) == {"sh600000", "sz000001"}


def test_bad_config_key_is_one_line(tmp_path):
    cfg = write_config(tmp_path, lookback_windw=10)
    r = run_script(["finetune/train_complete_pipeline.py", "--cpu", "--config-path", str(cfg)])
    assert r.returncode == 1
    assert "lookback_windw" in r.stderr and "lookback_window" in r.stderr
    assert "Traceback" not in r.stderr


def test_pipeline_under_torchrun_two_processes(tmp_path):
    """Training stages run distributed (gloo), data/predict/backtest on rank 0 between barriers."""
    cfg = write_config(tmp_path, **QLIB)
    r = run_script(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "finetune/train_complete_pipeline.py",
            "--cpu",
            "--fast-mode",
            "--config-path",
            str(cfg),
            "--skip-backtest",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Kronos pipeline finished") == 1  # only rank 0 reports
    for stage in ("finetune_tokenizer_demo", "finetune_predictor_demo"):
        summary = json.loads((latest_run(tmp_path) / "models" / stage / "summary.json").read_text())
        assert summary["world_size"] == 2
    assert (latest_run(tmp_path) / "backtest_results/finetune_backtest_demo/forecast_latest.parquet").is_file()
    assert len([d for d in (tmp_path / "outputs" / "runs").iterdir() if not d.is_symlink() and d.is_dir()]) == 1


def test_summary_counts_every_png_and_logs_name_no_temporary_path(qlib_run):
    import re

    tmp, cfg, r = qlib_run
    assert r.returncode == 0, r.stderr[-3000:]
    first = min(d for d in (tmp / "outputs" / "runs").iterdir() if d.is_dir() and not d.is_symlink())
    written = sorted(first.rglob("*.png"))  # the fixture's run (a later test adds a run of its own)
    reported = re.search(r"plots:\s+(\d+) PNG files", r.stdout)
    assert reported and int(reported.group(1)) == len(written), (r.stdout, written)
    names = {p.name for p in written}
    assert {"forecast_vs_actual.png", "ic_over_time.png", "comparison.png", "cumulative_return.png"} <= names
    assert ".tmp-" not in r.stderr and ".tmp-" not in r.stdout  # logs name final paths, never temporaries
    assert "saved" in r.stderr and "best_model" in r.stderr


def test_training_curve_titles_name_the_stage(tmp_path, monkeypatch):
    import kronos.pipeline
    from kronos.config import Config
    from kronos.pipeline import KronosPipeline

    titles = {}
    monkeypatch.setattr(
        kronos.pipeline,
        "plot_training_curves",
        lambda path, out, title="": titles.setdefault(Path(out).parent.name, title),
    )
    pipe = KronosPipeline(Config())
    for stage, name in (("tok", "tokenizer training"), ("pred", "predictor training")):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n')
        pipe._plot_curves(str(tmp_path / stage), name)
    assert titles["tok"].startswith("tokenizer training") and titles["pred"].startswith("predictor training")


def test_one_symbol_pipeline_says_what_it_skips(tmp_path):
    # thin data: one symbol has no cross-section, so no IC and no top-k backtest; the run says so (log, summary,
    # metrics.json, pipeline_result.json) instead of reporting NaN IC or a one-name "top-50"
    folder = tmp_path / "klines"
    folder.mkdir()
    pd.read_csv(DATA / "kline_5min.csv").to_csv(folder / "ONLY.csv", index=False)
    cfg = write_config(
        tmp_path,
        data_source="csv",
        csv_data_path="klines",
        split_ratios=[0.6, 0.2, 0.2],
        backtest_n_symbol_hold=50,
        eval_max_anchors=30,
        calibration_min_forecasts=10,  # tiny data: keep the test fast
    )  # test and backtest: the test split
    r = run_script(["-m", "kronos.cli", "pipeline", "--cpu", "--fast-mode", "--config-path", str(cfg)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "backtest skipped" in r.stderr and "IC and RankIC not computed" in r.stderr  # the log
    assert "note:" in r.stdout and "backtest skipped" in r.stdout and " ic=" not in r.stdout  # the summary
    metrics = json.loads(next((tmp_path / "outputs").rglob("metrics.json")).read_text())
    assert metrics["ic"] is None and "1 symbol" in metrics["ic_note"]
    result = json.loads(next((tmp_path / "outputs").rglob("pipeline_result.json")).read_text())
    assert any(n.startswith("backtest skipped") for n in result["notes"]) and result["backtest_summary"] == {}
    assert not list((tmp_path / "outputs").rglob("comparison.json"))
    figures = {p.name for p in (tmp_path / "outputs").rglob("*.png")}
    assert "forecast_vs_actual.png" in figures and "ic_over_time.png" not in figures  # no cross-section, no IC


@pytest.mark.parametrize("n_symbols, hold, drop", [(2, 1, 1), (3, 1, 1), (10, 5, 2), (200, 50, 2)])
def test_topk_fits_the_symbols_there_are(n_symbols, hold, drop):
    from kronos.config import Config
    from kronos.pipeline import KronosPipeline

    pipe = KronosPipeline(Config(backtest_n_symbol_hold=50, backtest_n_symbol_drop=2))
    cfg = pipe._backtest_config(n_symbols)
    assert (cfg.backtest_n_symbol_hold, cfg.backtest_n_symbol_drop) == (hold, drop)
    assert pipe.config.backtest_n_symbol_hold == 50  # the run's own config is left as it is
    assert bool(pipe.result.notes) == (n_symbols < 100)
    assert pipe._backtest_config(1) is None and pipe.result.notes[-1].startswith("backtest skipped")


def test_skipped_calibration_is_a_note(monkeypatch):
    from kronos.config import Config
    from kronos.errors import InputError
    from kronos.pipeline import KronosPipeline

    pipe = KronosPipeline(Config())

    def too_few():
        raise InputError("calibration needs at least 10 validation anchors ..., found 8")

    monkeypatch.setattr(pipe, "calibrate", too_few)
    pipe._calibrate_step()
    assert pipe.result.notes == [
        "calibration skipped (bands stay uncalibrated): calibration needs at least 10 validation anchors ..., found 8"
    ]


def test_a_config_with_the_49_official_names_trains_the_predictor_on_its_own_runs_tokenizer(tmp_path):
    """Every field name of the official finetune/config.py, explicit finetuned paths included (as the official
    Config sets them): the pipeline runs end to end and the predictor learns the tokens of the tokenizer this run
    trained, written where finetuned_tokenizer_path says."""
    tok = "outputs/models/finetune_tokenizer_demo/checkpoints/best_model"
    pred = "outputs/models/finetune_predictor_demo/checkpoints/best_model"
    official = {
        "qlib_data_path": str(DATA / "qlib_cn"), "instrument": "csi300", "dataset_begin_time": "2021-01-01",
        "dataset_end_time": "2024-12-31", "lookback_window": 30, "predict_window": 5, "max_context": 512,
        "feature_list": ["open", "high", "low", "close", "vol", "amt"],
        "time_feature_list": ["minute", "hour", "weekday", "day", "month"],
        "train_time_range": ["2021-01-01", "2023-06-30"], "val_time_range": ["2023-04-01", "2023-12-31"],
        "test_time_range": ["2023-10-01", "2024-12-31"], "backtest_time_range": ["2024-11-01", "2024-12-31"],
        "dataset_path": "data/processed", "clip": 5.0, "epochs": 1, "log_interval": 2, "batch_size": 8,
        "n_train_iter": 48, "n_val_iter": 16, "tokenizer_learning_rate": 0.002, "predictor_learning_rate": 0.002,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_weight_decay": 0.1, "accumulation_steps": 1,
        "save_path": "outputs/models", "tokenizer_save_folder_name": "finetune_tokenizer_demo",
        "predictor_save_folder_name": "finetune_predictor_demo", "backtest_save_folder_name": "finetune_backtest_demo",
        "backtest_result_path": "outputs/backtest_results", "pretrained_tokenizer_path": "",
        "pretrained_predictor_path": "", "finetuned_tokenizer_path": tok, "finetuned_predictor_path": pred,
        "backtest_n_symbol_hold": 3, "backtest_n_symbol_drop": 1, "backtest_hold_thresh": 1, "inference_T": 0.6,
        "inference_top_p": 0.9, "inference_top_k": 0, "inference_sample_count": 2, "backtest_batch_size": 1000,
        "backtest_benchmark": "SH000300", "use_comet": False,
        "comet_config": {"api_key": "", "project_name": "Kronos-Finetune-Demo", "workspace": ""},
        "comet_tag": "finetune_demo", "comet_name": "finetune_demo", "seed": 100,
    }  # fmt: skip
    assert len(official) == 49
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**official, "eval_max_anchors": 8, "calibration_min_forecasts": 10,
                               "tokenizer_preset": "tiny", "predictor_preset": "tiny", "num_workers": 0}))  # fmt: skip
    r = run_script(["-m", "kronos.cli", "pipeline", "--cpu", "--fast-mode", "--config-path", str(cfg)])
    assert r.returncode == 0, r.stderr[-3000:]
    tok_dir, pred_dir = tmp_path / tok, tmp_path / pred
    from kronos.model import KronosTokenizer
    from kronos.model.hub import weights_sha256

    sha = weights_sha256(KronosTokenizer.from_pretrained(str(tok_dir)))
    card = json.loads((pred_dir / "model_card.json").read_text())
    assert card["tokenizer"] == {"path": str(tok_dir), "tokenizer_sha256": sha}
    assert f"tokenising with the frozen tokenizer at {tok_dir} (weights sha256 {sha[:12]})" in r.stderr
    assert f"tokenizer {tok_dir} (trained now)" in r.stderr and "Kronos pipeline finished" in r.stdout
    assert str(pred_dir) in r.stdout  # the summary names the predictor that exists
