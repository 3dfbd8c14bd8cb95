"""The starter pair: a small tokenizer + predictor pretrained by this package on real A-share daily bars.

Offline there is no pretrained Kronos to finetune (the Hugging Face hub cannot be reached), so the repository ships
its own starting point under ``examples/models/starter/`` (``tokenizer/`` and ``predictor/``, each an official-format
checkpoint plus ``model_card.json``). :func:`build_starter` rebuilds it from scratch with this package's own data step
and trainer (``make starter``); on CPU the same seed gives the same weights (fixed thread count, deterministic
algorithms).

The data ends at :data:`DATA_CUTOFF`: every later bar (the demo's validation and test years included) was never seen,
so a zero-shot score of the starter on those years is out of sample. The card records the cutoff and the report
marks a zero-shot row as in-sample when test targets fall on or before it (README, "Finetuning the starter").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kronos import io as kio
from kronos.config import Config
from kronos.data.sources import DataProcessorFactory
from kronos.data.store import SPLITS, load_split
from kronos.errors import ConfigError, DataError, KronosError
from kronos.model import Kronos, KronosTokenizer, build_predictor, build_tokenizer
from kronos.model.hub import CARD_NAME, weights_sha256
from kronos.train.trainer import run_stage

log = logging.getLogger(__name__)

DATA_CUTOFF = "2021-12-31"
DEFAULT_DATA = "../shared/data/qlib_cn_2010_2024"
DEFAULT_OUT = "examples/models/starter"
THREADS = 2  # CPU reductions depend on the thread count: the card records it, a rebuild uses the same

# The data and training settings of the starter (flat Config keys). Splits end at the cutoff: train 2010 .. mid
# 2020, validation (best model) mid 2020 .. mid 2021, test (unused by training) the rest of 2021.
RECIPE: dict[str, Any] = {
    "data_source": "qlib",
    "instrument": "all",
    "dataset_begin_time": "2010-01-01",
    "dataset_end_time": DATA_CUTOFF,
    "train_time_range": ["2010-01-01", "2020-06-30"],
    "val_time_range": ["2020-07-01", "2021-06-30"],
    "test_time_range": ["2021-07-01", DATA_CUTOFF],
    "lookback_window": 100,
    "predict_window": 20,
    "max_context": 512,
    "run_folders": False,
    "device": "cpu",
    "precision": "fp32",
    "num_workers": 0,
    "seed": 100,
    "batch_size": 64,
    "n_val_iter": 64 * 24,
    "log_interval": 50,
    "checkpoint_interval": 0,
    "use_comet": False,
    "pretrained_tokenizer_path": "",
    "pretrained_predictor_path": "",
}
# Per stage: optimizer steps = epochs * n_train_iter / batch_size; one validation per epoch picks best_model.
STAGE_RECIPE: dict[str, dict[str, Any]] = {
    "tokenizer": {"epochs": 6, "n_train_iter": 64 * 250, "tokenizer_learning_rate": 2e-3},
    "predictor": {"epochs": 8, "n_train_iter": 64 * 450, "predictor_learning_rate": 1e-3},
}
# Shapes (constructor arguments). The predictor's vocabulary follows the tokenizer's bits (2^8 per level).
TOKENIZER_SHAPE: dict[str, Any] = {
    "d_in": 6, "d_model": 64, "n_heads": 4, "ff_dim": 128, "n_enc_layers": 2, "n_dec_layers": 2,
    "ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "s1_bits": 8, "s2_bits": 8,
    "beta": 0.05, "gamma0": 1.0, "gamma": 1.1, "zeta": 0.05, "group_size": 4,
}  # fmt: skip
PREDICTOR_SHAPES: dict[str, dict[str, Any]] = {
    "d64x4": {"s1_bits": 8, "s2_bits": 8, "n_layers": 4, "d_model": 64, "n_heads": 4, "ff_dim": 128,
              "ffn_dropout_p": 0.1, "attn_dropout_p": 0.0, "resid_dropout_p": 0.1, "token_dropout_p": 0.0,
              "learn_te": True},
    "d128x4": {"s1_bits": 8, "s2_bits": 8, "n_layers": 4, "d_model": 128, "n_heads": 4, "ff_dim": 256,
               "ffn_dropout_p": 0.1, "attn_dropout_p": 0.0, "resid_dropout_p": 0.1, "token_dropout_p": 0.0,
               "learn_te": True},
    "d128x6": {"s1_bits": 8, "s2_bits": 8, "n_layers": 6, "d_model": 128, "n_heads": 4, "ff_dim": 384,
               "ffn_dropout_p": 0.1, "attn_dropout_p": 0.0, "resid_dropout_p": 0.1, "token_dropout_p": 0.0,
               "learn_te": True},
}  # fmt: skip
DEFAULT_SHAPE = "d64x4"  # best validation loss at an equal time budget (README, "The starter pair")


def starter_config(data_path: str, work: Path, stage: str, overrides: dict | None = None) -> Config:
    """The recipe's Config for ``stage`` ('tokenizer' or 'predictor') writing under ``work`` (``overrides`` on top)."""
    cfg = Config.from_dict({**RECIPE, **STAGE_RECIPE[stage], **(overrides or {})}, source="starter recipe")
    return cfg.update(
        {
            "qlib_data_path": str(data_path),
            "dataset_path": str(work / "dataset"),
            "save_path": str(work / "models"),
            "backtest_result_path": str(work / "results"),
            "pretrained_tokenizer_path": str(work / "init" / "tokenizer"),
            "pretrained_predictor_path": str(work / "init" / "predictor"),
        },
        source="starter recipe",
    )


