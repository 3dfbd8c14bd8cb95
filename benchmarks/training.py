"""Training throughput of both stages: kronos.train's step vs the same step written the official way.

Shapes: Tokenizer-base (3.96M parameters) and the Kronos-small predictor (24.7M), batch 16 (``--batch``), windows of
101 rows
(lookback 90 + predict 10 + 1), on the bundled real Qlib demo data (``examples/data/qlib_cn_demo``).

* ours: ``kronos.train.Trainer`` (WindowDataset + ``window_loader`` + ``Trainer.train_step``: fp32 on CPU, bf16
  autocast on CUDA by default, loss in fp32, global-norm clipping, AdamW, OneCycleLR).
* official-style: fp32, the per-sample pandas ``iloc`` dataset through a ``DataLoader(batch_size=16)``, and the
  official scripts' loop (forward, loss, backward, clip, AdamW, OneCycleLR, ``loss.item()`` every step; the
  predictor conditions the s2 head on a sampled s1 as the released script does).

Each measurement times a few optimizer steps (data loading included) after warm-up steps; ours and official
steps alternate in rounds so machine load hits both alike; the median step time is reported. On CUDA the table
adds our fp32 step (true float32: TF32 is only switched on inside mixed-precision steps) for the bf16 / fp32 ratio,
and with ``--compile`` our bf16 step under ``torch.compile`` (warm-up steps absorb the compile time).
Target on CUDA: bf16 at least 2x the fp32 tokens/s for the predictor.

Run: ``python benchmarks/training.py [--steps 3] [--warmup 1] [--rounds 2] [--device cpu|cuda|auto] [--batch 50]
[--compile] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
try:
    import kronos  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_loading import PandasIlocDataset, read_qlib_frame  # noqa: E402  (the official-style dataset)
from kronos.config import Config  # noqa: E402
from kronos.data.windows import WindowDataset  # noqa: E402
from kronos.model import build_predictor, build_tokenizer  # noqa: E402
from kronos.train import Trainer, get_stage  # noqa: E402
from kronos.train.distributed import DistContext  # noqa: E402

BATCH, LOOKBACK, PREDICT = 16, 90, 10  # BATCH: the default of --batch
BF16_TARGET = 2.0  # predictor tokens/s, bf16 over fp32, on CUDA


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds per call of ``step`` over ``n`` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def ours(
    stage: str,
    ds: WindowDataset,
    device: torch.device,
    precision: str,
    tok_folder: Path,
    save: Path,
    n_steps: int,
    compile: bool = False,
) -> Callable[[], None]:
    """A step function running kronos.train's Trainer on ``ds``."""
    cfg = Config.from_dict(
        dict(
            device=device.type,
            precision=precision,
            batch_size=BATCH,
            lookback_window=LOOKBACK,
            predict_window=PREDICT,
            n_train_iter=BATCH * n_steps,
            n_val_iter=BATCH,
            epochs=1,
            pretrained_tokenizer_path="",
            pretrained_predictor_path="",
            tokenizer_preset="base",
            predictor_preset="small",
            save_path=str(save),
            finetuned_tokenizer_path=str(tok_folder),
            checkpoint_interval=0,
            seed=100,
            compile=compile,
        )
    )
    trainer = Trainer(get_stage(stage, cfg), cfg, DistContext(device=device))
    trainer.setup(datasets=(ds, ds))
    trainer.train_sampler.set_epoch(0)
    batches = iter(trainer.train_loader)

    def step() -> None:
        x, stamp = next(batches)
        trainer.train_step(x, stamp)

    return step


