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
    "mean_over_samples",
    "prob_up",
    "sample_forecasts",
    "sample_from_logits",
    "top_k_top_p_filtering",
]
