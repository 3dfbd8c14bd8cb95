"""CUDA checks (marked ``gpu``; skipped without CUDA; ``make gpu-check`` runs them on a GPU machine): parity with the
official outputs in fp32 (cached and uncached), greedy cached = uncached, one bf16 step of every preset, TF32
restored after training, and the resume round trip on CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from _support.training import tiny_config
from kronos.config import Config
from kronos.inference import KronosPredictor
from kronos.model import PREDICTOR_PRESETS, TOKENIZER_PRESETS, Kronos, KronosTokenizer, build_predictor, build_tokenizer
from kronos.train import Trainer, get_stage, train_tokenizer
from kronos.train.distributed import DistContext, resolve_precision

pytestmark = pytest.mark.gpu
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "parity-tiny"
COLUMNS = ["open", "high", "low", "close", "volume", "amount"]
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """Parity needs true float32 matmuls; every test must also leave the flag as it found it."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    assert torch.backends.cuda.matmul.allow_tf32 is False, "something left TF32 switched on"
    torch.backends.cuda.matmul.allow_tf32 = before


def _manifest() -> dict:
    return json.loads((FIXTURE / "manifest.json").read_text(encoding="utf-8"))


def _series(frame, start, length, pred_len, columns):
    ctx = frame.iloc[start : start + length].reset_index(drop=True)
    future = frame.iloc[start + length : start + length + pred_len].reset_index(drop=True)
    return ctx[columns], ctx["timestamps"], future["timestamps"]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_parity_fixture_on_cuda_fp32(use_cache: bool) -> None:
    manifest = _manifest()
    ckpt = manifest["checkpoints"]["tiny"]
    tokenizer = KronosTokenizer.from_pretrained(FIXTURE / ckpt["tokenizer"])
    model = Kronos.from_pretrained(FIXTURE / ckpt["predictor"])
    frame = pd.read_csv(FIXTURE / manifest["input_csv"], parse_dates=["timestamps"])
    rel_tol = min(manifest["comparison"]["rel_tol"], 1e-4)
    cases = [c for c in manifest["cases"] if c["kind"] in ("predict", "predict_batch")]
    assert cases
    for case in cases:
        predictor = KronosPredictor(model, tokenizer, device="cuda", max_context=case["max_context"], clip=case["clip"])
        kwargs = dict(
            T=case["T"],
            top_k=case["top_k"],
            top_p=case["top_p"],
            sample_count=case["sample_count"],
            verbose=False,
            use_cache=use_cache,
        )
        specs = case["series"] if case["kind"] == "predict_batch" else [case]
        inputs = [
            _series(frame, s["context_start"], s["context_len"], case["pred_len"], case["columns"]) for s in specs
        ]
        dfs, xts, yts = (list(v) for v in zip(*inputs))
        outputs = predictor.predict_batch(dfs, xts, yts, case["pred_len"], **kwargs)
        eps = case.get("eps", manifest["comparison"]["eps"])
        for got, expected_file in zip(outputs, case["expected"]):
            expected = pd.read_csv(FIXTURE / expected_file)[COLUMNS].to_numpy()
            err = float(np.max(np.abs(got[COLUMNS].to_numpy() - expected) / (np.abs(expected) + eps)))
            assert err <= rel_tol, f"{case['name']}: relative error {err:.2e}"


