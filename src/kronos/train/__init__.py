"""Training: one loop for the tokenizer and the predictor on CPU, one GPU or torchrun DDP.

``train_tokenizer(config)`` then ``train_predictor(config)`` reproduce the official two-stage fine-tuning;
``run_stage(name, config, resume)`` is the common entry. See :mod:`kronos.train.trainer` for the launch commands.
"""

from __future__ import annotations

from kronos.train.stages import STAGES, PredictorStage, Stage, TokenizerStage, get_stage
from kronos.train.trainer import Trainer, run_stage, train_predictor, train_tokenizer

__all__ = [
    "STAGES",
    "PredictorStage",
    "Stage",
    "TokenizerStage",
    "Trainer",
    "get_stage",
    "run_stage",
    "train_predictor",
    "train_tokenizer",
]
