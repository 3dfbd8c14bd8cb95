"""The committed starter pair (examples/models/starter) and its recipe (kronos.train.starter, `make starter`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kronos.model import Kronos, KronosTokenizer
from kronos.model.hub import CARD_NAME, data_cutoff, weights_sha256
from kronos.train.starter import DATA_CUTOFF, build_starter

REPO = Path(__file__).resolve().parents[2]
STARTER = REPO / "examples" / "models" / "starter"
QLIB = REPO / "tests" / "fixtures" / "qlib_cn"


@pytest.mark.parametrize("stage,cls", [("tokenizer", KronosTokenizer), ("predictor", Kronos)])
def test_the_committed_starter_loads_and_its_card_matches_its_weights(stage, cls):
    folder = STARTER / stage
    model = cls.from_pretrained(folder)
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["weights_sha256"] == weights_sha256(model)
    assert card["shape"] == json.loads((folder / "config.json").read_text()) == dict(model.config)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["data"]["cutoff"] == card["data_end"] == card["data"]["last_bar"] == DATA_CUTOFF
    assert card["data"]["frequency"] == "1d" and card["data"]["n_symbols"] == len(card["data"]["symbols"]) > 50
    t = card["training"]
    assert t["seed"] == 100 and t["steps"] > 0 and t["best_val_loss"] > 0 and t["final_train_loss"] > 0
    assert "make starter" in card["rebuild"] or "build_starter" in card["rebuild"]
    assert data_cutoff(folder) == (DATA_CUTOFF, f"model card {folder / CARD_NAME}")


def test_the_starter_pair_fits_together_and_in_the_size_budget():
    tok = KronosTokenizer.from_pretrained(STARTER / "tokenizer")
    pred = Kronos.from_pretrained(STARTER / "predictor")
    assert tok.s1_bits == pred.s1_bits and tok.s2_bits == pred.s2_bits
    size = sum(p.stat().st_size for p in STARTER.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024


def test_one_step_of_the_recipe_runs_and_repeats_exactly(tmp_path):
    """The recipe on other data (the test fixture's years): one optimizer step per stage, twice: same weights."""
    dates = {
        "dataset_begin_time": "2021-01-01",
        "dataset_end_time": "2023-12-31",
        "train_time_range": ["2021-01-01", "2022-12-31"],
        "val_time_range": ["2023-01-01", "2023-06-30"],
        "test_time_range": ["2023-07-01", "2023-12-31"],
        "lookback_window": 30,
        "predict_window": 5,
        "batch_size": 8,
        "n_val_iter": 16,
        "instrument": "all",
    }
    one = {"epochs": 1, "n_train_iter": 8}
    shas = []
    for run in ("a", "b"):
        cards = build_starter(
            str(QLIB),
            str(tmp_path / run / "out"),
            str(tmp_path / run / "work"),
            stage_overrides={"tokenizer": one, "predictor": one},
            recipe_overrides=dates,
        )
        assert cards["predictor"]["training"]["steps"] == 1 and cards["tokenizer"]["training"]["steps"] == 1
        assert cards["predictor"]["data_end"] == "2023-12-29"  # the last trading day of the data given
        model = Kronos.from_pretrained(tmp_path / run / "out" / "predictor")
        assert weights_sha256(model) == cards["predictor"]["weights_sha256"]
        shas.append((cards["tokenizer"]["weights_sha256"], cards["predictor"]["weights_sha256"]))
    assert shas[0] == shas[1]
