"""Compare the starter's predictor shapes at an equal wall-time budget (the README's shape table).

Trains the recipe's tokenizer once, then each shape of ``kronos.train.starter.PREDICTOR_SHAPES`` for as many
optimizer steps as fit in ``--minutes`` (measured seconds per step of that shape), and prints its best causal
validation loss. Usage: ``python tools/compare_starter_shapes.py --minutes 5``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from kronos.train.starter import DEFAULT_DATA, PREDICTOR_SHAPES, RECIPE, build_starter


def seconds_per_step(shape: dict, batch: int, window: int) -> float:
    from kronos.model import build_predictor

    torch.manual_seed(0)
    model = build_predictor(dict(shape))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    v = 2 ** int(shape["s1_bits"])
    s1 = torch.randint(0, v, (batch, window))
    s2 = torch.randint(0, v, (batch, window))
    stamp = torch.zeros(batch, window, 5, dtype=torch.long)
    for i in range(6):
        if i == 1:
            t0 = time.perf_counter()
        l1, l2 = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:])
        loss = torch.nn.functional.cross_entropy(
            l1.reshape(-1, v), s1[:, 1:].reshape(-1)
        ) + torch.nn.functional.cross_entropy(l2.reshape(-1, v), s2[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--work", default="outputs/starter_compare")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per shape")
    ap.add_argument("--shapes", nargs="*", default=sorted(PREDICTOR_SHAPES))
    ap.add_argument("--record", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    batch, window = RECIPE["batch_size"], RECIPE["lookback_window"] + RECIPE["predict_window"] + 1
    work = Path(args.work)
    rows = []
    for i, name in enumerate(args.shapes):
        sps = seconds_per_step(PREDICTOR_SHAPES[name], batch, window)
        steps = max(4, int(args.minutes * 60 / sps))
        per_epoch = max(1, steps // 4)
        over = {"predictor": {"epochs": 4, "n_train_iter": per_epoch * batch}}
        cards = build_starter(
            args.data, str(work / name), str(work / "build"), name, stage_overrides=over, skip_tokenizer=i > 0
        )
        t = cards["predictor"]["training"]
        row = {
            "shape": name,
            "parameters": cards["predictor"]["parameters"],
            "s_per_step": round(sps, 3),
            "steps": t["steps"],
            "wall_s": t["wall_time_s"],
            "best_val_loss": t["best_val_loss"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.record:
        Path(args.record).write_text(
            json.dumps(
                {"minutes_per_shape": args.minutes, "batch_size": batch, "window": window, "rows": rows}, indent=1
            )
            + "\n"
        )
    print(
        f"\n| shape | parameters | s/step (batch {batch}) | steps in {args.minutes:.0f} min | wall s | best val loss |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['parameters']:,} | {r['s_per_step']} | {r['steps']} | {r['wall_s']} | "
            f"{r['best_val_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
