"""Forecasting with Kronos: sampling, (KV-cached) autoregressive generation and the DataFrame-level predictor."""

from kronos.inference.bands import Calibration, apply_calibration, load_calibration, prob_up
from kronos.inference.generate import (
    SamplingConfig,
    auto_regressive_inference,
    generate_tokens,
    mean_over_samples,
    sample_forecasts,
)
from kronos.inference.predictor import FEATURE_COLS, KronosPredictor, calc_time_stamps
from kronos.inference.sampling import sample_from_logits, top_k_top_p_filtering
from kronos.model import Kronos, KronosTokenizer

# The official package's registry (``model/__init__.py``): code written for the official repository keeps working
model_dict = {"kronos_tokenizer": KronosTokenizer, "kronos": Kronos, "kronos_predictor": KronosPredictor}


def get_model_class(model_name: str) -> type:
    """The class registered as ``model_name`` in :data:`model_dict` (the official helper); KeyError names the known
    ones."""
    if model_name not in model_dict:
        raise KeyError(f"model '{model_name}' is not registered; known: {sorted(model_dict)}")
    return model_dict[model_name]


__all__ = [
    "Calibration",
    "apply_calibration",
    "load_calibration",
    "FEATURE_COLS",
    "KronosPredictor",
    "SamplingConfig",
    "auto_regressive_inference",
    "calc_time_stamps",
    "generate_tokens",
    "get_model_class",
    "model_dict",
    "mean_over_samples",
    "prob_up",
    "sample_forecasts",
    "sample_from_logits",
    "top_k_top_p_filtering",
]
