"""Finetune modes of the predictor stage (config key ``finetune_mode``): which weights train, and how they are saved.

- ``full``: every weight trains (the official scripts).
- ``freeze``: the token and time embeddings and the lowest ``freeze_layers`` Transformer blocks keep their
  pretrained values; the upper blocks, the dependency layer and the heads train.
- ``lora``: low-rank adapters (the ``peft`` library, ``pip install 'kronos-kline[lora]'``) on the Linear layers named
  by ``lora_target_modules``, rank ``lora_rank``, scale ``lora_alpha / lora_rank``, dropout ``lora_dropout``; every
  pretrained weight is frozen. Checkpoints (``best_model`` and ``last``) hold the adapters merged into plain
  weights, so ``best_model`` is an official-format checkpoint; ``last/`` also keeps the adapter weights
  (``adapter.safetensors``) for an exact ``--resume``.

The tokenizer stage always trains fully; ``finetune_tokenizer: false`` keeps the pretrained tokenizer instead.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from kronos.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MODES = ("full", "freeze", "lora")
ADAPTER_FILE = "adapter.safetensors"


def _lora_layer_type() -> type[Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ConfigError(
            "finetune_mode 'lora' needs the peft library; install it with "
            "`pip install 'kronos-kline[lora]'` (make setup does) or use finetune_mode full/freeze"
        ) from None
    return LoraLayer


def apply_finetune_mode(model: nn.Module, config: Any, stage: str) -> nn.Module:
    """Prepare ``model`` (in place) for the stage's finetune mode; returns it. Only the predictor stage has modes."""
    mode = config.finetune_mode if stage == "predictor" else "full"
    if mode == "full":
        return model
    if mode == "freeze":
        blocks = getattr(model, "transformer", None)
        n_blocks = len(blocks) if blocks is not None else 0
        k = int(config.freeze_layers)
        if k > n_blocks:
            raise ConfigError(
                f"config key 'freeze_layers' ({k}) is more than the predictor's {n_blocks} Transformer "
                f"blocks; use 0 .. {n_blocks}"
            )
        frozen = [model.embedding, model.time_emb, *(list(blocks)[:k] if blocks is not None else [])]
        for part in frozen:
            for p in part.parameters():
                p.requires_grad_(False)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        _lora_layer_type()
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        targets = list(config.lora_target_modules)
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ConfigError(
                f"config key 'lora_target_modules' names {unknown or targets} but the predictor's Linear "
                f"layers are {sorted(names)}; pick from those"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=int(config.lora_rank),
            lora_alpha=float(config.lora_alpha),
            lora_dropout=float(config.lora_dropout),
            target_modules=targets,
            bias="none",
        )
        inject_adapter_in_model(lora, model)
    else:
        raise ConfigError(f"config key 'finetune_mode' must be one of {', '.join(MODES)}, got {mode!r}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "predictor: finetune_mode %s: %s of %s parameters train (%.1f%%)",
        mode,
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )
    return model


def is_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA adapter merged into its base Linear (the model itself when it has none):
    the plain official-format module, with the state-dict keys of the pretrained checkpoint."""
    if not is_lora(model):
        return model
    LoraLayer = _lora_layer_type()
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, attr, module.get_base_layer())
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def save_plain(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` of the plain (merged) model into ``folder``."""
    merged_copy(model).save_pretrained(folder)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def save_adapter(model: nn.Module, folder: Path) -> None:
    if is_lora(model):
        save_file(adapter_state(model), str(Path(folder) / ADAPTER_FILE))


def load_adapter(model: nn.Module, folder: Path) -> None:
    """Restore the adapter weights saved by :func:`save_adapter` (``--resume`` of a LoRA run)."""

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume a LoRA run from {folder}: it has no {ADAPTER_FILE} (it was written by "
            "another finetune_mode); resume with that mode or train without --resume"
        )
    state = load_file(str(path))
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise CheckpointError(
            f"cannot resume from {folder}: its adapters ({len(state)} tensors) do not match this "
            f"run's lora settings ({len(expected)} tensors); restore lora_rank/lora_target_modules "
            "or train without --resume"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"cannot resume from {folder}: adapter {name} has shape {tuple(value.shape)}, "
                    f"this run's is {tuple(params[name].shape)}; restore lora_rank"
                )
            params[name].copy_(value)


__all__ = ["MODES", "apply_finetune_mode", "load_adapter", "merged_copy", "save_adapter", "save_plain"]
