"""keep_better: a finetuned model that is worse than its start on validation is not the run's model; and the
zero-shot row is marked in-sample when the starting model's data reach the test targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _support.models import save_tiny_pair
from _support.training import tiny_config
from kronos.model import Kronos, KronosTokenizer
from kronos.model.hub import CARD_NAME
from kronos.pipeline import KronosPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("kb")
    tok, _ = save_tiny_pair(root / "start" / "tokenizer", root / "start" / "predictor", seed=0)
    with torch.no_grad():  # a broken copy: every decoded bar 20 standard deviations off
        tok.head.bias += 20.0
    tok.save_pretrained(root / "broken" / "tokenizer")
    return root, dataset


def _pipeline(tmp_path, setup, finetuned_tokenizer, **kw):
    root, dataset = setup
    base = dict(
        lookback_window=20,
        predict_window=3,
        inference_sample_count=4,
        eval_stride=5,
        eval_max_anchors=8,
        calibration_min_forecasts=10,  # tiny data: keep the test fast
        run_folders=False,
        backtest_result_path=str(tmp_path / "bt"),
        pretrained_tokenizer_path=str(root / "start" / "tokenizer"),
        pretrained_predictor_path=str(root / "start" / "predictor"),
    )
    cfg = tiny_config(tmp_path, dataset, **{**base, **kw})
    # the run's finetuned pair: the given tokenizer and the start's predictor weights
    KronosTokenizer.from_pretrained(finetuned_tokenizer).save_pretrained(cfg.finetuned_tokenizer)
    Kronos.from_pretrained(root / "start" / "predictor").save_pretrained(cfg.finetuned_predictor)
    return KronosPipeline(cfg)


def test_a_worse_finetuned_model_is_not_used(tmp_path, setup):
    root, _ = setup
    pipe = _pipeline(tmp_path, setup, root / "broken" / "tokenizer")
    cals = pipe.calibrate()
    assert set(cals) == {"finetuned", "zero_shot"}
    sel = json.loads(pipe.selection_path().read_text())
    val = sel["validation"]
    # the broken model is worse on its raw paths; calibration (median shrunk to the last close, same spread) can
    # leave the two with the same bands, and then the raw paths decide
    assert val["finetuned"]["crps_rel"] > val["zero_shot"]["crps_rel"]
    assert val["finetuned"]["crps_rel_calibrated"] >= val["zero_shot"]["crps_rel_calibrated"] * (1 - 1e-9)
    assert sel["model_in_use"] == "zero_shot" and "did not help" in sel["reason"]
    assert pipe.result.model_in_use == "zero_shot"
    assert any("did not help" in n for n in pipe.result.notes)
    # forecasts and calibration follow: the starting pair and its own calibration file
    assert pipe.load_predictor() is pipe.starting_predictor()
    assert pipe.load_calibration() is not None and pipe.calibration_file("zero_shot").is_file()
    # the service reads the same choice from the run's files
    from kronos.serve.run import RunFolder

    pipe.config.save(Path(pipe.config.save_path) / "pipeline_config.json")
    run = RunFolder(pipe.config.save_path)
    assert run.model_in_use == "zero_shot" and Path(run.predictor) == root / "start" / "predictor"
    assert run.calibration.endswith("zero_shot_calibration.json")

    # keep_better false: the finetuned model is used anyway, and the run says so
    pipe = _pipeline(tmp_path / "off", setup, root / "broken" / "tokenizer", keep_better=False)
    pipe.calibrate()
    assert pipe.result.model_in_use == "finetuned"
    assert any("keep_better is false" in n for n in pipe.result.notes)


def test_a_better_finetuned_model_is_kept_and_the_cutoff_marks_in_sample_rows(tmp_path, setup):
    root, _ = setup
    # the start is the broken pair this time (its tokenizer decodes far off), the finetuned one is sound
    pipe = _pipeline(
        tmp_path, setup, root / "start" / "tokenizer", pretrained_tokenizer_path=str(root / "broken" / "tokenizer")
    )
    pipe.calibrate()
    assert pipe.result.model_in_use == "finetuned"
    # the starting model's card says it saw data into the test split (2024-06-30): its row is in-sample
    (root / "start" / "predictor" / CARD_NAME).write_text(json.dumps({"data_end": "2024-06-30"}))
    try:
        report = pipe.report()
    finally:
        (root / "start" / "predictor" / CARD_NAME).unlink()
    assert report["zero_shot_cutoff"]["in_sample"] is True
    assert report["headline"]["zero_shot_in_sample"] is True
    assert any("in-sample" in n for n in pipe.result.notes)
    md = Path(report["files"]["markdown"]).read_text()
    assert "zero_shot (IN-SAMPLE)" in md and "finetuned (in use)" in md
    h = report["headline"]
    for name in ("finetuned", "zero_shot"):
        assert h[name]["crps_rel_calibrated"] > 0 and h[name]["crps_rel"] > 0
    assert h["random_walk"]["crps_rel"] > 0 and 0 <= h["dm_finetuned_vs_zero_shot"]["p_value"] <= 1
    # without a card the cutoff is unknown unless the config names it
    report = pipe.report()
    assert report["zero_shot_cutoff"]["data_end"] is None and report["zero_shot_cutoff"]["in_sample"] is None
    pipe.config.update({"pretrained_data_end": "2023-01-31"})
    report = pipe.report()
    assert report["zero_shot_cutoff"]["in_sample"] is False
