"""kronos.train in-process: losses fall on real data, checkpoints, accumulation, early stopping, tracking."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _support.training import qlib_frame, tiny_config
from kronos.errors import CheckpointError, ConfigError, DependencyError
from kronos.io import resolve_folder, write_folder
from kronos.model import Kronos, KronosTokenizer, build_predictor, build_tokenizer
from kronos.train import run_stage, train_predictor, train_tokenizer
from kronos.train.checkpoint import flatten_state, unflatten_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory) -> dict:
    """Both stages trained once on the real data (3 epochs x 8 steps each)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, dataset, epochs=3, use_tensorboard=True)
    tok = train_tokenizer(cfg)
    pred = train_predictor(cfg)
    return {"config": cfg, "tokenizer": tok, "predictor": pred}


def _rows(stage_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["tokenizer", "predictor"])
def test_losses_fall_on_real_data(trained: dict, stage: str) -> None:
    cfg = trained["config"]
    rows = _rows(cfg.tokenizer_dir if stage == "tokenizer" else cfg.predictor_dir)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(train) == 12 and len(val) == 3  # 24 steps logged every 2; one validation per epoch
    assert np.mean(train[-3:]) < 0.8 * np.mean(train[:2])
    assert val[-1] < val[0]
    summary = trained[stage]
    assert summary["best_val_loss"] == pytest.approx(min(val))
    if stage == "predictor":
        assert train[0] > math.log(16) * 0.9  # starts near uniform over 2^4 tokens per head


def test_summary_and_metrics_files(trained: dict) -> None:
    cfg = trained["config"]
    stage_dir = Path(cfg.tokenizer_dir)
    summary = json.loads((stage_dir / "summary.json").read_text())
    for key in (
        "best_val_loss",
        "best_epoch",
        "epochs_run",
        "global_step",
        "wall_time_s",
        "world_size",
        "device",
        "precision",
        "config",
    ):
        assert key in summary
    assert summary["epochs_run"] == 3 and summary["global_step"] == 24 and summary["world_size"] == 1
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["config"]["batch_size"] == 16
    row = next(r for r in _rows(stage_dir) if "train/loss" in r)
    for key in (
        "step",
        "epoch",
        "train/loss",
        "train/recon",
        "train/recon_pre",
        "train/bsq",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert key in row
    assert row["tokens_per_s"] > 0 and 0 < row["lr"] <= cfg.tokenizer_learning_rate
    pred_row = next(r for r in _rows(cfg.predictor_dir) if "train/loss" in r)
    assert {"train/ce_s1", "train/ce_s2"} <= set(pred_row)
    assert list((stage_dir / "tensorboard").glob("events.out.tfevents.*"))
    # best_model is in the official format: config.json + model.safetensors, and the card of what it saw
    best = stage_dir / "checkpoints" / "best_model"
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "model.safetensors", "model_card.json"]
    card = json.loads((best / "model_card.json").read_text())
    assert card["data_end"] == "2024-03-29" and card["stage"] == "tokenizer"  # the last validation bar
    assert card["steps"] == summary["global_step"] and card["made_by"] == "kronos-kline"


def test_best_checkpoints_forecast_with_kronos_predictor(trained: dict) -> None:
    from kronos.inference import KronosPredictor

    cfg = trained["config"]
    tok = KronosTokenizer.from_pretrained(cfg.finetuned_tokenizer)
    model = Kronos.from_pretrained(cfg.finetuned_predictor)
    df = qlib_frame(symbols=1)
    hist, fut = df.iloc[-60:-10].reset_index(drop=True), df.iloc[-10:].reset_index(drop=True)
    pred = KronosPredictor(model, tok, device="cpu", max_context=64).predict(
        hist[["open", "high", "low", "close", "volume", "amount"]],
        hist["timestamps"],
        fut["timestamps"],
        pred_len=10,
        T=1.0,
        top_k=1,
        verbose=False,
    )
    assert pred.shape == (10, 6) and np.isfinite(pred.to_numpy()).all()
    assert list(pred.index) == list(fut["timestamps"])


def test_predictor_needs_the_tokenizer_stage(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, dataset)
    with pytest.raises(CheckpointError, match="tokenizer stage first"):
        train_predictor(cfg)


def test_starts_from_a_pretrained_folder(dataset: Path, tmp_path: Path) -> None:
    # With a zero learning rate AdamW leaves weights untouched: the best model must equal the pretrained folder.
    folder = tmp_path / "pretrained"
    build_tokenizer("tiny").save_pretrained(folder)
    cfg = tiny_config(tmp_path, dataset, epochs=1, pretrained_tokenizer_path=str(folder), tokenizer_learning_rate=0.0)
    train_tokenizer(cfg)
    start, best = (
        load_file(str(folder / "model.safetensors")),
        load_file(cfg.finetuned_tokenizer + "/model.safetensors"),
    )
    assert start.keys() == best.keys() and all(torch.equal(start[k], best[k]) for k in start)
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (Path(cfg.finetuned_tokenizer) / "config.json").read_text()
    )


