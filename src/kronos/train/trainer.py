"""One training loop for both stages, on one CPU, one GPU, or ``torchrun`` DDP (one or many nodes).

Usage (the finetune/ scripts are thin wrappers over ``kronos.cli.main``, i.e. ``kronos train-tokenizer|predictor``)::

    python finetune/train_tokenizer.py --config-path my.yaml            # one GPU (or CPU when there is none)
    python finetune/train_tokenizer.py --config-path my.yaml --cpu      # force CPU
    torchrun --standalone --nproc_per_node=8 finetune/train_tokenizer.py --config-path my.yaml
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        finetune/train_predictor.py --config-path my.yaml               # (and node_rank=1 on the other node)
    python finetune/train_predictor.py --config-path my.yaml --resume  # continue from checkpoints/last/

Per optimizer step: ``batch_size`` windows per process, split into ``accumulation_steps`` micro-batches whose
gradients are summed (the official tokenizer script's meaning: accumulation saves memory, it does not change
the effective batch); global-norm clipping; AdamW; OneCycleLR stepped once per optimizer step.

Outputs, under ``save_path/<stage folder>/``: ``checkpoints/best_model/`` (official format, written whenever the
validation loss improves), ``checkpoints/last/`` (everything for an exact resume; written at every epoch end
and every ``checkpoint_interval`` optimizer steps), ``metrics.jsonl``, ``summary.json`` and, when enabled,
TensorBoard events. Only rank 0 writes; for a multi-node ``--resume`` every node must see ``save_path``
(shared storage), since each rank reloads ``checkpoints/last/`` including its own RNG state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kronos import io as kio
from kronos.config import Config
from kronos.data.store import load_manifest
from kronos.data.windows import WindowDataset, WindowSampler, window_loader
from kronos.errors import CheckpointError, ConfigError, DataError, TrainingError
from kronos.model import KronosTokenizer
from kronos.model.hub import CARD_NAME, read_card, weights_sha256
from kronos.runlock import run_locks
from kronos.train import checkpoint as ckpt
from kronos.train import finetune
from kronos.train.distributed import (
    DistContext,
    Precision,
    all_gather_bytes,
    all_reduce_min_int,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    deterministic_cpu,
    on_main,
    process_group,
    resolve_precision,
)
from kronos.train.stages import Stage, get_stage
from kronos.train.tracking import Tracker

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
# Config keys whose change makes a resumed run's schedule or sample order differ from the interrupted one.
_RESUME_KEYS = (
    "epochs",
    "batch_size",
    "n_train_iter",
    "accumulation_steps",
    "seed",
    "lookback_window",
    "predict_window",
)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains one stage. ``fit()`` runs the epochs; ``train_step()`` is one optimizer step (used by benchmarks)."""

    def __init__(self, stage: Stage, config: Config, ctx: DistContext) -> None:
        self.stage = stage
        self.config = config
        self.ctx = ctx
        self.device = ctx.device
        self.precision: Precision = resolve_precision(config, ctx.device)
        self.stage_dir = Path(config.save_path) / stage.folder_name
        self.ckpt_dir = self.stage_dir / "checkpoints"
        # the stage's finetuned path: <stage dir>/checkpoints/best_model, or exactly where finetuned_<stage>_path says
        # (an explicit path means "write the new checkpoint here"; the next stage reads it from there)
        self.best_dir = Path(getattr(config, f"finetuned_{stage.name}"))
        self.last_dir = self.ckpt_dir / "last"
        config.validate()  # keys may have been set on the object after it was built
        # counters (restored on resume)
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_val = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped_early = False
        self.elapsed = 0.0  # wall seconds over all (resumed) runs
        self.epochs_run = 0
        self.history: list[dict] = []
        # running sums of the train metrics since the last log row (kept in last/ so logs resume exactly)
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_n = 0
        # skipped (non-finite) steps: in a row, since the last log row, and in total
        self._nonfinite_run = 0
        self._nonfinite_logged = 0
        self.nonfinite_total = 0
        self.start_val_loss: float | None = None  # validation loss of the pretrained start (before step 1)
        self.train_seconds = 0.0  # wall seconds inside optimizer steps (data included), this process
        self._steps_this_process = 0

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, resume: bool = False, datasets: tuple | None = None) -> None:
        """Data, model, optimizer, schedule; then, with ``resume``, the state of ``checkpoints/last/``."""
        cfg = self.config
        seed_everything(cfg.seed + self.ctx.rank)

        self.resume_from: Path | None = kio.resolve_folder(self.last_dir) if resume else None
        if resume and self.resume_from is None:
            logger.warning("--resume: no checkpoint at %s; starting from the beginning", self.last_dir)
        state = ckpt.read_json(self.resume_from / ckpt.TRAINER_STATE) if self.resume_from else None
        if state is not None:
            self._check_resume_config(state)

        # data
        if datasets is None:
            datasets = (WindowDataset.from_config(cfg, "train"), WindowDataset.from_config(cfg, "val"))
        self.train_ds, self.val_ds = datasets

        r, w = self.ctx.rank, self.ctx.world_size
        # An epoch is min(n_train_iter, windows) samples, as the official dataset's min(n_samples, len(indices)):
        # a small dataset is not passed over many times per "epoch" (and the OneCycle schedule is not stretched).
        self.train_samples = min(cfg.n_train_iter, len(self.train_ds))
        self.val_samples = min(cfg.n_val_iter, len(self.val_ds))
        self.train_sampler = WindowSampler(len(self.train_ds), self.train_samples, seed=cfg.seed, rank=r, world_size=w)
        self.val_sampler = WindowSampler(len(self.val_ds), self.val_samples, seed=cfg.seed, rank=r, world_size=w)
        steps = self.train_sampler.per_rank // cfg.batch_size
        self.steps_per_epoch = all_reduce_min_int(self.ctx, steps)
        self.val_steps = math.ceil(self.val_sampler.per_rank / cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"an epoch of min(n_train_iter {cfg.n_train_iter}, {len(self.train_ds)} training windows) gives "
                f"{self.train_sampler.per_rank} samples per process, fewer than one batch of batch_size "
                f"{cfg.batch_size}; lower batch_size, raise n_train_iter or use more training data"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        # One vectorised get_batch per batch; a private generator keeps DataLoader iterator creation off the
        # global torch RNG (exact resume). Indices come from the sampler in the main process, so workers never
        # replay one another's samples (Q15).
        self.train_loader = window_loader(
            self.train_ds,
            self.train_sampler,
            cfg.batch_size,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )

        # model
        self.stage.prepare(self.device)
        if state is not None:
            self._check_resume_inputs(state)
        lora = self.stage.name == "predictor" and cfg.finetune_mode == "lora"
        if self.stage.name == "predictor" and cfg.finetune_mode != "full" and not cfg.pretrained_predictor_path:
            raise ConfigError(
                f"finetune_mode '{cfg.finetune_mode}' finetunes a pretrained predictor, and "
                "pretrained_predictor_path is empty; set it (e.g. examples/models/starter/predictor) "
                "or use finetune_mode full to train from scratch"
            )
        if self.resume_from is not None and not lora:
            raw: nn.Module = self.stage.model_class.from_pretrained(str(self.resume_from))
        else:  # LoRA resumes from the pretrained weights plus the adapters saved in last/
            raw = self.stage.initial_model()
        self.stage.check_model(raw)
        raw = finetune.apply_finetune_mode(raw, cfg, self.stage.name)
        if self.resume_from is not None and lora:
            finetune.load_adapter(raw, self.resume_from)
        raw.to(self.device)
        raw.train()
        self.raw_model = raw
        model: nn.Module = raw
        if cfg.compile:
            model = torch.compile(model)
        self.eval_model = model
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model

        params = [p for p in raw.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=self.stage.lr, betas=self.stage.betas, weight_decay=cfg.adam_weight_decay
        )
        # Q14: with cycle_momentum (official default) OneCycleLR drives Adam's beta1 between 0.95 and 0.85.
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=self.stage.lr,
            total_steps=self.total_steps,
            pct_start=cfg.pct_start,
            div_factor=cfg.div_factor,
            cycle_momentum=cfg.cycle_momentum,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)

        if state is not None:
            self._load_training_state(state)

    def _check_resume_config(self, state: dict) -> None:
        saved = state.get("config", {})
        changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(self.config, k)]
        if int(state.get("world_size", self.ctx.world_size)) != self.ctx.world_size:
            changed.append("world_size")
        if changed:
            detail = ", ".join(
                f"{k}: {saved.get(k, state.get(k))} -> {getattr(self.config, k, self.ctx.world_size)}" for k in changed
            )
            raise CheckpointError(
                f"cannot resume from {self.resume_from}: {detail} changed since it was written; restore those "
                "settings or train without --resume"
            )

    def _check_resume_inputs(self, state: dict) -> None:
        """A resumed predictor must train on the very tokenizer it started with (its tokens define the task)."""
        saved = state.get("inputs") or {}
        for key, now in self.stage.inputs_fingerprint().items():
            before = saved.get(key)
            if before is not None and before != now:
                what = key.replace("_sha256", "")
                raise CheckpointError(
                    f"cannot resume from {self.resume_from}: it was trained on a different {what} (weights sha256 "
                    f"{before[:12]}, now {now[:12]} at {self.config.finetuned_tokenizer}); restore that {what} "
                    "or train without --resume"
                )

    def _load_training_state(self, state: dict) -> None:
        assert self.resume_from is not None
        folder = self.resume_from
        try:
            self.optimizer.load_state_dict(ckpt.load_state(folder, "optimizer"))
            self.scheduler.load_state_dict(ckpt.load_state(folder, "scheduler"))
            if self.precision.use_scaler and (folder / "grad_scaler.json").exists():
                self.scaler.load_state_dict(ckpt.load_state(folder, "grad_scaler"))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot restore optimizer/scheduler from {folder} ({exc}); train without --resume"
            ) from None
        try:
            for key in ("global_step", "epoch", "step_in_epoch", "best_epoch", "bad_epochs", "epochs_run"):
                setattr(self, key, int(state[key]))
            self.best_val = float(state["best_val"]) if state.get("best_val") is not None else math.inf
            self.stopped_early = bool(state.get("stopped_early", False))
            self.elapsed = float(state.get("elapsed", 0.0))
            self.history = list(state.get("history", []))
            self._log_sums = {
                k: torch.tensor(v, dtype=torch.float32, device=self.device)
                for k, v in state.get("log_sums", {}).items()
            }
            self._log_n = int(state.get("log_n", 0))
            self.nonfinite_total = int(state.get("nonfinite_total", 0))
            start = state.get("start_val_loss")
            self.start_val_loss = float(start) if start is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"cannot resume from {folder}: {ckpt.TRAINER_STATE} is damaged ({type(exc).__name__}: "
                f"{exc}); delete the folder to start over or train without --resume"
            ) from None
        rng_file = folder / f"rng_rank{self.ctx.rank}.safetensors"
        if rng_file.exists():
            try:
                ckpt.restore_rng(rng_file.read_bytes())
            except Exception as exc:  # safetensors/torch raise several types for a damaged RNG state
                raise CheckpointError(
                    f"cannot resume from {folder}: {rng_file.name} is damaged ({type(exc).__name__}); "
                    "delete the folder to start over or train without --resume"
                ) from None
        else:
            logger.warning(
                "%s has no RNG state for rank %d; dropout/sampling will differ from the interrupted run",
                folder,
                self.ctx.rank,
            )
        logger.info(
            "resumed from %s at epoch %d, step %d/%d of the epoch (global step %d)",
            folder,
            self.epoch + 1,
            self.step_in_epoch,
            self.steps_per_epoch,
            self.global_step,
        )

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self, x: torch.Tensor, stamp: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on a batch (``batch_size`` windows, split into micro-batches); returns detached parts.

        A non-finite loss or gradient norm skips the update (optimizer, scheduler and loss scaler untouched, the
        gradients dropped); the returned ``nonfinite`` is 1 then. Under fp16 an overflow of the *scaled* gradients
        with a finite loss is the GradScaler's business (it skips and lowers its scale), not counted here.
        """
        with self.precision.compute():
            return self._train_step(x, stamp)

    def _train_step(self, x: torch.Tensor, stamp: torch.Tensor) -> dict[str, torch.Tensor]:
        acc = self.config.accumulation_steps
        x = x.to(self.device, non_blocking=True)
        stamp = stamp.to(self.device, non_blocking=True)
        chunk = x.shape[0] // acc
        sums: dict[str, torch.Tensor] = {}
        for j in range(acc):
            xb, sb = x[j * chunk : (j + 1) * chunk], stamp[j * chunk : (j + 1) * chunk]
            last = j == acc - 1
            sync = contextlib.nullcontext() if (last or not self.ctx.distributed) else self.model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss, parts = self.stage.train_loss(self.model, xb, sb)
                self.scaler.scale(loss / acc).backward()
            for k, v in parts.items():
                sums[k] = sums[k] + v if k in sums else v
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.stage.grad_clip)
        loss_ok = torch.isfinite(sums["loss"]) if "loss" in sums else torch.isfinite(grad_norm).new_ones(())
        # With a loss scaler, inf/nan gradients under a finite loss are scale overflow: the scaler handles them.
        ok = loss_ok if self.precision.use_scaler else loss_ok & torch.isfinite(grad_norm)
        # One decision for every rank (a NaN on one rank must not leave the others stepping alone).
        finite = all_reduce_min_int(self.ctx, int(ok.item())) == 1
        out = {k: v / acc for k, v in sums.items()}
        out["grad_norm"] = grad_norm.detach()
        out["nonfinite"] = torch.tensor(0.0 if finite else 1.0)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        elif self.precision.use_scaler:
            self.scaler.update(self.scaler.get_scale())  # clears the unscale_ record; the scale stays as it was
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def validate(self) -> float:
        """Sample-weighted mean validation loss over every rank's validation windows (the loss that ranks epochs).

        Every metric of :meth:`Stage.val_losses` is kept in ``self.val_metrics`` (e.g. the predictor's
        ``loss_official``, the official non-causal number).
        """
        with self.precision.compute():
            return self._validate()

    @torch.no_grad()
    def _validate(self) -> float:
        model = self.eval_model
        model.eval()
        totals: dict[str, torch.Tensor] = {}
        count = 0
        # Own RNG stream: sampled-sibling validation (teacher_forcing false) is the same every epoch and does not
        # shift the training stream.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed + self.ctx.rank)
            for x, stamp in self._val_batches():
                x = x.to(self.device, non_blocking=True)
                stamp = stamp.to(self.device, non_blocking=True)
                with self.precision.autocast():
                    losses = self.stage.val_losses(model, x, stamp)
                for k, v in losses.items():
                    part = v.detach().double() * x.shape[0]
                    totals[k] = totals[k] + part if k in totals else part
                count += x.shape[0]
        model.train()
        names = sorted(totals) or ["loss"]
        sums = all_reduce_sum(
            self.ctx, [float(totals[k].item()) if k in totals else 0.0 for k in names] + [float(count)]
        )
        n = sums[-1]
        self.val_metrics = {k: (v / n if n else math.nan) for k, v in zip(names, sums[:-1])}
        return self.val_metrics.get("loss", math.nan)

    def _val_batches(self):
        self.val_sampler.set_epoch(0)  # the same validation windows every epoch (official: reseeded with `seed`)
        idx = list(iter(self.val_sampler))
        bs = self.config.batch_size
        for i in range(0, len(idx), bs):
            yield self.val_ds.get_batch(idx[i : i + bs])

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_last(self) -> None:
        """Write ``checkpoints/last/`` (collective: every rank contributes its RNG state)."""
        rng = all_gather_bytes(self.ctx, ckpt.capture_rng())
        if not self.ctx.is_main:
            return
        state = self._trainer_state()

        def fill(folder: Path) -> None:
            finetune.save_plain(self.raw_model, folder)
            finetune.save_adapter(self.raw_model, folder)
            ckpt.save_state(folder, "optimizer", self.optimizer.state_dict())
            ckpt.save_state(folder, "scheduler", self.scheduler.state_dict())
            if self.precision.use_scaler:
                ckpt.save_state(folder, "grad_scaler", self.scaler.state_dict())
            for r, payload in enumerate(rng):
                (folder / f"rng_rank{r}.safetensors").write_bytes(payload)
            kio.write_json(folder / ckpt.TRAINER_STATE, state)

        kio.write_folder(self.last_dir, fill)

    def save_best(self) -> None:
        if self.ctx.is_main:
            kio.write_folder(self.best_dir, lambda folder: finetune.save_plain(self.raw_model, folder))

    def _trainer_state(self) -> dict:
        return {
            "stage": self.stage.name,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "sampler": {"epoch": self.epoch, "start": self.step_in_epoch * self.config.batch_size},
            "best_val": None if not math.isfinite(self.best_val) else self.best_val,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "epochs_run": self.epochs_run,
            "elapsed": self.elapsed + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
            "world_size": self.ctx.world_size,
            "inputs": self.stage.inputs_fingerprint(),
            "history": self.history,
            "log_sums": {k: float(v.item()) for k, v in self._log_sums.items()},
            "log_n": self._log_n,
            "nonfinite_total": self.nonfinite_total,
            "start_val_loss": self.start_val_loss,
            "config": self.config.to_dict(),
        }

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Run the remaining epochs; returns the summary (also written to ``summary.json``)."""
        cfg = self.config
        self._t0 = time.perf_counter()
        tracker = Tracker(
            cfg,
            self.stage_dir,
            self.stage.name,
            active=self.ctx.is_main,
            resume_step=self.global_step if self.resume_from is not None else None,
        )
        if self.ctx.is_main:
            cfg.save(self.stage_dir / "config.json")
            tracker.log_params(cfg.to_dict())
            logger.info(
                "%s: %d epochs x %d steps (batch %d x %d process(es), %s, %s), %d parameters",
                self.stage.name,
                cfg.epochs,
                self.steps_per_epoch,
                cfg.batch_size,
                self.ctx.world_size,
                self.device,
                self.precision.name,
                sum(p.numel() for p in self.params),
            )
            logger.info(
                "%s: epoch = min(n_train_iter %d, %d training windows) = %d samples -> %d steps of batch "
                "%d; validation = min(n_val_iter %d, %d windows) = %d samples -> %d batches; OneCycle over "
                "%d steps",
                self.stage.name,
                cfg.n_train_iter,
                len(self.train_ds),
                self.train_samples,
                self.steps_per_epoch,
                cfg.batch_size,
                cfg.n_val_iter,
                len(self.val_ds),
                self.val_samples,
                self.val_steps,
                self.total_steps,
            )
            logger.info("%s", self.precision.reason)
        tokens_per_step = cfg.batch_size * self.ctx.world_size * self.stage.tokens_per_sample(cfg.window)
        if (
            self.resume_from is None
            and self.stage.name == "predictor"
            and cfg.pretrained_predictor_path
            and self.start_val_loss is None
        ):
            # where finetuning starts from, on the same validation windows (the pipeline's keep_better reads it)
            self.start_val_loss = self.validate()
            if self.ctx.is_main:
                logger.info("predictor: the starting model's val loss %.6f (before finetuning)", self.start_val_loss)
        try:
            while self.epoch < cfg.epochs and not self.stopped_early:
                self._run_epoch(tracker, tokens_per_step)
        finally:
            tracker.close()
        return self._finish()

    def _run_epoch(self, tracker: Tracker, tokens_per_step: int) -> None:

        cfg = self.config
        epoch = self.epoch
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(self.step_in_epoch * cfg.batch_size)
        remaining = self.steps_per_epoch - self.step_in_epoch
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            disable=not self.ctx.is_main,
            desc=f"{self.stage.name} {epoch + 1}/{cfg.epochs}",
            dynamic_ncols=True,
            leave=False,
        )
        t_log, n_timed = time.perf_counter(), 0
        batches = iter(self.train_loader)
        for _ in range(remaining):
            t_step = time.perf_counter()
            x, stamp = next(batches)
            parts = self.train_step(x, stamp)
            self.train_seconds += time.perf_counter() - t_step
            self._steps_this_process += 1
            self.global_step += 1
            self.step_in_epoch += 1
            self._count_nonfinite(bool(parts.pop("nonfinite").item()), parts)
            sums = self._log_sums
            if not self._nonfinite_run:  # a skipped step's NaN parts stay out of the logged means
                for k, v in parts.items():
                    sums[k] = sums[k] + v if k in sums else v
                self._log_n += 1
            n_timed += 1
            bar.update(1)
            if self.global_step % cfg.log_interval == 0 or self.step_in_epoch == self.steps_per_epoch:
                now = time.perf_counter()
                n_sum = max(self._log_n, 1)
                means = {k: float(v.item()) / n_sum for k, v in sums.items()}
                row: dict[str, Any] = {"step": self.global_step, "epoch": epoch + 1}
                row.update({f"train/{k}": v for k, v in means.items() if k != "grad_norm"})
                row["grad_norm"] = means.get("grad_norm")
                row["nonfinite_steps"] = self._nonfinite_logged
                self._nonfinite_logged = 0
                row["lr"] = self.scheduler.get_last_lr()[0]
                row["tokens_per_s"] = tokens_per_step * n_timed / max(now - t_log, 1e-9)
                row["steps_per_s"] = n_timed / max(now - t_log, 1e-9)
                tracker.log(row)
                bar.set_postfix(loss=f"{means.get('loss', math.nan):.4f}", lr=f"{row['lr']:.2e}")
                self._log_sums, self._log_n, t_log, n_timed = {}, 0, now, 0
            interval = cfg.checkpoint_interval
            if interval > 0 and self.global_step % interval == 0 and self.step_in_epoch < self.steps_per_epoch:
                self.save_last()
        bar.close()
        del batches

        val = self.validate()
        self.epochs_run += 1
        improved = math.isfinite(val) and val < self.best_val
        if improved:
            self.best_val, self.best_epoch, self.bad_epochs = val, epoch + 1, 0
            self.save_best()
        else:
            self.bad_epochs += 1
        stop = cfg.patience > 0 and self.bad_epochs >= cfg.patience
        self.stopped_early = broadcast_flag(self.ctx, stop)
        self.epoch += 1
        self.step_in_epoch = 0
        others = {k: v for k, v in getattr(self, "val_metrics", {}).items() if k != "loss"}
        row = {"step": self.global_step, "epoch": epoch + 1, "val/loss": val, "val/best": self.best_val}
        row.update({f"val/{k}": v for k, v in others.items()})
        self.history.append(
            {
                "epoch": epoch + 1,
                "step": self.global_step,
                "val_loss": val if math.isfinite(val) else None,
                **{f"val_{k}": (v if math.isfinite(v) else None) for k, v in others.items()},
            }
        )
        tracker.log(row)
        if self.ctx.is_main:
            extra = "".join(f", {k} {v:.6f}" for k, v in others.items())
            logger.info(
                "%s epoch %d/%d: val loss %.6f%s%s",
                self.stage.name,
                epoch + 1,
                cfg.epochs,
                val,
                extra,
                " (best)" if improved else f" (best {self.best_val:.6f} at epoch {self.best_epoch})",
            )
            if self.stopped_early:
                logger.info("early stopping: no improvement for %d epoch(s)", self.bad_epochs)
        self.save_last()

    def _count_nonfinite(self, skipped: bool, parts: dict) -> None:
        """Count skipped (non-finite) steps; stop after ``max_nonfinite_steps`` of them in a row."""
        if not skipped:
            self._nonfinite_run = 0
            return
        self._nonfinite_run += 1
        self._nonfinite_logged += 1
        self.nonfinite_total += 1
        limit = self.config.max_nonfinite_steps
        if self.ctx.is_main:
            logger.warning(
                "%s step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped "
                "(%d in a row, stop at %d)",
                self.stage.name,
                self.global_step,
                float(parts["loss"]) if "loss" in parts else "?",
                float(parts["grad_norm"]),
                self._nonfinite_run,
                limit,
            )
        if self._nonfinite_run >= limit:
            raise TrainingError(
                f"{self.stage.name} training stopped at step {self.global_step}: {self._nonfinite_run} non-finite "
                f"losses/gradients in a row (config key 'max_nonfinite_steps' = {limit}); check the data for "
                "NaN/inf, lower the learning rate, or use precision fp32"
            )

    def _finish(self) -> dict:
        elapsed = self.elapsed + (time.perf_counter() - self._t0)
        summary = {
            "stage": self.stage.name,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "best_epoch": self.best_epoch,
            "start_val_loss": self.start_val_loss,
            "epochs_run": self.epochs_run,
            "epochs": self.config.epochs,
            "stopped_early": self.stopped_early,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "val_steps": self.val_steps,
            "train_windows": len(self.train_ds),
            "val_windows": len(self.val_ds),
            "samples_seen": self.global_step * self.config.batch_size * self.ctx.world_size,
            "parameters": int(sum(p.numel() for p in self.raw_model.parameters())),
            "trainable_parameters": int(sum(p.numel() for p in self.params)),
            "seconds_per_step": (self.train_seconds / self._steps_this_process) if self._steps_this_process else None,
            "nonfinite_steps": self.nonfinite_total,
            "wall_time_s": elapsed,
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "precision": self.precision.name,
            "best_model": str(self.best_dir),
            "last_checkpoint": str(self.last_dir),
            "history": self.history,
            "config": self.config.to_dict(),
        }
        if self.ctx.is_main:
            kio.write_json(self.stage_dir / SUMMARY_FILE, summary)
            self._write_card(summary)
            logger.info(
                "%s done: best val loss %s at epoch %d; best model in %s",
                self.stage.name,
                summary["best_val_loss"],
                self.best_epoch,
                self.best_dir,
            )
        barrier(self.ctx)
        return summary

    def _write_card(self, summary: dict) -> None:
        """``model_card.json`` beside the best checkpoint: the data it saw (its cutoff: the last validation bar, since
        validation picked it), where it started and how it was trained."""

        if kio.resolve_folder(self.best_dir) is None:
            return
        cfg = self.config

        try:
            info = load_manifest(cfg.dataset_path).get("splits") or {}
        except DataError:  # windows handed in directly (benchmarks): no manifest to name the dates
            info = {}
        splits = {
            s: (
                (pd.Timestamp(info[s]["first"]), pd.Timestamp(info[s]["last"]))
                if isinstance(info.get(s), dict) and info[s].get("first") and info[s].get("last")
                else None
            )
            for s in ("train", "val")
        }
        ends = [b[1] for b in splits.values() if b]
        start = cfg.pretrained_predictor_path if self.stage.name == "predictor" else cfg.pretrained_tokenizer_path
        parent = read_card(start) if start else None
        card = {
            "made_by": "kronos-kline",
            "stage": self.stage.name,
            "data_end": str(max(ends).date()) if ends else None,
            "data": {
                "dataset": cfg.dataset_path,
                "source": cfg.data_source,
                **{s: ({"first": str(b[0]), "last": str(b[1])} if b else None) for s, b in splits.items()},
            },
            "started_from": start or f"preset {getattr(cfg, f'{self.stage.name}_preset')} (from scratch)",
            "started_from_data_end": (parent or {}).get("data_end"),
            "finetune_mode": cfg.finetune_mode if self.stage.name == "predictor" else "full",
            "steps": summary["global_step"],
            "best_epoch": summary["best_epoch"],
            "best_val_loss": summary["best_val_loss"],
            "seed": cfg.seed,
        }
        if self.stage.name == "predictor":  # the tokenizer it learned the tokens of (this run's)
            card["tokenizer"] = {"path": cfg.finetuned_tokenizer, **self.stage.inputs_fingerprint()}
        kio.write_json(self.best_dir / CARD_NAME, card)