def official(
    stage: str, ds: PandasIlocDataset, device: torch.device, tok_folder: Path, n_steps: int
) -> Callable[[], None]:
    """A step function written like the official finetune scripts (fp32)."""
    from kronos.model import KronosTokenizer

    torch.manual_seed(100)
    if stage == "tokenizer":
        model = build_tokenizer("base").to(device).train()
        lr, betas, clip = 2e-4, (0.9, 0.999), 2.0
    else:
        model = build_predictor("small").to(device).train()
        tokenizer = KronosTokenizer.from_pretrained(tok_folder).to(device).eval()
        lr, betas, clip = 4e-5, (0.9, 0.95), 3.0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, steps_per_epoch=n_steps, epochs=1, pct_start=0.03, div_factor=10
    )
    loader = DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True, pin_memory=device.type == "cuda"
    )
    batches = iter(loader)

    def step() -> None:
        x, stamp = next(batches)
        x = x.to(device, non_blocking=True)
        stamp = stamp.to(device, non_blocking=True)
        if stage == "tokenizer":
            (z_pre, z), bsq_loss, _, _ = model(x)
            loss = (F.mse_loss(z_pre, x) + F.mse_loss(z, x) + bsq_loss) / 2
        else:
            with torch.no_grad():
                s1, s2 = tokenizer.encode(x, half=True)
            l1, l2 = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1])  # sampled sibling (Q13)
            loss = (
                F.cross_entropy(l1.reshape(-1, l1.shape[-1]), s1[:, 1:].reshape(-1))
                + F.cross_entropy(l2.reshape(-1, l2.shape[-1]), s2[:, 1:].reshape(-1))
            ) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss.item()

    return step


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "examples" / "data" / "qlib_cn_demo"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the first round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median reported)")
    parser.add_argument("--stages", default="tokenizer,predictor")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--batch", type=int, default=BATCH, help="windows per optimizer step")
    parser.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()
    BATCH = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    cuda = device.type == "cuda"

    frame = read_qlib_frame(Path(args.data), copies=1)
    fast = WindowDataset(frame, LOOKBACK, PREDICT)
    slow = PandasIlocDataset(frame, LOOKBACK, PREDICT)
    n_total = args.warmup + args.rounds * args.steps
    print(
        f"data: {len(frame):,} rows, {len(fast):,} windows of {fast.window} rows; batch {BATCH}; "
        f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, "
        f"{torch.get_num_threads()} CPU threads"
    )

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok_folder = Path(tmp) / "tokenizer"
        torch.manual_seed(0)
        build_tokenizer("base").save_pretrained(tok_folder)
        for stage in args.stages.split(","):
            tokens = BATCH * (fast.window if stage == "tokenizer" else fast.window - 1)
            variants = {
                "ours": ours(stage, fast, device, "auto", tok_folder, Path(tmp) / "o1", n_total),
                "official": official(stage, slow, device, tok_folder, n_total),
            }
            if cuda:
                variants["ours fp32"] = ours(stage, fast, device, "fp32", tok_folder, Path(tmp) / "o2", n_total)
            if args.compile:
                variants["ours compiled"] = ours(
                    stage, fast, device, "auto", tok_folder, Path(tmp) / "o3", n_total, compile=True
                )
            for fn in variants.values():
                for _ in range(args.warmup):
                    fn()
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    times[name].append(time_steps(fn, args.steps, device))
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append((stage, tokens, med))

    prec = _auto_precision(device)
    label = {
        "ours": f"kronos.train ({prec})",
        "official": "official-style (fp32)",
        "ours fp32": "kronos.train (fp32)",
        "ours compiled": f"kronos.train ({prec}+compile)",
    }
    print(f"\n{'stage':10s} {'path':28s} {'s/step':>8s} {'steps/s':>8s} {'tokens/s':>10s} {'vs official':>12s}")
    report = {"device": str(device), "batch": BATCH, "precision": prec, "stages": {}, "missed": []}
    for stage, tokens, med in results:
        for name, t in med.items():
            ratio = med["official"] / t
            print(f"{stage:10s} {label[name]:28s} {t:8.3f} {1 / t:8.2f} {tokens / t:10,.0f} {ratio:11.2f}x")
        entry = {label[k]: {"s_per_step": t, "tokens_per_s": tokens / t} for k, t in med.items()}
        if "ours fp32" in med:
            speedup = med["ours fp32"] / med["ours"]
            entry[f"{prec} / fp32"] = speedup
            print(f"{stage:10s} {prec + ' / fp32 speed-up':28s} {speedup:>41.2f}x")
            if stage == "predictor" and speedup < BF16_TARGET:
                report["missed"].append(f"predictor {prec}/fp32 {speedup:.2f}x < {BF16_TARGET}x")
        if "ours compiled" in med:
            speedup = med["ours"] / med["ours compiled"]
            entry["compile speed-up"] = speedup
            print(f"{stage:10s} {'compile speed-up':28s} {speedup:>41.2f}x")
        report["stages"][stage] = entry
    if cuda:
        print(
            f"target: predictor bf16 >= {BF16_TARGET}x fp32 tokens/s: "
            f"{'missed (' + '; '.join(report['missed']) + ')' if report['missed'] else 'met'}"
        )
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _auto_precision(device: torch.device) -> str:
    from kronos.train.distributed import resolve_precision

    return resolve_precision(Config(precision="auto"), device).name


if __name__ == "__main__":
    main()
