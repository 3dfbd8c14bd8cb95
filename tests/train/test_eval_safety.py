"""Training numbers you can trust: official epoch size, causal validation loss, resume and best-model safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _support.models import tiny_pair
from _support.training import qlib_frame, tiny_config
from kronos.data.windows import WindowDataset
from kronos.errors import CheckpointError
from kronos.model import KronosTokenizer
from kronos.train import train_predictor, train_tokenizer
from kronos.train.distributed import setup_distributed
from kronos.train.stages import get_stage
from kronos.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


def _windows(n_windows: int, lookback: int = 30, predict: int = 5) -> WindowDataset:
    frame = qlib_frame(1)
    window = lookback + predict + 1
    return WindowDataset(frame.iloc[: n_windows + window - 1].reset_index(drop=True), lookback, predict)


def test_an_epoch_is_capped_at_the_number_of_windows(dataset: Path, tmp_path: Path) -> None:
    train, val = _windows(300), _windows(70)
    assert len(train) == 300 and len(val) == 70
    cfg = tiny_config(tmp_path, dataset, epochs=1, batch_size=16, n_train_iter=100_000, n_val_iter=100_000)
    trainer = Trainer(get_stage("tokenizer", cfg), cfg, setup_distributed(cfg))
    trainer.setup(datasets=(train, val))
    assert trainer.steps_per_epoch == 300 // 16  # not 100_000 // 16 passes over the same 300 windows
    assert trainer.val_steps == 5  # 70 windows in batches of 16
    assert trainer.scheduler.total_steps == 300 // 16  # the OneCycle schedule follows
    summary = trainer.fit()
    assert summary["steps_per_epoch"] == 18 and summary["val_steps"] == 5 and summary["global_step"] == 18
    on_disk = json.loads((Path(cfg.tokenizer_dir) / "summary.json").read_text())
    assert on_disk["steps_per_epoch"] == 18 and on_disk["train_windows"] == 300


def test_causal_validation_loss_does_not_see_the_target() -> None:
    _, model = tiny_pair(seed=0, ffn_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, token_dropout_p=0.0)
    model.eval()
    n = 2**model.s1_bits
    s1, s2 = torch.randint(0, n, (2, 12)), torch.randint(0, n, (2, 12))
    stamp = torch.zeros(2, 12, 5)
    with torch.no_grad():
        _, ctx = model.decode_s1(s1, s2, stamp)
        cross = model.dep_layer.cross_attn
        full_official = model.decode_s2(ctx, s1)
        cross.causal_in_eval = True
        full_causal = model.decode_s2(ctx, s1)
        prefix_causal = model.decode_s2(ctx[:, :4], s1[:, :4])
        cross.causal_in_eval = False
    # causal: position 3 depends only on positions 0..3; official eval (Q4): it sees later positions too
    torch.testing.assert_close(full_causal[:, :4], prefix_causal)
    assert not torch.allclose(full_official[:, :4], prefix_causal, atol=1e-4)

    # the stage's selection loss is the causal one (equal to the train-mode loss without dropout)
    class _Tok(torch.nn.Module):  # stands in for the frozen tokenizer: fixed token ids
        def encode(self, x, half=True):
            return s1, s2

    stage = get_stage("predictor", tiny_config(Path("."), Path("."), teacher_forcing=True))
    stage.tokenizer = _Tok()
    with torch.no_grad():
        losses = stage.val_losses(model, torch.zeros(2, 12, 6), stamp)
        model.train()
        train_loss, _ = stage.train_loss(model, torch.zeros(2, 12, 6), stamp)
        model.eval()
    assert set(losses) == {"loss", "loss_official"}
    torch.testing.assert_close(losses["loss"], train_loss)
    assert abs(float(losses["loss"] - losses["loss_official"])) > 1e-4


def test_best_model_ranks_epochs_on_the_causal_loss_and_logs_the_official_one(dataset: Path, tmp_path: Path):
    cfg = tiny_config(tmp_path, dataset, epochs=2, n_train_iter=16 * 2)
    train_tokenizer(cfg)
    summary = train_predictor(cfg)
    rows = [json.loads(line) for line in (Path(cfg.predictor_dir) / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert len(val) == 2 and all("val/loss_official" in r for r in val)
    assert summary["best_val_loss"] == pytest.approx(min(r["val/loss"] for r in val))
    assert all("val_loss_official" in h for h in summary["history"])


def test_resume_on_another_tokenizer_fails_and_best_model_falls_back_to_prev(dataset: Path, tmp_path: Path):
    cfg = tiny_config(tmp_path, dataset, epochs=2, n_train_iter=16 * 2)
    train_tokenizer(cfg)
    best = Path(cfg.finetuned_tokenizer)
    prev = best.with_name("best_model.prev")
    # A kill during best_model's swap leaves only best_model.prev: readers load it, the weights and the config
    # exactly as saved there (not a fresh init, not another checkpoint).
    os.replace(best, prev)
    loaded = KronosTokenizer.from_pretrained(str(best))
    saved, state = load_file(str(prev / "model.safetensors")), loaded.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert loaded.config == json.loads((prev / "config.json").read_text())
    first = train_predictor(cfg.update({"epochs": 1}))
    assert first["global_step"] == 2
    assert best.is_dir() and not prev.exists()  # the predictor stage moved it back before anything else
    tok = KronosTokenizer.from_pretrained(str(best))
    with torch.no_grad():
        next(tok.parameters()).add_(0.01)
    tok.save_pretrained(str(best))  # the tokenizer changed since the predictor checkpoint was written
    with pytest.raises(
        CheckpointError, match=r"different tokenizer .*restore that tokenizer or train without --resume"
    ):
        train_predictor(cfg.update({"epochs": 1}), resume=True)