# ---------------------------------------------------------------------------------------------- entry points
def run_stage(stage_name: str, config: Config, resume: bool = False) -> dict:
    """Train ``stage_name`` ('tokenizer' or 'predictor') with ``config``; returns the run summary.

    The stage holds :func:`~kronos.train.distributed.process_group` for its work: it joins the group of an outer
    entry point (``kronos pipeline``) or, called alone under ``torchrun``, sets one up and removes it after."""

    stage = get_stage(stage_name, config)
    with process_group(config) as ctx, contextlib.ExitStack() as held:

        def claim() -> None:
            # one run per output folder: rank 0 locks save_path (re-entrant inside the pipeline's own lock) and
            # moves back the checkpoints a killed older version left at <name>.prev (the lock heals those under
            # save_path; an explicit finetuned path may lie elsewhere)
            held.enter_context(run_locks([config.save_path]))
            kio.heal_folder(getattr(config, f"finetuned_{stage.name}"))
            kio.heal_folder(Path(config.save_path) / stage.folder_name / "checkpoints" / "last")

        on_main(claim)  # the other ranks wait for the lock: a refusal ends every rank at once
        with deterministic_cpu(ctx.device.type == "cpu"):
            trainer = Trainer(stage, config, ctx)
            trainer.setup(resume=resume)
            return trainer.fit()


