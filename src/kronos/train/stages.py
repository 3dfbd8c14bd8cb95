"""What differs between the two training stages: model, starting point, loss, optimiser settings, output folder.

The loop in :mod:`kronos.train.trainer` is shared; a stage only answers "which model, which loss" (spec §6).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from kronos.config import Config
from kronos.errors import CheckpointError, ConfigError
from kronos.io import resolve_folder
from kronos.model import PREDICTOR_PRESETS, TOKENIZER_PRESETS, Kronos, KronosTokenizer, build_predictor, build_tokenizer
from kronos.model.hub import weights_sha256

if TYPE_CHECKING:
    from kronos.model.hub import CheckpointMixin

logger = logging.getLogger(__name__)


class Stage:
    """Base class: one trainable model and its loss. Subclasses set the class attributes and the three methods."""

    name: str = ""

    def __init__(self, config: Config) -> None:
        self.config = config

    # -- what to train ------------------------------------------------------------------------
    @property
    def folder_name(self) -> str:  # under config.save_path
        raise NotImplementedError

    @property
    def model_class(self) -> type[CheckpointMixin]:
        raise NotImplementedError

    def initial_model(self) -> nn.Module:
        """The starting point: a pretrained folder/hub id, or a fresh size preset when no path is configured."""
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        """Load whatever the loss needs besides the trained model (e.g. the frozen tokenizer)."""

    def check_model(self, model: nn.Module) -> None:
        """Raise CheckpointError when the trained model cannot work with the stage's other parts."""

    def inputs_fingerprint(self) -> dict[str, str]:
        """Hashes of the fixed parts training depends on (after :meth:`prepare`); a resume must see the same."""
        return {}

    # -- how to train it -----------------------------------------------------------------------
    lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0

    def tokens_per_sample(self, window: int) -> int:
        raise NotImplementedError

    def train_loss(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss to minimise, {name: detached scalar tensor} for logging) for one (micro-)batch in train mode."""
        raise NotImplementedError

    def val_loss(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> torch.Tensor:
        """Validation metric of one batch (mean over the batch), model in eval mode, under no_grad."""
        raise NotImplementedError

    def val_losses(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Validation metrics of one batch: ``loss`` (ranks epochs: best model, early stopping) and any others
        logged beside it under ``val/<name>``."""
        return {"loss": self.val_loss(model, x, stamp)}


def _from_pretrained(cls: type[CheckpointMixin], path: str, what: str) -> nn.Module:
    model = cls.from_pretrained(path)
    logger.info("%s: starting from %s", what, path)
    return model


