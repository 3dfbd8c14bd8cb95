"""Model semantics the trainer and the inference code rely on (spec 2-4, quirks Q1-Q6, Q16)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _support.models import tiny_pair
from kronos.errors import InputError
from kronos.model import build_predictor, build_tokenizer
from kronos.model.layers import RMSNorm, RotaryPositionalEmbedding
from kronos.model.quantizer import BinarySphericalQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tokenizer():
    return tiny_pair(seed=0)[0].eval()


@pytest.fixture
def predictor():
    return tiny_pair(seed=0, jitter=0.1)[1].eval()  # jitter: non-zero biases/norms so that wrong wiring shows


def test_rmsnorm_and_rotary_values():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    expected = x / torch.sqrt((x**2).mean() + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    rope = RotaryPositionalEmbedding(8)
    torch.testing.assert_close(rope.inv_freq, torch.tensor([10000 ** (-2 * i / 8) for i in range(4)]))
    q = torch.randn(1, 1, 3, 8)
    rq, _ = rope(q, q)
    theta = 2 * rope.inv_freq  # position 2, rotate-half pairs (j, j+4)
    a, b = q[0, 0, 2, :4], q[0, 0, 2, 4:]
    torch.testing.assert_close(rq[0, 0, 2], torch.cat([a * theta.cos() - b * theta.sin(),
                                                       b * theta.cos() + a * theta.sin()]))  # fmt: skip


def test_tokenizer_layers_and_forward(tokenizer):
    assert len(tokenizer.encoder) == 1 and len(tokenizer.decoder) == 1  # Q1: n_enc_layers - 1
    x = torch.randn(3, 20, 6)
    tokenizer.train()
    (x_pre, x_hat), bsq_loss, quantized, indices = tokenizer(x)
    assert x_pre.shape == x_hat.shape == x.shape
    assert bsq_loss.dim() == 0 and bsq_loss.requires_grad
    k = tokenizer.codebook_dim
    torch.testing.assert_close(quantized.abs(), torch.full_like(quantized, 1 / math.sqrt(k)))
    tokenizer.eval()
    s1, s2 = tokenizer.encode(x, half=True)
    assert torch.equal(indices, s1 + (s2 << tokenizer.s1_bits))  # composite id: s1 in the low bits
    assert torch.equal(tokenizer.encode(x, half=False), indices)
    # x_hat is the full-code reconstruction; decode(encode) reproduces it in eval mode
    torch.testing.assert_close(tokenizer.decode([s1, s2], half=True), x_hat.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tokenizer.decode(indices), x_hat.detach(), atol=1e-6, rtol=1e-5)
    # gradients reach the encoder through the straight-through estimator
    tokenizer.train()
    (x_pre, x_hat), bsq_loss, _, _ = tokenizer(x)
    (F.mse_loss(x_hat, x) + F.mse_loss(x_pre, x) + bsq_loss).backward()
    assert tokenizer.embed.weight.grad.abs().sum() > 0
    assert tokenizer.post_quant_embed_pre.weight.grad.abs().sum() > 0


def test_bits_are_lsb_first_within_each_half(tokenizer):
    q = tokenizer.indices_to_bits([torch.tensor([[5]]), torch.tensor([[8]])], half=True)[0, 0]
    signs = (q > 0).int().tolist()
    assert signs == [1, 0, 1, 0] + [0, 0, 0, 1]  # s1 = 5 = 0b0101, s2 = 8 = 0b1000 (Q5)
    # the sign pattern of the latent gives the ids
    z = torch.tensor([[[0.3, -0.1, 0.2, -0.5, -0.1, -0.2, -0.3, 0.4]]])
    _, _, (s1, s2) = tokenizer.tokenizer(z, half=True, compute_loss=False)
    assert s1.item() == 5 and s2.item() == 8


def test_causal_tokenizer_encodes_prefix_identically(tokenizer):
    x = torch.randn(2, 30, 6)
    s1_full, s2_full = tokenizer.encode(x, half=True)
    s1_pre, s2_pre = tokenizer.encode(x[:, :17], half=True)
    assert torch.equal(s1_full[:, :17], s1_pre) and torch.equal(s2_full[:, :17], s2_pre)


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_bsq_loss_formula(group_size):
    torch.manual_seed(3)
    beta, gamma0, gamma, zeta, k = 0.05, 1.0, 1.1, 0.05, 8
    bsq = BinarySphericalQuantizer(k, beta, gamma0, gamma, zeta, group_size)
    u = F.normalize(torch.randn(4, 10, k), dim=-1)
    q, loss, metrics = bsq(u)
    signs = torch.where(u > 0, 1.0, -1.0) / math.sqrt(k)
    torch.testing.assert_close(q, signs)
    commit = beta * ((signs - u) ** 2).sum(-1).mean()
    p = torch.sigmoid(-4 * u / math.sqrt(k))

    def h(pp):
        return -pp * torch.log(pp + 1e-8) - (1 - pp) * torch.log(1 - pp + 1e-8)

    per_sample = h(p).sum(-1).mean()
    codebook = h(p.reshape(-1, k).mean(0)).sum()
    expected = commit + zeta * (gamma0 * per_sample - gamma * codebook)
    torch.testing.assert_close(loss, expected)  # Q12: identical for every group size
    torch.testing.assert_close(metrics["codebook_entropy"], codebook)


def test_predictor_forward_modes(predictor):
    torch.manual_seed(1)
    b, n = 2, 12
    s1 = torch.randint(0, 16, (b, n))
    s2 = torch.randint(0, 16, (b, n))
    stamp = torch.stack([torch.randint(0, 60, (b, n)), torch.randint(0, 24, (b, n)), torch.randint(0, 7, (b, n)),
                         torch.randint(1, 32, (b, n)), torch.randint(1, 13, (b, n))], -1).float()  # fmt: skip
    target = torch.randint(0, 16, (b, n))
    predictor.train()
    s1_logits, s2_logits = predictor(s1, s2, stamp, use_teacher_forcing=True, s1_targets=target)
    assert s1_logits.shape == (b, n, 16) and s2_logits.shape == (b, n, 16)
    # train mode: causal cross-attention with aligned positions -> position i ignores later context (Q2/Q4)
    s1b, s2b = s1.clone(), s2.clone()
    s1b[:, 8:] = (s1b[:, 8:] + 1) % 16
    _, s2_logits_b = predictor(s1b, s2b, stamp, use_teacher_forcing=True, s1_targets=target)
    torch.testing.assert_close(s2_logits[:, :8], s2_logits_b[:, :8])
    # eval mode with full-length queries: non-causal (Q4), earlier positions see the change
    predictor.eval()
    _, s2_eval = predictor(s1, s2, stamp, use_teacher_forcing=True, s1_targets=target)
    _, s2_eval_b = predictor(s1b, s2b, stamp, use_teacher_forcing=True, s1_targets=target)
    assert not torch.allclose(s2_eval[:, :8], s2_eval_b[:, :8])
    # sampled sibling (the released scripts' behaviour, Q13) runs and is reproducible under a seed
    torch.manual_seed(7)
    a = predictor(s1, s2, stamp)[1]
    torch.manual_seed(7)
    torch.testing.assert_close(a, predictor(s1, s2, stamp)[1])
    with pytest.raises(InputError, match="padding masks are not supported"):
        predictor(s1, s2, stamp, padding_mask=torch.ones(b, n, dtype=torch.bool))


def _manual_inference_s2(model, context, s1_last):
    """Spec 4.4 inference formula: no RoPE, no mask, 4 heads, residual on the last context row."""
    attn = model.dep_layer.cross_attn
    g = model.embedding.emb_s1(s1_last)[:, None]  # unscaled sibling embedding (Q3)
    q = attn.q_proj(g).view(g.shape[0], 1, 4, -1).transpose(1, 2)
    k = attn.k_proj(context).view(context.shape[0], -1, 4, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(context).view(context.shape[0], -1, 4, attn.head_dim).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    out = attn.out_proj((w @ v).transpose(1, 2).reshape(g.shape[0], 1, -1))[:, 0]
    return model.head.proj_s2(model.dep_layer.norm(context[:, -1] + out))


def test_inference_dependency_layer_and_cached_paths(predictor):
    torch.manual_seed(2)
    b, n = 3, 15
    s1 = torch.randint(0, 16, (b, n))
    s2 = torch.randint(0, 16, (b, n))
    stamp = torch.zeros(b, n, 5)
    sampled = torch.randint(0, 16, (b,))
    with torch.no_grad():
        logits1, context = predictor.decode_s1(s1, s2, stamp)
        official = predictor.decode_s2(context, sampled[:, None])[:, -1]
        torch.testing.assert_close(official, _manual_inference_s2(predictor, context, sampled), atol=1e-5, rtol=1e-5)
        # the cached path: prefill 10 tokens, then 2 at once (masked append), then 3 single steps
        cache = predictor.new_cache(b, 32)
        parts = [predictor.forward_cached(s1[:, :10], s2[:, :10], stamp[:, :10], cache),
                 predictor.forward_cached(s1[:, 10:12], s2[:, 10:12], stamp[:, 10:12], cache)]  # fmt: skip
        for i in range(12, n):
            parts.append(predictor.forward_cached(s1[:, i : i + 1], s2[:, i : i + 1], stamp[:, i : i + 1], cache))
        torch.testing.assert_close(torch.cat(parts, 1), context, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(predictor.head(parts[-1][:, -1]), logits1[:, -1], atol=1e-5, rtol=1e-5)
        cached = predictor.decode_s2_cached(parts[-1][:, -1], sampled, cache)
        torch.testing.assert_close(cached, official, atol=1e-5, rtol=1e-5)

        # Q2 fix option: positions for the query (L-1) and keys (0..L-1) change the outputs; cached path agrees.
        predictor.positioned_dep_query = True
        try:
            fixed = predictor.decode_s2(context, sampled[:, None])[:, -1]
            assert not torch.allclose(fixed, official)
            cache = predictor.new_cache(b, 32)
            ctx = predictor.forward_cached(s1, s2, stamp, cache)
            torch.testing.assert_close(predictor.decode_s2_cached(ctx[:, -1], sampled, cache), fixed,
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
        finally:
            predictor.positioned_dep_query = False
    assert "positioned" not in str(predictor.config)


def test_composite_token_split_quirk(predictor):
    # Q16: the embedding's composite splitter treats the HIGH bits as s1
    s1, s2 = predictor.embedding.split_token(torch.tensor([3 * 16 + 5]))
    assert (s1.item(), s2.item()) == (3, 5)


def test_initialisation():
    torch.manual_seed(0)
    model = build_predictor({"preset": "tiny", "d_model": 64, "ff_dim": 256}).requires_grad_(False)
    w = model.transformer[0].ffn.w1.weight  # Xavier normal: std sqrt(2 / (fan_in + fan_out))
    assert abs(float(w.std()) - math.sqrt(2 / (64 + 256))) < 0.01
    assert torch.all(model.transformer[0].self_attn.q_proj.bias == 0)
    assert abs(float(model.embedding.emb_s1.weight.std()) - 64**-0.5) < 0.03
    assert abs(float(model.time_emb.month_embed.weight.std()) - 64**-0.5) < 0.03
    assert torch.all(model.norm.weight == 1)
    tok = build_tokenizer("tiny").requires_grad_(False)  # framework default init: non-zero biases within 1/sqrt(fan_in)
    bias = tok.embed.bias
    assert bias.abs().max() <= 1 / math.sqrt(6) and bias.abs().sum() > 0