def _synthetic(n: int, pred_len: int, seed: int):
    """The inference benchmark's random-walk 5-minute series (benchmarks/inference.py: synthetic_series)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bench_inference", FIXTURE.parents[2] / "benchmarks" / "inference.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.synthetic_series(n, pred_len, seed)


def test_greedy_cached_equals_uncached_on_cuda() -> None:
    # On GPU the one-token and full-length attention kernels differ; greedy tokens (hence forecasts) must not.
    torch.manual_seed(0)
    predictor = KronosPredictor(build_predictor("small"), build_tokenizer("base"), device="cuda", max_context=512)
    series = [_synthetic(400, 100, i) for i in range(4)]
    dfs, xts, yts = (list(v) for v in zip(*series))
    kw = dict(T=1.0, top_k=1, top_p=1.0, sample_count=1, verbose=False)
    cached = predictor.predict_batch(dfs, xts, yts, 100, use_cache=True, **kw)
    plain = predictor.predict_batch(dfs, xts, yts, 100, use_cache=False, **kw)
    for a, b in zip(cached, plain):
        pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("preset", sorted(TOKENIZER_PRESETS))
def test_one_bf16_tokenizer_step(preset: str) -> None:
    torch.manual_seed(0)
    precision = resolve_precision(Config(precision="bf16"), CUDA)
    model = build_tokenizer(preset).to(CUDA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 101, 6, device=CUDA)
    with precision.compute():
        with precision.autocast():
            (z_pre, z), bsq_loss, _, _ = model(x)
            loss = (F.mse_loss(z_pre.float(), x) + F.mse_loss(z.float(), x) + bsq_loss) / 2
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
    assert math.isfinite(loss.item()) and math.isfinite(norm.item())
    assert bsq_loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("preset", sorted(PREDICTOR_PRESETS))
def test_one_bf16_predictor_step(preset: str) -> None:
    torch.manual_seed(0)
    precision = resolve_precision(Config(precision="bf16"), CUDA)
    model = build_predictor(preset).to(CUDA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    b, n = 8, 101
    s1 = torch.randint(0, 2**model.s1_bits, (b, n), device=CUDA)
    s2 = torch.randint(0, 2**model.s2_bits, (b, n), device=CUDA)
    stamp = torch.zeros(b, n, 5, device=CUDA)
    with precision.compute():
        with precision.autocast():
            l1, l2 = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:])
            loss = (
                F.cross_entropy(l1.float().reshape(-1, l1.shape[-1]), s1[:, 1:].reshape(-1))
                + F.cross_entropy(l2.float().reshape(-1, l2.shape[-1]), s2[:, 1:].reshape(-1))
            ) / 2
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
    assert math.isfinite(loss.item()) and math.isfinite(norm.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_compiled_losses_equal_eager_on_cuda() -> None:
    # Inductor's fused CUDA kernels against eager, fp32, tiny presets (compile time stays small).
    torch.manual_seed(0)
    tok, model = build_tokenizer("tiny").to(CUDA).train(), build_predictor("tiny").to(CUDA).train()
    x = torch.randn(4, 32, 6, device=CUDA)
    s1 = torch.randint(0, 2**model.s1_bits, (4, 32), device=CUDA)
    s2 = torch.randint(0, 2**model.s2_bits, (4, 32), device=CUDA)
    stamp = torch.zeros(4, 32, 5, device=CUDA)

    def tok_loss(m, x):
        (z_pre, z), bsq_loss, _, _ = m(x)
        return (F.mse_loss(z_pre, x) + F.mse_loss(z, x) + bsq_loss) / 2

    def pred_loss(m, s1, s2, stamp):
        l1, l2 = m(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:])
        return (
            F.cross_entropy(l1.reshape(-1, l1.shape[-1]), s1[:, 1:].reshape(-1))
            + F.cross_entropy(l2.reshape(-1, l2.shape[-1]), s2[:, 1:].reshape(-1))
        ) / 2

    for fn, args in ((tok_loss, (tok, x)), (pred_loss, (model, s1, s2, stamp))):
        torch._dynamo.reset()
        eager = fn(*args)
        compiled = torch.compile(fn, fullgraph=True)(*args)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_resume_round_trip_on_cuda(tmp_path: Path, dataset: Path) -> None:
    # checkpoints/last/ written from CUDA tensors (weights, AdamW moments, RNG incl. CUDA) reload onto CUDA exactly.
    cfg = tiny_config(tmp_path, dataset, device="cuda", precision="auto", epochs=1, checkpoint_interval=0)
    first = Trainer(get_stage("tokenizer", cfg), cfg, DistContext(device=CUDA))
    first.setup()
    first.fit()
    assert first.precision.name == "bf16"
    resumed = Trainer(get_stage("tokenizer", cfg), cfg, DistContext(device=CUDA))
    resumed.setup(resume=True)
    assert (resumed.epoch, resumed.global_step) == (first.epoch, first.global_step)
    for (k, a), b in zip(first.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert a.device.type == b.device.type == "cuda" and torch.equal(a, b), k
    sa, sb = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i, state in sa["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(sb["state"][i][k]).cpu()), (i, k)
    assert first.scheduler.state_dict()["last_epoch"] == resumed.scheduler.state_dict()["last_epoch"]


def test_full_training_run_on_cuda_restores_tf32(tmp_path: Path, dataset: Path) -> None:
    summary = train_tokenizer(tiny_config(tmp_path, dataset, device="cuda", precision="auto", epochs=1))
    assert summary["precision"] == "bf16" and summary["device"].startswith("cuda")
    # the autouse fixture asserts TF32 is off again
