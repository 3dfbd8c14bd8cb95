"""Sampling filters and KV-cached generation: cached == uncached (greedy) in every window regime."""

from __future__ import annotations

import pytest
import torch

from _support.models import tiny_pair
from kronos.inference import SamplingConfig, auto_regressive_inference, generate_tokens, sample_forecasts
from kronos.inference.sampling import sample_from_logits, top_k_top_p_filtering

NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- sampling
def test_top_k_keeps_ties_and_ignores_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.5]])
    out = top_k_top_p_filtering(logits.clone(), top_k=1, top_p=0.1)
    assert torch.equal(torch.isinf(out), torch.tensor([[True, False, True, False, True]]))  # ties kept (Q8)
    out = top_k_top_p_filtering(logits.clone(), top_k=3, top_p=0.01)
    assert torch.isinf(out).tolist() == [[True, False, False, False, True]]  # top_p ignored (Q8)
    both = top_k_top_p_filtering(torch.tensor([[0.0, 3.0, 2.9, 1.0]]), top_k=3, top_p=0.3, top_k_then_top_p=True)
    assert torch.isinf(both).tolist() == [[True, False, True, True]]


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    keep = ~torch.isinf(top_k_top_p_filtering(logits.clone(), top_k=0, top_p=0.7))
    assert keep.tolist() == [[False, True, False, True]]  # 0.5 + 0.3 crosses 0.7: both kept
    keep = ~torch.isinf(top_k_top_p_filtering(logits.clone(), top_k=0, top_p=0.1))
    assert keep.tolist() == [[False, True, False, False]]  # the top token is always kept
    assert torch.equal(top_k_top_p_filtering(logits.clone(), top_k=0, top_p=1.0), logits)


