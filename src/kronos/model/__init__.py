"""Kronos model modules: tokenizer, predictor, building blocks, presets and checkpoint I/O."""

from kronos.model.hub import CheckpointMixin
from kronos.model.kronos import (
    DEFAULT_MAX_CONTEXT,
    PREDICTOR_PRESETS,
    TOKENIZER_PRESETS,
    Kronos,
    KronosCache,
    build_predictor,
    build_tokenizer,
)
from kronos.model.tokenizer import KronosTokenizer

__all__ = [
    "CheckpointMixin",
    "DEFAULT_MAX_CONTEXT",
    "Kronos",
    "KronosCache",
    "KronosTokenizer",
    "PREDICTOR_PRESETS",
    "TOKENIZER_PRESETS",
    "build_predictor",
    "build_tokenizer",
]