def _initial_checkpoints(work: Path, shape: str, seed: int) -> None:
    """Freshly initialised (seeded) tokenizer and predictor of the recipe's shapes, saved as the stages' start."""

    if shape not in PREDICTOR_SHAPES:
        raise ConfigError(f"unknown starter shape '{shape}'; choose one of {sorted(PREDICTOR_SHAPES)}")
    torch.manual_seed(seed)
    build_tokenizer(dict(TOKENIZER_SHAPE)).save_pretrained(work / "init" / "tokenizer")
    torch.manual_seed(seed + 1)
    build_predictor(dict(PREDICTOR_SHAPES[shape])).save_pretrained(work / "init" / "predictor")


def build_starter(
    data_path: str = DEFAULT_DATA,
    out: str = DEFAULT_OUT,
    work: str | None = None,
    shape: str = DEFAULT_SHAPE,
    stage_overrides: dict[str, dict] | None = None,
    command: str = "",
    skip_tokenizer: bool = False,
    recipe_overrides: dict | None = None,
) -> dict:
    """Process the data, train the tokenizer then the predictor, and write the pair with model cards to ``out``.

    ``stage_overrides`` ({stage: {key: value}}) changes steps or learning rates (tests run one step; the shape
    comparison shortens the runs); ``recipe_overrides`` changes keys of both stages (dates and windows of other
    data). ``skip_tokenizer`` reuses ``work``'s trained tokenizer (shape comparisons).
    Returns {"tokenizer": card, "predictor": card}.
    """

    if not (Path(data_path) / "calendars").is_dir():
        raise DataError(
            f"starter data '{data_path}' is not a Qlib data folder (no calendars/); pass --data with the "
            "folder of real A-share daily bars (e.g. ../shared/data/qlib_cn_2010_2024)"
        )
    work_dir = Path(work or Path(out).parent / ".starter_build")
    torch.set_num_threads(THREADS)
    overrides = stage_overrides or {}
    t_start = time.time()
    common = recipe_overrides or {}
    cfg_tok = starter_config(data_path, work_dir, "tokenizer", {**common, **overrides.get("tokenizer", {})})
    cfg_pred = starter_config(data_path, work_dir, "predictor", {**common, **overrides.get("predictor", {})})
    cfg_pred.update(
        {
            "pretrained_tokenizer_path": cfg_tok.finetuned_tokenizer,
            "finetuned_tokenizer_path": cfg_tok.finetuned_tokenizer,
        },
        source="starter recipe",
    )
    seconds: dict[str, float] = {}
    t0 = time.time()
    manifest = DataProcessorFactory.create_processor("qlib", cfg_tok).run_pipeline()
    seconds["data"] = round(time.time() - t0, 1)
    _initial_checkpoints(work_dir, shape, cfg_tok.seed)
    summaries = {}
    for stage, cfg in (("tokenizer", cfg_tok), ("predictor", cfg_pred)):
        if stage == "tokenizer" and skip_tokenizer:
            summaries[stage] = kio.read_json(Path(cfg.tokenizer_dir) / "summary.json")
            continue
        t0 = time.time()
        summaries[stage] = run_stage(stage, cfg)
        seconds[stage] = round(time.time() - t0, 1)
    wall = round(time.time() - t_start, 1)

    info = manifest.get("splits", manifest) if isinstance(manifest, dict) else {}
    symbols = sorted(_symbols(cfg_tok.dataset_path))
    first_bar, last_bar = _bar_range(cfg_tok.dataset_path)
    cards = {}
    out_dir = Path(out)
    for stage, cls, cfg in (("tokenizer", KronosTokenizer, cfg_tok), ("predictor", Kronos, cfg_pred)):
        best = cfg.finetuned_tokenizer if stage == "tokenizer" else cfg.finetuned_predictor
        model = cls.from_pretrained(best)
        summary = summaries[stage]
        history = summary.get("history") or []
        card: dict[str, Any] = {
            "name": f"kronos-starter-{stage}",
            "made_by": "kronos-kline (this package's data step and trainer)",
            "data": {
                "source": "qlib",
                "folder": Path(data_path).name,
                "instrument": RECIPE["instrument"],
                "symbols": symbols,
                "n_symbols": len(symbols),
                "frequency": "1d",
                "first_bar": first_bar,
                "last_bar": last_bar,
                "cutoff": cfg_tok.dataset_end_time,
                "splits": {
                    s: {k: v for k, v in (info.get(s) or {}).items() if k in ("first", "last", "rows")}
                    for s in ("train", "val", "test")
                },
            },
            "data_end": last_bar,
            "shape": dict(model.config),
            "shape_name": shape if stage == "predictor" else "tokenizer",
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "weights_sha256": weights_sha256(model),
            "training": {
                "lookback_window": cfg.lookback_window,
                "predict_window": cfg.predict_window,
                "batch_size": cfg.batch_size,
                "epochs": cfg.epochs,
                "steps": summary.get("global_step"),
                "learning_rate": cfg.tokenizer_learning_rate if stage == "tokenizer" else cfg.predictor_learning_rate,
                "seed": cfg.seed,
                "threads": THREADS,
                "device": "cpu",
                "precision": "fp32",
                "final_train_loss": _last_train_loss(
                    Path(cfg.tokenizer_dir if stage == "tokenizer" else cfg.predictor_dir)
                ),
                "final_val_loss": history[-1].get("val_loss") if history else None,
                "best_val_loss": summary.get("best_val_loss"),
                "best_epoch": summary.get("best_epoch"),
                "val_loss_meaning": (
                    "reconstruction MSE of normalised bars"
                    if stage == "tokenizer"
                    else "causal next-token cross-entropy, mean of s1 and s2"
                ),
                "wall_time_s": seconds.get(stage),
            },
            "build_wall_time_s": wall,
            "build_seconds": seconds,
            "machine": {"cpus": _cpus(), "python": platform.python_version(), "torch": torch.__version__},
            "rebuild": command or "make starter",
            "license": "MIT (weights trained by this project)",
        }
        target = out_dir / stage

        def fill(folder: Path, m=model, c=card) -> None:
            m.save_pretrained(folder)
            kio.write_json(folder / CARD_NAME, c)

        kio.write_folder(target, fill)
        cards[stage] = card
        log.info(
            "starter %s: %s (%d parameters, best val loss %s) written to %s",
            stage,
            card["shape_name"],
            card["parameters"],
            card["training"]["best_val_loss"],
            target,
        )
    log.info("starter built in %.0f s (data %.0f s)", wall, seconds["data"])
    return cards


