"""Checkpoint save/load in the official format: a folder with ``config.json`` + ``model.safetensors``.

``config.json`` holds exactly the constructor keyword arguments with sorted keys (what the official
``PyTorchModelHubMixin`` writes and reads), so checkpoints move freely between this package and the official code.
Local folders load without any network call; hub ids are resolved from the local Hugging Face cache first and
otherwise fetched only after a quick reachability probe, so an offline machine fails fast with one clear message.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kronos import io as kio
from kronos.errors import CheckpointError
from kronos.io import resolve_folder

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "model_card.json"  # what a checkpoint made by this package records about itself (data, cutoff, recipe)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Deterministic buffers that may be recomputed when a checkpoint lacks them (the official state-dict layout).
_RECOMPUTABLE_SUFFIXES = ("rotary.inv_freq", "bsq.basis", "bsq.group_basis")

M = TypeVar("M", bound="CheckpointMixin")


def _plain(value: Any) -> Any:
    """JSON-friendly Python scalar (numpy/torch scalars become int/float/bool)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    return value


class CheckpointMixin:
    """``save_pretrained`` / ``from_pretrained`` for modules whose ``config`` dict is their constructor kwargs."""

    config: dict

    if TYPE_CHECKING:  # provided by the torch.nn.Module the mixin is combined with (torch is untyped here)

        def state_dict(self) -> dict[str, Any]: ...

        def to(self, device: Any) -> Any: ...

        def eval(self) -> Any: ...

    @classmethod
    def constructor_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]

    def _record_config(self, values: dict) -> None:
        self.config = {k: _plain(values[k]) for k in sorted(self.constructor_keys())}

    # ------------------------------------------------------------------ save
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically into ``save_directory``.

        Both files are first written to a temporary folder beside the target; a new target folder is then renamed
        into place in one step, an existing one gets each file replaced atomically (other files there are kept).
        """

        target = Path(save_directory).expanduser()
        if target.exists() and not target.is_dir():
            raise CheckpointError(f"cannot save checkpoint: {target} exists and is not a folder")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        config_text = json.dumps(self.config, indent=2, sort_keys=True)

        def write_weights(path: Path) -> None:
            save_file(tensors, str(path), metadata={"format": "pt"})

        if not target.exists():

            def fill(folder: Path) -> None:
                write_weights(folder / WEIGHTS_NAME)
                (folder / CONFIG_NAME).write_text(config_text, encoding="utf-8")

            kio.write_folder(target, fill)
        else:  # keep other files in the folder; replace each of ours atomically
            kio.write_file(target / WEIGHTS_NAME, write_weights)
            kio.write_text(target / CONFIG_NAME, config_text)
        logger.info("saved %s checkpoint to %s", type(self).__name__, kio.final_path(target))
        return target

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **model_kwargs: Any,
    ) -> M:
        """Build the model from ``config.json`` and load ``model.safetensors`` (weights cast to float32, eval mode).

        ``pretrained_model_name_or_path`` is a local folder or a Hugging Face hub id (e.g.
        ``NeoQuasar/Kronos-small``). ``model_kwargs`` override config values. With ``strict`` (default) any
        missing, unexpected or mis-shaped tensor is a :class:`CheckpointError` (recomputable buffers excepted).
        """
        config_path, weights_path = _resolve_files(
            str(pretrained_model_name_or_path), revision, cache_dir, local_files_only, token
        )
        config = _read_config(cls, config_path)
        unknown = sorted(set(model_kwargs) - set(cls.constructor_keys()))
        if unknown:
            raise CheckpointError(f"unknown {cls.__name__} argument(s) {unknown}; valid: {cls.constructor_keys()}")
        config.update(model_kwargs)
        # Check config.json against the weights' header on the meta device before allocating anything: an absurd
        # d_model must fail in milliseconds, not try to allocate 80 GB.
        try:
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in cls(**config).state_dict().items()}
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{config_path}: cannot build {cls.__name__} from it: {exc}") from exc
        _check_against_weights(expected, _read_header(weights_path), weights_path, strict)
        try:
            model = cls(**config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: cannot build {cls.__name__} from it: {exc}") from exc
        state = _read_weights(weights_path)
        _load_state(model, state, weights_path, strict)
        model.to(map_location)
        model.eval()
        return model


def read_card(folder: str | os.PathLike) -> dict | None:
    """The ``model_card.json`` of a local checkpoint folder (None for hub ids, folders without one, unreadable
    files)."""
    return kio.read_json_object(Path(folder) / CARD_NAME, "model card")


def data_cutoff(folder: str | os.PathLike, configured: str = "") -> tuple[str | None, str]:
    """(last bar the model was trained on, where that comes from): ``configured`` (the config's
    ``pretrained_data_end``) wins, else the model card's ``data_end``; (None, "unknown") when neither says."""
    if configured:
        return str(configured), "config key pretrained_data_end"
    card = read_card(folder) if folder else None
    end = card.get("data_end") if card else None
    if isinstance(end, str) and end:
        return end, f"model card {Path(folder) / CARD_NAME}"
    return None, "unknown"