def test_sample_from_logits_greedy_and_seeded():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(64), logits.argmax(-1)] += 0.01  # a clear arg-max in every row (randn can nearly tie)
    assert torch.equal(sample_from_logits(logits, 0.7, top_k=1)[:, 0], logits.argmax(-1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_from_logits(logits, 1.0, 0, 0.9, generator=g1)
    b = sample_from_logits(logits, 1.0, 0, 0.9, generator=g2)
    assert a.shape == (64, 1) and a.dtype == torch.int64 and torch.equal(a, b)
    # low temperature concentrates on the arg-max
    cold = sample_from_logits(logits, 1e-4, 0, 1.0, generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(cold, logits.argmax(-1))


# ---------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def models():
    tokenizer, model = tiny_pair(seed=11, jitter=0.2, sharpen=("proj_s1", "proj_s2"))  # sharper logits than the init
    return tokenizer.eval(), model.eval()


def _inputs(n: int, t: int, p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 6, generator=g)
    steps = torch.arange(t + p)
    stamp = torch.stack([steps % 60, (steps // 60) % 24, (steps // 1440) % 7, 1 + steps % 28, 1 + steps % 12], -1)
    stamp = stamp.float().expand(n, -1, -1)
    return x, stamp[:, :t].contiguous(), stamp[:, t:].contiguous()


REGIMES = {
    "no_slide": dict(t=20, p=8, m=64),
    "fills_exactly": dict(t=20, p=6, m=25),  # last step's window is exactly max_context
    "slide_mid_generation": dict(t=20, p=12, m=25),
    "context_longer_than_max": dict(t=40, p=6, m=16),
    "max_context_1": dict(t=5, p=4, m=1),
}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("n,samples", [(1, 1), (3, 2)])
def test_cached_equals_uncached_greedy(models, regime, n, samples):
    tokenizer, model = models
    r = REGIMES[regime]
    x, xs, ys = _inputs(n, r["t"], r["p"])
    greedy = SamplingConfig(T=1.0, top_k=1, top_p=1.0)
    runs = [
        sample_forecasts(tokenizer, model, x, xs, ys, r["p"], r["m"], 5, samples, greedy, use_cache=c)
        for c in (True, False)
    ]
    assert runs[0].shape == (n, samples, r["p"], 6)
    if samples == 1:
        assert torch.equal(runs[0], runs[1])
    else:  # same tokens; the shared-prefix tokenizer decode may differ from the full decode by float rounding
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-6)
    # tokens too, straight from generate_tokens on the encoded history
    s1, s2 = tokenizer.encode(x, half=True)
    stamps = torch.cat([xs, ys], 1)
    a = generate_tokens(model, s1, s2, stamps, r["p"], r["m"], greedy, use_cache=True, paths=samples)
    b = generate_tokens(model, s1, s2, stamps, r["p"], r["m"], greedy, use_cache=False, paths=samples)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, : r["t"]], s1.repeat_interleave(samples, 0))  # the history is kept in front


@pytest.mark.parametrize("regime", list(REGIMES))
def test_shared_prefix_equals_per_path_recomputation_when_sampling(models, regime):
    """Sharing the context's keys/values across sample paths changes no token and no random draw: for a fixed seed
    the shared-prefix path, the per-path cached path and the reference path draw identical tokens, and the decoded
    forecasts agree to float rounding (the shared tokenizer decode sums in another order)."""
    tokenizer, model = models
    r = REGIMES[regime]
    x, xs, ys = _inputs(3, r["t"], r["p"], seed=7)
    cfg = SamplingConfig(T=1.0, top_k=0, top_p=0.9)
    s1, s2 = tokenizer.encode(x, half=True)
    stamps = torch.cat([xs, ys], 1)
    tokens = [
        generate_tokens(
            model,
            s1,
            s2,
            stamps,
            r["p"],
            r["m"],
            cfg,
            use_cache=c,
            share_prefix=sp,
            paths=4,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        for c, sp in ((True, True), (True, False), (False, False))
    ]
    for other in tokens[1:]:
        assert torch.equal(tokens[0][0], other[0]) and torch.equal(tokens[0][1], other[1])
    assert len({tuple(row.tolist()) for row in tokens[0][0]}) > 3  # paths of a series differ (not only series)
    runs = [
        sample_forecasts(
            tokenizer,
            model,
            x,
            xs,
            ys,
            r["p"],
            r["m"],
            5,
            4,
            cfg,
            use_cache=c,
            share_prefix=sp,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        for c, sp in ((True, True), (True, False), (False, False))
    ]
    assert torch.equal(runs[1], runs[2])  # per-path cached == reference, bit for bit
    torch.testing.assert_close(runs[0], runs[2], rtol=0, atol=1e-6)


def test_seed_reproducibility_and_paths_differ(models):
    tokenizer, model = models
    x, xs, ys = _inputs(2, 16, 6)
    cfg = SamplingConfig(T=1.0, top_k=0, top_p=0.9)

    def run(seed):
        return sample_forecasts(tokenizer, model, x, xs, ys, 6, 32, 5, 4, cfg,
                                generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[:, 0], a[:, 1])  # sample paths differ from each other


def test_batching_and_chunking_do_not_change_greedy_results(models):
    tokenizer, model = models
    x, xs, ys = _inputs(4, 18, 5, seed=3)
    greedy = SamplingConfig(top_k=1, top_p=1.0)
    whole = sample_forecasts(tokenizer, model, x, xs, ys, 5, 16, 5, 2, greedy)
    chunked = sample_forecasts(tokenizer, model, x, xs, ys, 5, 16, 5, 2, greedy, batch_size=3)
    single = torch.cat([sample_forecasts(tokenizer, model, x[i : i + 1], xs[i : i + 1], ys[i : i + 1], 5, 16, 5, 2,
                                         greedy) for i in range(4)])  # fmt: skip
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(whole, single, atol=1e-6, rtol=1e-5)


def test_window_semantics(models):
    tokenizer, model = models
    x, xs, ys = _inputs(1, 30, 4, seed=4)
    greedy = SamplingConfig(top_k=1, top_p=1.0)
    base = sample_forecasts(tokenizer, model, x, xs, ys, 4, 12, 5, 1, greedy)
    ys2 = ys.clone()
    ys2[:, -1] = torch.tensor([7.0, 3.0, 2.0, 9.0, 4.0])
    assert torch.equal(base, sample_forecasts(tokenizer, model, x, xs, ys2, 4, 12, 5, 1, greedy))  # Q9
    x2 = x.clone()
    x2[:, :3] = -x2[:, :3]  # history before the window still matters through the tokenizer (Q7)
    s1a, _ = tokenizer.encode(x, half=True)
    s1b, _ = tokenizer.encode(x2, half=True)
    assert not torch.equal(s1a[:, -12:], s1b[:, -12:])


def test_official_style_entry_point_and_mode_restored(models):
    tokenizer, model = models
    x, xs, ys = _inputs(2, 16, 5)
    model.train()
    try:
        mean = auto_regressive_inference(tokenizer, model, x, xs, ys, 32, 5, clip=5, T=1.0, top_k=1, top_p=1.0,
                                         sample_count=3)  # fmt: skip
        assert model.training  # generation runs in eval mode and restores the caller's mode
    finally:
        model.eval()
    assert mean.shape == (2, 5, 6)
    samples = sample_forecasts(tokenizer, model, x, xs, ys, 5, 32, 5, 3, SamplingConfig(top_k=1, top_p=1.0))
    assert (samples.mean(1).numpy() - mean).max() < 1e-6