def train_tokenizer(config: Config, resume: bool = False) -> dict:
    """Stage 1: finetune (or train from a preset) the tokenizer; best checkpoint in ``config.finetuned_tokenizer``.

    With ``finetune_tokenizer: false`` the pretrained tokenizer is kept: it is copied, unchanged, to
    ``config.finetuned_tokenizer`` (the run's tokenizer), so the predictor learns on the tokens it was pretrained on.
    """
    if not config.finetune_tokenizer:
        return keep_pretrained_tokenizer(config)
    return run_stage("tokenizer", config, resume)


def keep_pretrained_tokenizer(config: Config) -> dict:
    """Copy the pretrained tokenizer unchanged as the run's tokenizer (``finetune_tokenizer: false``)."""

    src = config.pretrained_tokenizer_path
    if not src:
        raise ConfigError(
            "finetune_tokenizer is false but pretrained_tokenizer_path is empty: there is no tokenizer "
            "to keep; set pretrained_tokenizer_path (e.g. examples/models/starter/tokenizer) or set "
            "finetune_tokenizer true"
        )
    with process_group(config):
        summary = {"stage": "tokenizer", "kept_pretrained": src, "trained": False}

        def keep() -> None:
            tok = KronosTokenizer.from_pretrained(src)
            target = Path(config.finetuned_tokenizer)
            kio.write_folder(target, lambda folder: tok.save_pretrained(folder))
            summary.update(best_model=str(target), weights_sha256=weights_sha256(tok))
            kio.write_json(Path(config.tokenizer_dir) / SUMMARY_FILE, summary)
            logger.info(
                "tokenizer: finetune_tokenizer false: kept the pretrained tokenizer %s (copied to %s)", src, target
            )

        on_main(keep)  # rank 0 copies it while the others wait; a tokenizer it cannot load ends every rank at once
        return summary


def train_predictor(config: Config, resume: bool = False) -> dict:
    """Stage 2: finetune the predictor on tokens of the frozen finetuned tokenizer (run stage 1 first)."""
    return run_stage("predictor", config, resume)
