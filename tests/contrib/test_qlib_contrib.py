"""kronos.contrib.qlib: the raw-bar handler, KronosModel (predict, no look-ahead, fit through the package trainer) and
the qrun workflow of examples/qlib (slow). Skipped without pyqlib."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("qlib")
pytestmark = pytest.mark.usefixtures("one_thread")  # steadier on the shared 2-core machine

from kronos.contrib.qlib import BAR_COLUMNS, KronosBarHandler, KronosModel  # noqa: E402
from kronos.data.sources.qlib import init_qlib  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
QLIB_CN = TESTS / "fixtures" / "qlib_cn"  # 8 stocks of csi300 + two indices, 2021-01-04 .. 2024-12-31
SEGMENTS = {
    "train": ("2021-01-04", "2022-12-31"),
    "valid": ("2023-01-01", "2023-12-31"),
    "test": ("2024-10-08", "2024-10-31"),
}
POISON_AFTER = pd.Timestamp("2024-10-18")
# small and quick: short windows, few sample paths (the starter pair is tiny already)
SMALL = dict(lookback_window=30, predict_window=5, inference_sample_count=2, inference_seed=7, device="cpu")


def _dataset(provider: Path, segments: dict = SEGMENTS):
    from qlib.data.dataset import DatasetH

    init_qlib(str(provider))
    handler = KronosBarHandler(instruments="csi300", start_time="2021-01-04", end_time="2024-12-31")
    return DatasetH(handler, segments=segments)


@pytest.fixture(scope="module")
def dataset():
    return _dataset(QLIB_CN)


def test_the_handler_serves_the_raw_bars_of_every_segment(dataset):
    from qlib.data import D

    for segment, (start, end) in SEGMENTS.items():
        feats = dataset.prepare(segment, col_set="feature")
        assert list(feats.columns) == list(BAR_COLUMNS)
        days = feats.index.get_level_values("datetime")
        assert days.min() >= pd.Timestamp(start) and days.max() <= pd.Timestamp(end)
        symbols = sorted(feats.index.get_level_values("instrument").unique())
        raw = D.features(symbols, ["$open", "$high", "$low", "$close", "$volume"], start_time=start, end_time=end)
        raw.columns = ["open", "high", "low", "close", "volume"]
        raw = raw.swaplevel().sort_index()
        got = feats.sort_index()
        pd.testing.assert_frame_equal(got[raw.columns], raw.reindex(got.index), check_dtype=False)
        # no $amount field in the fixture: amount = mean(OHLC) x volume, as the package's Qlib source derives it
        derived = got[["open", "high", "low", "close"]].mean(axis=1) * got["volume"]
        np.testing.assert_allclose(got["amount"], derived, rtol=1e-5)
    label = dataset.prepare("test", col_set="label")
    assert list(label.columns) == ["LABEL0"]


def test_predict_scores_every_test_day_on_the_qlib_index(dataset):
    model = KronosModel(fit=False, **SMALL)
    pred = model.predict(dataset)
    assert isinstance(pred, pd.Series)
    assert list(pred.index.names) == ["datetime", "instrument"]
    assert pred.index.is_monotonic_increasing and not pred.index.duplicated().any()
    test = dataset.prepare("test", col_set="feature")
    assert set(pred.index) == set(test.index)  # every (day, stock) of the test segment, nothing else
    assert np.isfinite(pred.to_numpy()).all()
    p_up = KronosModel(fit=False, signal="p_up", **SMALL).predict(dataset)
    assert p_up.index.equals(pred.index) and p_up.between(0, 1).all()


def _poison(folder: Path, after: pd.Timestamp) -> None:
    """Scale every bar after ``after`` in a Qlib folder (prices x3, volume x0.2): valid bars, different values."""
    calendar = pd.DatetimeIndex(pd.read_csv(folder / "calendars" / "day.txt", header=None)[0])
    for stock in (folder / "features").iterdir():
        for name, factor in (("open", 3), ("high", 3), ("low", 3), ("close", 3), ("volume", 0.2)):
            path = stock / f"{name}.day.bin"
            data = np.fromfile(path, dtype="<f4")
            start = int(data[0])
            days = calendar[start : start + len(data) - 1]
            values = data[1:]
            values[np.asarray(days > after)] *= factor
            data.tofile(path)


def test_no_prediction_uses_a_bar_after_its_date(dataset, tmp_path):
    model = KronosModel(fit=False, **SMALL)
    clean = model.predict(dataset)
    poisoned = tmp_path / "qlib_poisoned"
    shutil.copytree(QLIB_CN, poisoned)
    _poison(poisoned, POISON_AFTER)
    try:
        after = model.predict(_dataset(poisoned))
    finally:
        init_qlib(str(QLIB_CN))
    assert after.index.equals(clean.index)
    early = clean.index.get_level_values("datetime") <= POISON_AFTER
    assert early.sum() > 0 and (~early).sum() > 0
    pd.testing.assert_series_equal(after[early], clean[early])
    assert not np.allclose(after[~early], clean[~early])  # the poison did reach the later forecasts


def test_fit_finetunes_through_the_trainer_and_stops_early_on_valid(dataset, tmp_path):
    tiny = dict(
        SMALL,
        epochs=4,
        patience=1,
        batch_size=8,
        n_train_iter=16,
        n_val_iter=16,
        log_interval=1,
        # a learning rate too small to move a weight: epoch 2's validation loss is no better than epoch 1's, so the
        # best checkpoint is epoch 1's and training stops early (patience 1) after epoch 2
        predictor_learning_rate=1e-12,
        checkpoint_interval=0,
    )
    model = KronosModel(save_path=str(tmp_path / "kept"), **tiny)
    model.fit(dataset)
    pred = model.fit_summary["predictor"]
    assert pred["stopped_early"] and pred["epochs_run"] == 2 and pred["best_epoch"] == 1
    assert (tmp_path / "kept" / "finetune_tokenizer_demo" / "checkpoints" / "best_model").is_dir()
    assert (tmp_path / "kept" / "finetune_predictor_demo" / "checkpoints" / "best_model").is_dir()
    assert model.model_in_use == "pretrained"  # keep_better: finetuning did not beat the starting predictor

    used = KronosModel(save_path=str(tmp_path / "used"), keep_better=False, **tiny)
    used.fit(dataset)
    assert used.model_in_use == "finetuned"
    assert Path(used.predictor_path) == tmp_path / "used" / "finetune_predictor_demo" / "checkpoints" / "best_model"
    pred = used.predict(dataset, segment=slice("2024-10-28", "2024-10-31"))
    assert pred.index.get_level_values("datetime").nunique() == 4


@pytest.mark.slow
def test_qrun_runs_the_kronos_workflow_into_the_recorder(tmp_path):
    data = tmp_path / "qlib_data"
    shutil.copytree(QLIB_CN, data)
    config = yaml.safe_load((REPO / "examples" / "qlib" / "workflow_config_kronos.yaml").read_text())
    config["qlib_init"]["provider_uri"] = str(data)
    config["experiment_name"] = "kronos_test"
    config["market"] = "csi300"
    config["benchmark"] = "SH000300"
    task = config["task"]
    task["model"]["kwargs"].update(
        SMALL,
        fit=True,
        epochs=1,
        batch_size=8,
        n_train_iter=16,
        n_val_iter=16,
        save_path=str(tmp_path / "models"),
    )
    handler = task["dataset"]["kwargs"]["handler"]["kwargs"]
    handler.update(instruments="csi300", start_time="2021-01-04", end_time="2024-12-31")
    task["dataset"]["kwargs"]["segments"] = {k: list(v) for k, v in SEGMENTS.items()}
    for record in task["record"]:
        if record["class"] == "PortAnaRecord":
            port = record["kwargs"]["config"]
            port["backtest"].update(start_time=SEGMENTS["test"][0], end_time="2024-10-30", benchmark="SH000300")
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(yaml.safe_dump(config))
    qrun = Path(sys.executable).parent / "qrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KRONOS_QLIB_"))}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [str(qrun), str(workflow)],  # plain qrun, as a user types it: the workflow names its own recorder
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    artifacts = {p.relative_to(p.parents[1]).as_posix() for p in (tmp_path / "mlruns").rglob("*.pkl")}
    names = {a.split("/", 1)[1] if a.startswith("artifacts/") else a for a in artifacts}
    assert "pred.pkl" in names, artifacts
    assert "sig_analysis/ic.pkl" in names and "sig_analysis/ric.pkl" in names, artifacts
    assert "portfolio_analysis/port_analysis_1day.pkl" in names, artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("kronos_test")
    run = client.search_runs([exp.experiment_id], max_results=1)[0]
    metrics = set(run.data.metrics)
    assert {"IC", "ICIR", "Rank IC"} <= metrics, metrics
    assert any("excess_return_with_cost.annualized_return" in m for m in metrics), metrics
