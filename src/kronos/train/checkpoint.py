"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, folders swapped atomically.

``checkpoints/best_model/`` is the official format (``save_pretrained``: config.json + model.safetensors).
``checkpoints/last/`` adds what an exact resume needs::

    last/config.json, last/model.safetensors    the model (official format, loadable like best_model)
    last/optimizer.safetensors + .json          optimizer state (tensors / structure and scalars)
    last/scheduler.json                         LR scheduler state; grad_scaler.json for fp16
    last/rng_rank{r}.safetensors                python, numpy, torch CPU and CUDA generator states of rank r
    last/trainer_state.json                     step counters, best loss, sampler position, run config

Folders are written with :func:`kronos.io.write_folder`: beside their final place, then swapped with the previous
version in one atomic step, so after a kill -9 at any moment ``best_model/`` and ``last/`` are each a complete
checkpoint (the old or the new one) that a plain ``from_pretrained(path)`` loads. A ``<name>.prev`` that an older
version left beside a missing folder is moved back when a training stage starts (:func:`kronos.io.heal_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import load_file, save, save_file

from kronos import io as kio
from kronos.errors import CheckpointError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------- state flattening
def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors) into JSON-able structure and named tensors.

    Tensors become ``{"__tensor__": name}``, tuples ``{"__tuple__": [...]}`` and dicts with non-string keys (the
    optimizer's ``state`` is keyed by int) ``{"__items__": [[key, value], ...]}``; :func:`unflatten_state` inverts it.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu").contiguous()
            return {"__tensor__": name}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k.startswith("__") for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, (np.integer,)):
            return int(x)
        if isinstance(x, (np.floating,)):
            return float(x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise CheckpointError(
            f"cannot store a {type(x).__name__} in a training checkpoint (only tensors and JSON values)"
        )

    return walk(obj), tensors


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x and len(x) == 1:
                return tensors[x["__tensor__"]]
            if "__tuple__" in x and len(x) == 1:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__items__" in x and len(x) == 1:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(structure)


def save_state(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<name>.json`` (+ ``<name>.safetensors`` when it holds tensors)."""
    structure, tensors = flatten_state(state)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure), encoding="utf-8")


def load_state(folder: Path, name: str) -> Any:
    try:
        structure = kio.read_json(folder / f"{name}.json")
        tpath = folder / f"{name}.safetensors"
        tensors = load_file(str(tpath)) if tpath.exists() else {}
        return unflatten_state(structure, tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(
            f"checkpoint '{folder}' has an unreadable '{name}' state ({exc}); "
            "delete the folder to start over or train without --resume"
        ) from None


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng() -> bytes:
    """This process's python, numpy, torch CPU and CUDA generator states as safetensors bytes."""
    py = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy (MT19937) layout: the global generator always has it
    tensors = {
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_meta": torch.tensor(
            [py[0], 0 if py[2] is None else 1, 0.0 if py[2] is None else py[2]], dtype=torch.float64
        ),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3], np_state[4]], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return save(tensors)


def restore_rng(payload: bytes) -> None:
    t = st_load_bytes(payload)
    meta = t["python_meta"].tolist()
    random.setstate(
        (int(meta[0]), tuple(int(v) for v in t["python_state"].tolist()), float(meta[2]) if meta[1] else None)
    )
    nm = t["numpy_meta"].tolist()
    np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), int(nm[0]), int(nm[1]), float(nm[2])))
    torch.set_rng_state(t["torch_cpu"])
    cuda = sorted((k for k in t if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(t[cuda[i]], device=i)


# ---------------------------------------------------------------------------------------------- JSON
def read_json(path: PathLike) -> Any:
    try:
        return kio.read_json(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read '{path}' ({exc}); delete it or train without --resume") from None