class TokenizerStage(Stage):
    """Stage 1: reconstruct normalised windows through the BSQ bottleneck (spec §6.2)."""

    name = "tokenizer"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.lr = config.tokenizer_learning_rate
        self.betas = (config.adam_beta1, config.tokenizer_adam_beta2)
        self.grad_clip = config.tokenizer_grad_clip

    @property
    def folder_name(self) -> str:
        return self.config.tokenizer_save_folder_name

    @property
    def model_class(self) -> type[CheckpointMixin]:

        return KronosTokenizer

    def initial_model(self) -> nn.Module:

        path = self.config.pretrained_tokenizer_path
        if path:
            return _from_pretrained(self.model_class, path, "tokenizer")
        preset = self.config.tokenizer_preset
        if preset not in TOKENIZER_PRESETS:
            raise ConfigError(
                f"config key 'tokenizer_preset' must be one of {sorted(TOKENIZER_PRESETS)}, got '{preset}'"
            )
        logger.info("tokenizer: training from scratch (preset '%s')", preset)
        return build_tokenizer(preset)

    def tokens_per_sample(self, window: int) -> int:
        return window

    def train_loss(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        (z_pre, z), bsq_loss, _, _ = model(x)
        # Losses in float32 whatever the autocast dtype of the forward pass.
        mse_pre = F.mse_loss(z_pre.float(), x)
        mse = F.mse_loss(z.float(), x)
        bsq = bsq_loss.float()
        loss = (mse_pre + mse + bsq) / 2
        return loss, {"loss": loss.detach(), "recon_pre": mse_pre.detach(), "recon": mse.detach(), "bsq": bsq.detach()}

    def val_loss(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> torch.Tensor:
        (_, z), _, _, _ = model(x)
        return F.mse_loss(z.float(), x)  # full-path reconstruction only (spec §6.2)


class PredictorStage(Stage):
    """Stage 2: next-token cross-entropy on tokens from the frozen, finetuned tokenizer (spec §6.3)."""

    name = "predictor"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.lr = config.predictor_learning_rate
        self.betas = (config.adam_beta1, config.adam_beta2)
        self.grad_clip = config.predictor_grad_clip
        self.teacher_forcing = config.teacher_forcing  # False = the released scripts' sampled sibling (Q13)
        self.tokenizer: nn.Module | None = None

    @property
    def folder_name(self) -> str:
        return self.config.predictor_save_folder_name

    @property
    def model_class(self) -> type[CheckpointMixin]:

        return Kronos

    def initial_model(self) -> nn.Module:

        path = self.config.pretrained_predictor_path
        if path:
            return _from_pretrained(self.model_class, path, "predictor")
        preset = self.config.predictor_preset
        if preset not in PREDICTOR_PRESETS:
            raise ConfigError(
                f"config key 'predictor_preset' must be one of {sorted(PREDICTOR_PRESETS)}, got '{preset}'"
            )
        logger.info("predictor: training from scratch (preset '%s')", preset)
        return build_predictor(preset)

    def prepare(self, device: torch.device) -> None:

        path = self.config.finetuned_tokenizer

        if not self.config.explicit("finetuned_tokenizer_path") and resolve_folder(path) is None:
            raise CheckpointError(
                f"finetuned tokenizer '{path}' does not exist; run the tokenizer stage first "
                "(finetune/train_tokenizer.py or `kronos train-tokenizer`) or set finetuned_tokenizer_path"
            )
        try:
            tok = KronosTokenizer.from_pretrained(path)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc} (the predictor stage needs the tokenizer stage's output; "
                "run the tokenizer stage first or fix finetuned_tokenizer_path)"
            ) from None
        tok.to(device).eval()
        for p in tok.parameters():
            p.requires_grad_(False)
        self.tokenizer = tok

        self.tokenizer_sha256 = weights_sha256(tok)
        logger.info(
            "predictor: tokenising with the frozen tokenizer at %s (weights sha256 %s)",
            path,
            self.tokenizer_sha256[:12],
        )

    def inputs_fingerprint(self) -> dict[str, str]:
        sha = getattr(self, "tokenizer_sha256", None)
        return {"tokenizer_sha256": sha} if sha else {}

    def check_model(self, model: nn.Module) -> None:
        tok = self.tokenizer
        if tok is None:
            return
        for attr in ("s1_bits", "s2_bits"):
            a, b = getattr(tok, attr, None), getattr(model, attr, None)
            if a is not None and b is not None and int(a) != int(b):
                raise CheckpointError(
                    f"tokenizer and predictor disagree on {attr} ({a} vs {b}); pick a predictor preset or "
                    "checkpoint built for this tokenizer"
                )

    def tokens_per_sample(self, window: int) -> int:
        return window - 1

    @torch.no_grad()
    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Tokenise in float32 even inside an autocast region, so training sees the tokens inference sees.
        assert self.tokenizer is not None, "PredictorStage.prepare() was not called"
        with torch.autocast(device_type=x.device.type, enabled=False):
            s1, s2 = self.tokenizer.encode(x.float(), half=True)
        return s1, s2

    def _logits(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor):
        s1, s2 = self._tokens(x)
        t1, t2 = s1[:, 1:], s2[:, 1:]
        logits1, logits2 = model(
            s1[:, :-1],
            s2[:, :-1],
            stamp[:, :-1],
            use_teacher_forcing=self.teacher_forcing,
            s1_targets=t1 if self.teacher_forcing else None,
        )
        ce1 = F.cross_entropy(logits1.float().reshape(-1, logits1.shape[-1]), t1.reshape(-1))
        ce2 = F.cross_entropy(logits2.float().reshape(-1, logits2.shape[-1]), t2.reshape(-1))
        return ce1, ce2

    def train_loss(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce1, ce2 = self._logits(model, x, stamp)
        loss = (ce1 + ce2) / 2
        return loss, {"loss": loss.detach(), "ce_s1": ce1.detach(), "ce_s2": ce2.detach()}

    def val_loss(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> torch.Tensor:
        return self.val_losses(model, x, stamp)["loss"]

    def val_losses(self, model: nn.Module, x: torch.Tensor, stamp: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss``: causal cross-entropy (ranks epochs); ``loss_official``: the official number, whose s2 part
        runs the dependency layer non-causally in eval mode (Q4), so each position's s2 logits see later
        positions, the target included; kept so old runs compare, never used to pick a model."""
        raw = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the Kronos module
        raw = getattr(raw, "module", raw)  # DDP wrapper
        s1, s2 = self._tokens(x)
        t1, t2 = s1[:, 1:], s2[:, 1:]
        logits1, context = raw.decode_s1(s1[:, :-1], s2[:, :-1], stamp[:, :-1])
        if self.teacher_forcing:
            sibling = t1
        else:  # one sampled sibling per position (Q13), shared by both numbers
            probs = F.softmax(logits1.detach().float(), dim=-1)
            sibling = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(t1.shape)
        ce1 = F.cross_entropy(logits1.float().reshape(-1, logits1.shape[-1]), t1.reshape(-1))
        cross = raw.dep_layer.cross_attn
        out = {}
        for name, causal in (("loss", True), ("loss_official", False)):
            before = cross.causal_in_eval
            cross.causal_in_eval = causal
            try:
                logits2 = raw.decode_s2(context, sibling)
            finally:
                cross.causal_in_eval = before
            ce2 = F.cross_entropy(logits2.float().reshape(-1, logits2.shape[-1]), t2.reshape(-1))
            out[name] = (ce1 + ce2) / 2
        return out


STAGES: dict[str, type[Stage]] = {"tokenizer": TokenizerStage, "predictor": PredictorStage}


def get_stage(name: str, config: Config) -> Stage:
    try:
        return STAGES[name](config)
    except KeyError:
        raise ConfigError(f"unknown training stage '{name}'; use one of {sorted(STAGES)}") from None
