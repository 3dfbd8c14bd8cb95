"""Code written for the official repository keeps working with only its import changed: the official examples'
steps (load a tokenizer and a predictor, predict, predict_batch, predict without volume), in this project's words,
on the official-format checkpoints of tests/fixtures/parity-tiny, and an official pickle dataset is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "parity-tiny"
pytestmark = pytest.mark.usefixtures("one_thread")

# the official example scripts' steps; only the first line differs from `from model import ...`
EXAMPLE = """
from kronos import Kronos, KronosPredictor, KronosTokenizer, get_model_class, model_dict

tokenizer = KronosTokenizer.from_pretrained(TOKENIZER)
model = Kronos.from_pretrained(PREDICTOR)
predictor = KronosPredictor(model, tokenizer, device="cpu", max_context=512)

df = pd.read_csv(CSV)
df["timestamps"] = pd.to_datetime(df["timestamps"])
lookback, pred_len = 400, 24
x_df = df.loc[: lookback - 1, ["open", "high", "low", "close", "volume", "amount"]]
x_timestamp = df.loc[: lookback - 1, "timestamps"]
y_timestamp = df.loc[lookback : lookback + pred_len - 1, "timestamps"]
pred_df = predictor.predict(df=x_df, x_timestamp=x_timestamp, y_timestamp=y_timestamp, pred_len=pred_len,
                            T=1.0, top_p=0.9, sample_count=1, verbose=False)

starts = [0, 100, 200]
batch = predictor.predict_batch(
    df_list=[df.loc[s : s + lookback - 1, ["open", "high", "low", "close", "volume", "amount"]] for s in starts],
    x_timestamp_list=[df.loc[s : s + lookback - 1, "timestamps"] for s in starts],
    y_timestamp_list=[df.loc[s + lookback : s + lookback + pred_len - 1, "timestamps"] for s in starts],
    pred_len=pred_len, T=1.0, top_p=0.9, sample_count=1, verbose=False,
)

no_volume = predictor.predict(df=x_df[["open", "high", "low", "close"]], x_timestamp=x_timestamp,
                              y_timestamp=y_timestamp, pred_len=pred_len, T=1.0, top_p=0.9, sample_count=1,
                              verbose=False)
"""


def test_the_official_examples_run_with_only_the_import_changed():
    scope = {"pd": pd, "TOKENIZER": str(FIXTURE / "tiny" / "tokenizer"),
             "PREDICTOR": str(FIXTURE / "tiny" / "predictor"), "CSV": str(FIXTURE / "input.csv")}  # fmt: skip
    exec(compile(EXAMPLE, "official_example.py", "exec"), scope)
    pred_df, batch, no_volume = scope["pred_df"], scope["batch"], scope["no_volume"]
    assert list(pred_df.columns) == ["open", "high", "low", "close", "volume", "amount"] and len(pred_df) == 24
    assert pred_df.index.equals(pd.Index(scope["y_timestamp"]))
    assert len(batch) == 3 and all(b.shape == (24, 6) for b in batch) and np.isfinite(pred_df.to_numpy()).all()
    assert (no_volume[["volume", "amount"]].abs().to_numpy() < 1e-3).all()  # no volume: both predicted as ~0
    predictor = scope["predictor"]
    assert predictor.device == "cpu" and predictor.amt_vol == "amount" and predictor.vol_col == "volume"
    assert scope["get_model_class"]("kronos_predictor") is scope["KronosPredictor"]
    assert set(scope["model_dict"]) == {"kronos_tokenizer", "kronos", "kronos_predictor"}


def test_an_official_pickle_dataset_is_refused_in_one_line(tmp_path):
    from kronos.config import Config
    from kronos.errors import DataError
    from kronos.pipeline import KronosPipeline

    for name in ("train_data.pkl", "val_data.pkl", "test_data.pkl"):
        (tmp_path / name).write_bytes(b"\x80\x04 not loaded")  # never opened
    with pytest.raises(DataError, match=r"pickle dataset \(train_data.pkl.*never unpickles.*kronos data"):
        KronosPipeline(Config(dataset_path=str(tmp_path))).require_dataset()
