"""The pipeline runs a list of named steps; the CLI's --skip-* flags map onto it."""

from __future__ import annotations

import pytest

from kronos.errors import ConfigError
from kronos.pipeline import STEPS, check_steps, steps_from_flags


def test_flags_map_to_steps():
    assert steps_from_flags() == list(STEPS)
    assert steps_from_flags(skip_data=True, skip_tokenizer=True) == [
        "predictor", "calibrate", "predict", "evaluate", "backtest",
    ]  # fmt: skip
    # a reused predictor keeps its calibration: no calibrate step without the predictor step
    assert steps_from_flags(skip_predictor=True) == ["data", "tokenizer", "predict", "evaluate", "backtest"]
    assert steps_from_flags(skip_predict=True) == ["data", "tokenizer", "predictor"]
    assert steps_from_flags(skip_backtest=True)[-1] == "evaluate"


def test_steps_run_in_pipeline_order_and_unknown_names_are_refused():
    assert check_steps(["backtest", "data"]) == ["data", "backtest"]
    assert check_steps(None) == list(STEPS) and check_steps("predict") == ["predict"]
    with pytest.raises(ConfigError, match=r"unknown pipeline step\(s\) \['train'\]"):
        check_steps(["data", "train"])