def _symbols(dataset_path: str) -> set[str]:

    out: set[str] = set()
    for split in SPLITS:
        out |= set(load_split(dataset_path, split)["symbol"].astype(str).unique())
    return out


def _bar_range(dataset_path: str) -> tuple[str, str]:

    lo, hi = None, None
    for split in SPLITS:
        ts = load_split(dataset_path, split)["timestamps"]
        lo = ts.min() if lo is None else min(lo, ts.min())
        hi = ts.max() if hi is None else max(hi, ts.max())
    assert lo is not None and hi is not None  # SPLITS is not empty
    return str(lo.date()), str(hi.date())


def _last_train_loss(stage_dir: Path) -> float | None:
    path = stage_dir / "metrics.jsonl"
    last = None
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "train/loss" in row and row["train/loss"] is not None and math.isfinite(row["train/loss"]):
                last = row["train/loss"]
    return last


def _cpus() -> int:

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_starter",
        description=(
            "Rebuild the starter pair (examples/models/starter/) from real A-share daily bars up to "
            f"{DATA_CUTOFF} with this package's trainer (CPU, deterministic)."
        ),
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help="Qlib folder of daily bars (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the pair is written (default: %(default)s)")
    parser.add_argument("--work", default=None, help="scratch folder (default: <out>/../.starter_build)")
    parser.add_argument(
        "--shape",
        default=DEFAULT_SHAPE,
        choices=sorted(PREDICTOR_SHAPES),
        help="predictor shape (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python tools/build_starter.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )

    try:
        build_starter(args.data, args.out, args.work, args.shape, command=command.strip())
    except KronosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DATA_CUTOFF", "RECIPE", "STAGE_RECIPE", "build_starter", "starter_config"]

if __name__ == "__main__":
    raise SystemExit(main())
