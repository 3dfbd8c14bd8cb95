"""An explicit finetuned_*_path means "this run's checkpoint lives here": trained stages write there, the predictor
tokenises with that tokenizer, and a run folder does not move it (official configs set both paths)."""

from __future__ import annotations

import json
import logging

import pytest

from _support.training import tiny_config
from kronos.model import KronosTokenizer
from kronos.model.hub import CARD_NAME, weights_sha256
from kronos.pipeline import KronosPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explicit_paths_receive_this_runs_checkpoints_and_the_predictor_uses_its_tokenizer(dataset, tmp_path, caplog):
    tok_dir, pred_dir = tmp_path / "official" / "tok" / "best_model", tmp_path / "official" / "pred" / "best_model"
    paths = dict(finetuned_tokenizer_path=str(tok_dir), finetuned_predictor_path=str(pred_dir), run_folders=True,
                 backtest_result_path=str(tmp_path / "res"))  # fmt: skip
    cfg = tiny_config(tmp_path, dataset, epochs=1, **paths)
    with caplog.at_level(logging.INFO):
        first = KronosPipeline(cfg).run(["tokenizer", "predictor"])
    old_sha = weights_sha256(KronosTokenizer.from_pretrained(str(tok_dir)))  # the first run's, at the explicit path
    again = tiny_config(tmp_path, dataset, epochs=1, seed=8, **paths)
    with caplog.at_level(logging.INFO):
        second = KronosPipeline(again).run(["tokenizer", "predictor"])
    assert first.run_id != second.run_id and second.tokenizer_path == str(tok_dir)
    new_sha = weights_sha256(KronosTokenizer.from_pretrained(str(tok_dir)))
    assert new_sha != old_sha  # the second run's tokenizer replaced the first's at the explicit path
    card = json.loads((pred_dir / CARD_NAME).read_text())
    assert card["tokenizer"] == {"path": str(tok_dir), "tokenizer_sha256": new_sha}  # trained on this run's tokens
    assert f"tokenising with the frozen tokenizer at {tok_dir} (weights sha256 {new_sha[:12]})" in caplog.text
    assert f"tokenizer {tok_dir} (trained now)" in caplog.text
    # the stages' own files (last/, summaries) stay in each run's folder
    run_models = tmp_path / "runs" / second.run_id / "out"
    assert (run_models / cfg.predictor_save_folder_name / "summary.json").is_file()
