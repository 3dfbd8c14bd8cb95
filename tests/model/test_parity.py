"""Parity with the official Kronos implementation on the tiny fixture checkpoints (every manifest case).

The fixture (tests/fixtures/parity-tiny, see its README.md) holds checkpoints saved by the official code and the
official outputs for greedy forecasts, tokenizer encode/decode and state dicts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kronos.inference import KronosPredictor
from kronos.model import Kronos, KronosTokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "parity-tiny"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text(encoding="utf-8"))
CASES = MANIFEST["cases"]
REL_TOL = min(MANIFEST["comparison"]["rel_tol"], 1e-4)  # the brief asks for <= 1e-4 in addition to the manifest
COLUMNS = ["open", "high", "low", "close", "volume", "amount"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_err(got: np.ndarray, expected: np.ndarray, eps: float) -> float:
    return float(np.max(np.abs(got - expected) / (np.abs(expected) + eps)))


@pytest.fixture(scope="module")
def models():
    ckpt = MANIFEST["checkpoints"]["tiny"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixture checkpoints must load without any warning
        tokenizer = KronosTokenizer.from_pretrained(FIXTURE / ckpt["tokenizer"])
        model = Kronos.from_pretrained(FIXTURE / ckpt["predictor"])
    return tokenizer, model


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(FIXTURE / MANIFEST["input_csv"], parse_dates=["timestamps"])


def test_manifest_kinds_are_all_handled():
    assert {c["kind"] for c in CASES} <= {"predict", "predict_batch", "tokenizer_encode", "tokenizer_decode",
                                          "state_dict"}  # fmt: skip
    assert len(CASES) >= 10


def _series(frame: pd.DataFrame, start: int, length: int, pred_len: int, columns: list[str]):
    ctx = frame.iloc[start : start + length].reset_index(drop=True)
    future = frame.iloc[start + length : start + length + pred_len].reset_index(drop=True)
    return ctx[columns], ctx["timestamps"], future["timestamps"]


FORECAST_CASES = [c for c in CASES if c["kind"] in ("predict", "predict_batch")]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("case", FORECAST_CASES, ids=[c["name"] for c in FORECAST_CASES])
def test_forecast_matches_official(case, use_cache, models, frame):
    tokenizer, model = models
    predictor = KronosPredictor(model, tokenizer, device="cpu", max_context=case["max_context"], clip=case["clip"])
    kwargs = dict(T=case["T"], top_k=case["top_k"], top_p=case["top_p"], sample_count=case["sample_count"],
                  verbose=False, use_cache=use_cache)  # fmt: skip
    specs = case["series"] if case["kind"] == "predict_batch" else [case]
    inputs = [_series(frame, s["context_start"], s["context_len"], case["pred_len"], case["columns"]) for s in specs]
    if case["kind"] == "predict":
        df, xt, yt = inputs[0]
        rows = case.get("y_timestamps_rows")
        if rows:
            assert list(yt) == list(frame["timestamps"].iloc[rows[0] : rows[1]])
        outputs = [predictor.predict(df, xt, yt, case["pred_len"], **kwargs)]
    else:
        dfs, xts, yts = (list(v) for v in zip(*inputs))
        outputs = predictor.predict_batch(dfs, xts, yts, case["pred_len"], **kwargs)
    assert len(outputs) == len(case["expected"])
    eps = case.get("eps", MANIFEST["comparison"]["eps"])
    for got, (_, _, yt), expected_file in zip(outputs, inputs, case["expected"]):
        expected = pd.read_csv(FIXTURE / expected_file)
        assert list(got.columns) == COLUMNS
        assert list(got.index) == list(yt)
        assert _rel_err(got[COLUMNS].to_numpy(), expected[COLUMNS].to_numpy(), eps) <= REL_TOL


TOKENIZER_CASES = [c for c in CASES if c["kind"].startswith("tokenizer_")]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=[c["name"] for c in TOKENIZER_CASES])
def test_tokenizer_matches_official(case, models):
    tokenizer, _ = models
    with torch.inference_mode():
        if case["kind"] == "tokenizer_encode":
            x = torch.from_numpy(np.load(FIXTURE / case["input"]))
            s1, s2 = tokenizer.encode(x, half=case["half"])
            assert s1.dtype == torch.int64 and s2.dtype == torch.int64
            np.testing.assert_array_equal(s1.numpy(), np.load(FIXTURE / case["expected_s1"]))
            np.testing.assert_array_equal(s2.numpy(), np.load(FIXTURE / case["expected_s2"]))
        else:
            s1 = torch.from_numpy(np.load(FIXTURE / case["input_s1"]))
            s2 = torch.from_numpy(np.load(FIXTURE / case["input_s2"]))
            got = tokenizer.decode([s1, s2], half=case["half"]).numpy()
            expected = np.load(FIXTURE / case["expected"])
            assert got.shape == expected.shape and got.dtype == np.float32
            eps = case.get("eps", MANIFEST["comparison"]["eps"])
            assert _rel_err(got, expected, eps) <= REL_TOL


STATE_CASES = [c for c in CASES if c["kind"] == "state_dict"]


@pytest.mark.parametrize("case", STATE_CASES, ids=[c["name"] for c in STATE_CASES])
def test_state_dict_matches_checkpoint_file(case, models):
    tokenizer, model = models
    module = tokenizer if case["component"] == "tokenizer" else model
    folder = FIXTURE / MANIFEST["checkpoints"][case["checkpoint"]][case["component"]]
    stored = load_file(str(folder / "model.safetensors"))
    state = module.state_dict()
    assert sorted(state) == sorted(stored)
    for key, value in stored.items():
        assert state[key].shape == value.shape, key
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert module.config == config