def weights_sha256(module: Any) -> str:
    """sha256 of a module's weights: every state-dict entry's name, dtype, shape and bytes, in name order.

    Identical for the same weights wherever they were loaded from (folder, hub, memory); any changed value,
    shape or dtype changes it.
    """

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_config(cls: type[CheckpointMixin], path: Path) -> dict:
    try:
        config = kio.read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object of {cls.__name__} arguments")
    keys = cls.constructor_keys()
    unknown = sorted(set(config) - set(keys))
    missing = [k for k in keys if k not in config]
    if unknown:
        raise CheckpointError(
            f"{path}: unknown key(s) {unknown} for {cls.__name__} (is this the right checkpoint type?); "
            f"expected exactly {sorted(keys)}"
        )
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing} for {cls.__name__}; expected exactly {sorted(keys)}")
    return config


def _read_header(path: Path) -> dict[str, tuple]:
    """Tensor names and shapes from the safetensors header (no tensor data is read)."""

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from None


_INDEX = re.compile(r"\.\d+\.")


def _check_against_weights(expected: dict[str, tuple], found: dict[str, tuple], path: Path, strict: bool) -> None:
    """config.json must describe the weights exactly: same shapes, no missing tensors, no extra layers.

    Extra tensors of a kind the model has (``transformer.12.*`` for a config with 12 layers) mean the config
    describes a smaller model than the weights: always an error. Other extra tensors are ignored with a
    warning (as the official loader does); missing ones are an error unless ``strict=False``.
    """
    mismatched = [f"{k} {found[k]} vs expected {v}" for k, v in expected.items() if k in found and found[k] != v]
    if mismatched:
        raise CheckpointError(f"{path}: tensor shape mismatch (config.json does not fit the weights): {mismatched[:3]}")
    kinds = {_INDEX.sub(".#.", k) for k in expected}
    extra_layers = sorted(k for k in set(found) - set(expected) if _INDEX.sub(".#.", k) in kinds)
    if extra_layers:
        raise CheckpointError(
            f"{path}: the weights hold {len(extra_layers)} tensor(s) of layers config.json does not have (e.g. "
            f"{extra_layers[0]}); config.json describes a smaller model than the weights (check n_layers)"
        )
    missing = [k for k in expected if k not in found and not k.endswith(_RECOMPUTABLE_SUFFIXES)]
    if missing and strict:
        raise CheckpointError(
            f"{path}: missing tensors {missing[:5]} ({len(missing)} in all); the checkpoint does not match this "
            "model (pass strict=False to load anyway)"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:

    try:
        state = load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from exc
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def _load_state(model: Any, state: dict[str, torch.Tensor], path: Path, strict: bool) -> None:
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(f"{path}: tensor shape mismatch (config.json does not fit the weights): {mismatched[:3]}")
    missing = [k for k in own if k not in state and not k.endswith(_RECOMPUTABLE_SUFFIXES)]
    unexpected = sorted(set(state) - set(own))
    if missing:
        message = f"{path}: missing tensors {missing[:5]} ({len(missing)} in all)"
        if strict:
            raise CheckpointError(
                message + "; the checkpoint does not match this model (pass strict=False to load anyway)"
            )
        logger.warning(message + "; they keep their initial values")
    if unexpected:  # extra tensors are ignored, as the official (non-strict) loader does
        logger.warning("%s: ignoring %d tensors the model does not use: %s", path, len(unexpected), unexpected[:5])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# the official checkpoints on the Hugging Face Hub (NeoQuasar/<name>)
OFFICIAL_NAMES = ("Kronos-Tokenizer-base", "Kronos-Tokenizer-2k", "Kronos-mini", "Kronos-small", "Kronos-base")


def _download_hint(repo_id: str) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    return (
        f"download the checkpoint to a folder and pass its path, e.g. "
        f"`hf download {repo_id} --local-dir ./{name}` then from_pretrained('./{name}')"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick HTTP probe of the hub endpoint, so an offline machine does not wait through HTTP retries.

    A TCP connect is not enough: an endpoint that accepts connections but never answers (a dead proxy, a
    captive portal) would stall the download for minutes. Any HTTP answer (even 404) within ``timeout``
    seconds counts as reachable.
    """

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT.rstrip("/")
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return False
    host = urlparse(endpoint).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(endpoint + "/api/models", method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def _resolve_files(
    name: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    token: str | bool | None,
) -> tuple[Path, Path]:
    """(config path, weights path) of a local folder or a hub id.

    A folder missing beside its complete previous version ``<folder>.prev`` (a swap by an older version of
    :func:`kronos.io.write_folder` killed between its renames) is read from ``<folder>.prev``.
    """
    path = Path(name).expanduser()
    if not path.exists():
        prev = resolve_folder(path)
        if prev is not None:
            logger.warning(
                "%s is missing (a checkpoint swap was interrupted); loading its previous version %s", path, prev
            )
            path = prev
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file():
            raise CheckpointError(f"checkpoint folder {path} has no {CONFIG_NAME}")
        if not weights_path.is_file():
            extra = " (only safetensors weights are supported)" if any(path.glob("*.bin")) else ""
            raise CheckpointError(f"checkpoint folder {path} has no {WEIGHTS_NAME}{extra}")
        return config_path, weights_path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds {CONFIG_NAME}")
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        official = path.name in OFFICIAL_NAMES  # e.g. ./Kronos-small before the README's download step
        raise CheckpointError(
            f"checkpoint folder not found: {path}"
            + (f"; {_download_hint('NeoQuasar/' + path.name)}" if official else "")
        )

    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(
            f"'{name}' is not a local folder and huggingface_hub is missing; {_download_hint(name)}"
        ) from None
    cached = [
        try_to_load_from_cache(name, f, cache_dir=cache_dir, revision=revision) for f in (CONFIG_NAME, WEIGHTS_NAME)
    ]
    if all(isinstance(c, str) for c in cached):
        return Path(cached[0]), Path(cached[1])
    if local_files_only or constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"'{name}' is neither a local folder nor in the Hugging Face cache; {_download_hint(name)}"
        )
    if not _hub_reachable():
        raise CheckpointError(
            f"'{name}' is not a local folder and the Hugging Face Hub cannot be reached; {_download_hint(name)}"
        )
    files = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            files.append(
                Path(
                    hf_hub_download(
                        name, filename, revision=revision, cache_dir=cache_dir, token=token, etag_timeout=10
                    )
                )
            )
        except Exception as exc:  # network/HTTP/repo errors of huggingface_hub
            raise CheckpointError(
                f"cannot fetch {filename} of '{name}' from the Hugging Face Hub ({type(exc).__name__}); "
                f"{_download_hint(name)}"
            ) from exc
    return files[0], files[1]
