"""Training numerics: precision selection per GPU generation, TF32 only inside mixed-precision steps, and the
non-finite guard (a NaN batch is skipped, counted in metrics.jsonl, and too many in a row stop the run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _support.training import tiny_config
from kronos.config import Config
from kronos.data.windows import WindowDataset
from kronos.errors import ConfigError, TrainingError
from kronos.train import Trainer, get_stage
from kronos.train.distributed import DistContext, Precision, resolve_precision, tf32_matmuls

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability, expected, scaler",
    [
        ((9, 0), "bf16", False),
        ((8, 0), "bf16", False),
        ((7, 5), "fp16", True),
        ((7, 0), "fp16", True),
        ((6, 1), "fp16", True),
    ],
)
def test_auto_precision_follows_the_gpu_generation(monkeypatch, capability, expected, scaler) -> None:
    # is_bf16_supported() is True on a V100/T4 (emulated bf16): auto must go by the compute capability instead.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = resolve_precision(Config(precision="auto"), CUDA)
    assert (p.name, p.use_scaler) == (expected, scaler)
    assert f"{capability[0]}.{capability[1]}" in p.reason and expected in p.reason


def test_explicit_bf16_on_an_old_gpu_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(ConfigError, match="compute capability 7.0.*fp16"):
        resolve_precision(Config(precision="bf16"), CUDA)
    assert resolve_precision(Config(precision="fp16"), CUDA).use_scaler


def test_auto_is_fp32_on_cpu() -> None:
    p = resolve_precision(Config(precision="auto"), torch.device("cpu"))
    assert p.name == "fp32" and p.dtype is None and not p.use_scaler


def test_tf32_is_on_only_inside_a_mixed_precision_step() -> None:
    matmul = torch.backends.cuda.matmul
    before = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = False
        bf16 = Precision("bf16", torch.bfloat16, "cuda", False)
        fp32 = Precision("fp32", None, "cuda", False)
        with bf16.compute():
            assert matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert matmul.allow_tf32 is False  # restored: later fp32 prediction keeps full float32 matmuls
        with fp32.compute():
            assert matmul.allow_tf32 is False
        with pytest.raises(RuntimeError):
            with tf32_matmuls(True):
                raise RuntimeError("boom")
        assert matmul.allow_tf32 is False  # restored on errors too
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------------ non-finite guard
def _trainer(tmp: Path, dataset: Path, **overrides) -> Trainer:
    cfg = tiny_config(tmp, dataset, epochs=1, n_train_iter=16 * 6, log_interval=2, **overrides)
    trainer = Trainer(get_stage("tokenizer", cfg), cfg, DistContext(device=torch.device("cpu")))
    trainer.setup(datasets=(WindowDataset.from_config(cfg, "train"), WindowDataset.from_config(cfg, "val")))
    return trainer


class _Poisoned:
    """The trainer's loader with NaN prices in the batches at ``steps`` (0-based)."""

    def __init__(self, loader, steps) -> None:
        self.loader, self.steps = loader, set(steps)

    def __iter__(self):
        for i, (x, stamp) in enumerate(self.loader):
            yield (torch.full_like(x, math.nan) if i in self.steps else x), stamp


def test_a_nan_batch_skips_the_update(tmp_path: Path, dataset: Path) -> None:
    trainer = _trainer(tmp_path, dataset)
    batches = iter(trainer.train_loader)
    x, stamp = next(batches)
    trainer.train_step(x, stamp)  # one real step so the optimizer has state
    weights = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    adam = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    lr = trainer.scheduler.get_last_lr()
    out = trainer.train_step(torch.full_like(x, math.nan), stamp)
    assert out["nonfinite"].item() == 1 and not math.isfinite(out["loss"].item())
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, adam[k]), k
    assert trainer.scheduler.get_last_lr() == lr
    assert all(p.grad is None for p in trainer.params)
    out = trainer.train_step(*next(batches))  # training goes on normally
    assert out["nonfinite"].item() == 0 and math.isfinite(out["loss"].item())


def test_nan_batches_are_counted_in_metrics_and_the_run_finishes(tmp_path: Path, dataset: Path) -> None:
    trainer = _trainer(tmp_path, dataset, max_nonfinite_steps=3)
    trainer.train_loader = _Poisoned(trainer.train_loader, {1, 3, 4})
    summary = trainer.fit()
    rows = [json.loads(line) for line in (trainer.stage_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["nonfinite_steps"] for r in train_rows] == [1, 1, 1]  # steps 2, 4, 5 of 6 (logged every 2)
    assert all(math.isfinite(r["train/loss"]) for r in train_rows)  # skipped steps stay out of the means
    assert summary["nonfinite_steps"] == 3 and math.isfinite(summary["best_val_loss"])


def test_too_many_nan_batches_in_a_row_stop_with_one_line(tmp_path: Path, dataset: Path) -> None:
    trainer = _trainer(tmp_path, dataset, max_nonfinite_steps=2)
    trainer.train_loader = _Poisoned(trainer.train_loader, {2, 3})
    with pytest.raises(TrainingError, match=r"step 4: 2 non-finite .*'max_nonfinite_steps'") as info:
        trainer.fit()
    assert "\n" not in str(info.value)


def test_max_nonfinite_steps_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        Config(max_nonfinite_steps=0)