def test_early_stopping(dataset: Path, tmp_path: Path) -> None:
    # lr 0: validation never improves after epoch 1, so patience 1 stops after epoch 2 of 5.
    cfg = tiny_config(tmp_path, dataset, epochs=5, patience=1, tokenizer_learning_rate=0.0)
    summary = train_tokenizer(cfg)
    assert summary["stopped_early"] and summary["epochs_run"] == 2 and summary["best_epoch"] == 1
    assert summary["global_step"] == 16
    # resuming a run that stopped early does nothing more
    again = train_tokenizer(cfg, resume=True)
    assert again["global_step"] == 16 and again["epochs_run"] == 2


def test_gradient_accumulation_matches_the_full_batch(trained: dict, dataset: Path, tmp_path: Path) -> None:
    # Predictor CE is a mean over equal-sized micro-batches, so 4 accumulated quarters == one full batch.
    tok = trained["config"].finetuned_tokenizer
    results = {}
    for acc in (1, 4):
        cfg = tiny_config(
            tmp_path / f"acc{acc}", dataset, epochs=1, accumulation_steps=acc, finetuned_tokenizer_path=tok
        )
        summary = train_predictor(cfg)
        results[acc] = (summary, load_file(str(Path(summary["last_checkpoint"]) / "model.safetensors")))
    (s1, w1), (s4, w4) = results[1], results[4]
    assert s1["global_step"] == s4["global_step"] == 8
    assert max((w1[k] - w4[k]).abs().max().item() for k in w1) < 1e-4
    assert s4["best_val_loss"] == pytest.approx(s1["best_val_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="divisible"):
        train_predictor(tiny_config(tmp_path / "bad", dataset, accumulation_steps=3, finetuned_tokenizer_path=tok))


def test_resume_refuses_a_changed_schedule(dataset: Path, tmp_path: Path) -> None:
    train_tokenizer(tiny_config(tmp_path, dataset, epochs=1))
    with pytest.raises(CheckpointError, match="epochs"):
        train_tokenizer(tiny_config(tmp_path, dataset, epochs=3), resume=True)


def test_too_few_samples_for_one_batch(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_train_iter"):
        train_tokenizer(tiny_config(tmp_path, dataset, n_train_iter=8))


def test_unknown_stage(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage"):
        run_stage("decoder", tiny_config(tmp_path, dataset))


def test_optimizer_state_round_trips_without_pickle() -> None:
    model = build_predictor("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))[0].sum().backward()
    opt.step()
    state = opt.state_dict()
    structure, tensors = flatten_state(state)
    json.dumps(structure)  # plain JSON + tensors only
    back = unflatten_state(json.loads(json.dumps(structure)), tensors)
    assert back["param_groups"] == state["param_groups"]  # betas come back as a tuple
    assert back["state"].keys() == state["state"].keys()
    for k, v in state["state"].items():
        assert all(torch.equal(v[n], back["state"][k][n]) for n in v)


def test_atomic_folder_keeps_a_complete_version(tmp_path: Path) -> None:
    target = tmp_path / "last"
    write_folder(target, lambda f: (f / "a.txt").write_text("1"))

    def broken(folder: Path) -> None:
        (folder / "a.txt").write_text("2")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_folder(target, broken)
    assert (resolve_folder(target) / "a.txt").read_text() == "1"
    # a crash between the two renames leaves only last.prev: it is still found
    target.rename(tmp_path / "last.prev")
    assert (resolve_folder(target) / "a.txt").read_text() == "1"
    write_folder(target, lambda f: (f / "a.txt").write_text("3"))
    assert (resolve_folder(target) / "a.txt").read_text() == "3" and not (tmp_path / "last.prev").exists()


def test_real_comet_logs_offline_without_key_or_network(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    # The real comet_ml: no API key -> an offline archive in the stage folder; a key but no route to Comet
    # (this machine has no internet) -> offline too, without hanging on Comet's HTTP retries.
    pytest.importorskip("comet_ml")
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
    for key in ("", "secret"):
        if key:
            monkeypatch.setenv("COMET_API_KEY", key)
        run_dir = tmp_path / (key or "nokey")
        cfg = tiny_config(run_dir, dataset, epochs=1, use_comet=True)
        train_tokenizer(cfg)
        archives = list((Path(cfg.tokenizer_dir) / "comet").glob("*.zip"))
        assert len(archives) == 1, list((Path(cfg.tokenizer_dir)).rglob("*"))
        import zipfile

        with zipfile.ZipFile(archives[0]) as z:
            assert z.namelist(), "empty Comet offline archive"


@pytest.mark.slow
def test_comet_online_branch_when_reachable(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    # The online branch needs Comet's servers: a recording stand-in checks which experiment type is opened.
    calls = []

    class FakeExperiment:
        def __init__(self, **kwargs):
            calls.append((type(self).__name__, kwargs))
            self.metrics = []

        def log_metrics(self, metrics, step=None, epoch=None):
            self.metrics.append((step, metrics))

        def log_parameters(self, params):
            calls.append(("params", params))

        def add_tag(self, tag):
            pass

        def set_name(self, name):
            pass

        def end(self):
            calls.append(("end", len(self.metrics)))

    class OfflineExperiment(FakeExperiment):
        pass

    class Experiment(FakeExperiment):
        pass

    monkeypatch.setitem(
        sys.modules, "comet_ml", types.SimpleNamespace(OfflineExperiment=OfflineExperiment, Experiment=Experiment)
    )
    from kronos.train import tracking

    monkeypatch.setenv("COMET_API_KEY", "secret")
    for reachable, expected in ((True, "Experiment"), (False, "OfflineExperiment")):
        calls.clear()
        monkeypatch.setattr(tracking, "_reachable", lambda host, *a, reachable=reachable, **k: reachable)
        train_tokenizer(tiny_config(tmp_path / expected, dataset, epochs=1, use_comet=True))
        assert calls[0][0] == expected
        assert calls[0][1].get("api_key") == ("secret" if reachable else None)
    # a key in the config reaches the Comet client, but the logged parameters carry "***"; the placeholder of a
    # saved (redacted) config is never sent as a key
    monkeypatch.delenv("COMET_API_KEY")
    monkeypatch.setattr(tracking, "_reachable", lambda host, *a, **k: True)
    for key, expected in (("k-42", "Experiment"), ("***", "OfflineExperiment")):
        calls.clear()
        train_tokenizer(
            tiny_config(
                tmp_path / f"cfg{expected}",
                dataset,
                epochs=1,
                use_comet=True,
                comet_config={"api_key": key, "project_name": "p", "workspace": ""},
            )
        )
        assert calls[0][0] == expected and calls[0][1].get("api_key") == ("k-42" if key == "k-42" else None)
        params = [c[1] for c in calls if c[0] == "params"]
        assert params and all(p["comet_config"]["api_key"] == "***" for p in params)


def test_comet_missing_is_a_dependency_error(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # import fails as if not installed
    with pytest.raises(DependencyError, match="comet_ml"):
        train_tokenizer(tiny_config(tmp_path, dataset, epochs=1, use_comet=True))


def test_bf16_autocast_path_on_cpu(trained: dict, dataset: Path, tmp_path: Path) -> None:
    # The mixed-precision path CUDA uses by default, exercised with CPU autocast: losses stay finite, weights fp32.
    cfg = tiny_config(
        tmp_path, dataset, epochs=1, precision="bf16", finetuned_tokenizer_path=trained["config"].finetuned_tokenizer
    )
    for summary in (train_tokenizer(cfg), train_predictor(cfg)):
        assert summary["precision"] == "bf16" and math.isfinite(summary["best_val_loss"])
        weights = load_file(str(Path(summary["best_model"]) / "model.safetensors"))
        assert all(t.dtype in (torch.float32, torch.int64) for t in weights.values())
    with pytest.raises(ConfigError, match="fp16"):
        train_tokenizer(tiny_config(tmp_path, dataset, precision="fp16"))


def test_damaged_resume_state_is_one_checkpoint_error(dataset: Path, tmp_path: Path) -> None:
    import shutil

    cfg = tiny_config(tmp_path, dataset, epochs=1)
    train_tokenizer(cfg)
    last = Path(cfg.tokenizer_dir) / "checkpoints" / "last"
    pristine = tmp_path / "pristine"
    shutil.copytree(last, pristine)
    names = sorted(p.name for p in pristine.iterdir() if p.is_file())
    assert "trainer_state.json" in names and "model.safetensors" in names
    damages = {
        "truncated": lambda b: b[: len(b) // 2],
        "garbage": lambda b: b"\x00\xff" * 16,
        "empty": lambda b: b"",
    }
    if (pristine / "trainer_state.json").is_file():  # a state that parses but lacks its fields
        damages_json = {"trainer_state.json": b'{"global_step": 1}'}
    for name in names:
        for kind, damage in damages.items():
            shutil.rmtree(last)
            shutil.copytree(pristine, last)
            (last / name).write_bytes(damage((pristine / name).read_bytes()))
            with pytest.raises(CheckpointError) as info:
                train_tokenizer(cfg, resume=True)
            assert "\n" not in str(info.value), (name, kind)
    for name, content in damages_json.items():
        shutil.rmtree(last)
        shutil.copytree(pristine, last)
        (last / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="trainer_state.json"):
            train_tokenizer(cfg, resume=True)
