"""Random tiny models for tests (no tests here): the one way the tests build a tiny tokenizer + predictor pair,
wrap it in a KronosPredictor, or save it in the official format.

    from _support.models import save_tiny_pair, tiny_pair, tiny_predictor

Every pair is seeded: ``torch.manual_seed(seed)``, then the tokenizer, then the predictor, then the optional
jitter, always in that order, so a seed gives the same weights (and leaves the same global RNG state) everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from kronos.inference import KronosPredictor
from kronos.model import Kronos, KronosTokenizer, build_predictor, build_tokenizer

PathLike = str | os.PathLike


def tiny_pair(
    seed: int = 0, jitter: float = 0.0, sharpen: Sequence[str] = (), **predictor_args
) -> tuple[KronosTokenizer, Kronos]:
    """A fresh tiny-preset ``(tokenizer, predictor)`` (train mode, as built).

    ``predictor_args`` override the predictor preset (e.g. ``n_layers=3``, dropout rates). ``jitter``: noise of
    that standard deviation added to the predictor's 1-d parameters (biases, norm weights), so that wrong wiring
    shows where the plain init is symmetric; ``sharpen``: head projections (``"proj_s1"``, ``"proj_s2"``) whose
    weights are scaled x3 (sharper, less uniform logits).
    """
    torch.manual_seed(seed)
    tokenizer, model = build_tokenizer("tiny"), build_predictor("tiny", **predictor_args)
    if jitter or sharpen:
        with torch.no_grad():
            if jitter:
                for p in model.parameters():
                    if p.dim() == 1:
                        p.add_(torch.randn_like(p) * jitter)
            for name in sharpen:
                getattr(model.head, name).weight.mul_(3)
    return tokenizer, model


def tiny_predictor(
    seed: int = 0, max_context: int = 32, jitter: float = 0.0, sharpen: Sequence[str] = (), **predictor_kwargs
) -> KronosPredictor:
    """:func:`tiny_pair` wrapped in a CPU :class:`KronosPredictor` (``predictor_kwargs``: its other arguments,
    e.g. ``clip``)."""
    tokenizer, model = tiny_pair(seed, jitter=jitter, sharpen=sharpen)
    return KronosPredictor(model, tokenizer, device="cpu", max_context=max_context, **predictor_kwargs)


def save_tiny_pair(
    tokenizer_dir: PathLike, predictor_dir: PathLike, seed: int = 0, **predictor_args
) -> tuple[KronosTokenizer, Kronos]:
    """:func:`tiny_pair` saved in the official format (``config.json`` + ``model.safetensors``) to the two folders
    (e.g. a config's ``finetuned_tokenizer``/``finetuned_predictor``, or a 'pretrained' pair's
    ``<folder>/tokenizer`` and ``<folder>/predictor``); returns the modules."""
    tokenizer, model = tiny_pair(seed, **predictor_args)
    tokenizer.save_pretrained(tokenizer_dir)
    model.save_pretrained(predictor_dir)
    return tokenizer, model
