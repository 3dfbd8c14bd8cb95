"""Transformer building blocks shared by the Kronos tokenizer and predictor.

Parameter names, shapes and numerics follow the official checkpoints (spec sections 1.4 and 2). The self-attention
module additionally supports an incremental key/value cache for fast autoregressive inference; without a cache it
computes exactly what the official module computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kronos.errors import InputError

# True while torch.compile traces (a constant to dynamo); torch.compiler.is_compiling is torch >= 2.3.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, d_model: int, ff_dim: int, ffn_dropout_p: float = 0.0) -> None:
        super().__init__()
        # Registration order w1, w3, w2 matches the official state dict (and its seeded init order).
        self.w1 = nn.Linear(d_model, ff_dim, bias=False)
        self.w3 = nn.Linear(d_model, ff_dim, bias=False)
        self.w2 = nn.Linear(ff_dim, d_model, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryPositionalEmbedding(nn.Module):
    """GPT-NeoX style RoPE (rotate-half, base 10000); ``inv_freq`` is a persistent buffer as in the checkpoints.

    The cos/sin table is memoised as a plain attribute (not a buffer, so the state dict is unchanged) and rebuilt
    when the device or the stored ``inv_freq`` changes. Slicing a longer table gives exactly the values a shorter
    table would have, so cached and uncached paths see identical angles.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        self._table: tuple | None = None  # (key, cos, sin)

    def _angles(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions ``0..length-1``, shaped ``[1, 1, length, dim]`` (elementwise, so a slice of a longer
        table equals a shorter table)."""
        t = torch.arange(length, device=self.inv_freq.device).type_as(self.inv_freq)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions ``start .. start+length-1``, shaped ``[1, 1, length, dim]``."""
        end = start + length
        if _is_compiling():
            # Under torch.compile the table is part of the graph (fused, no Python-side memo): no graph breaks.
            cos, sin = self._angles(end)
            return cos[:, :, start:end].to(device), sin[:, :, start:end].to(device)
        try:
            version = self.inv_freq._version
        except RuntimeError:  # an inference tensor has no version counter
            version = -1
        key = (self.inv_freq.device, self.inv_freq.data_ptr(), version)
        table = self._table
        if table is None or table[0] != key or table[1].shape[2] < end:
            size = 512  # grow geometrically so that step-by-step decoding does not rebuild the table each step
            while size < end:
                size *= 2
            # Built outside inference mode so the memoised table is usable for training afterwards.
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self._angles(size)
            self._table = table = (key, cos, sin)
        cos, sin = table[1][:, :, start:end], table[2][:, :, start:end]
        if cos.device != device:
            cos, sin = cos.to(device), sin.to(device)
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_half(x) * sin

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k with positions ``0..Lq-1``; the table length follows the query and broadcasts onto
        the keys (analysis §4.5 and quirk Q2: this is what makes the length-1 inference query of the dependency layer
        position-free)."""
        cos, sin = self.cos_sin(0, q.shape[-2], q.device)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


class KVCache:
    """Preallocated keys and values ``[B, H, capacity, hd]`` of one attention module."""

    def __init__(self, batch: int, n_heads: int, head_dim: int, capacity: int, device, dtype) -> None:
        self.k = torch.empty(batch, n_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)

    def share_prefix(self, src: KVCache, length: int, paths: int) -> None:
        """Copy the first ``length`` positions of ``src`` (``B`` rows) into every one of this cache's ``B * paths``
        rows (series-major: rows ``b * paths .. b * paths + paths - 1`` get ``src`` row ``b``)."""
        batch = src.k.shape[0]
        for a, b in ((src.k, self.k), (src.v, self.v)):
            b.view(batch, paths, *b.shape[1:])[:, :, :, :length] = a[:, None, :, :length]


def _check_padding_mask(mask: torch.Tensor | None) -> None:
    if mask is not None:
        # No official path passes a padding mask (MODEL_ARCHITECTURE_ANALYSIS.md §4.3) and their semantics are
        # inconsistent.
        raise InputError("padding masks are not supported by Kronos attention; pass padding_mask=None")


class _ProjectedAttention(nn.Module):
    """What both attention layers share: q/k/v/out projections with biases, RoPE over the head dim, dropouts."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryPositionalEmbedding(self.head_dim)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).contiguous().view(b, n, -1))


class MultiHeadAttentionWithRoPE(_ProjectedAttention):
    """Causal multi-head self-attention with RoPE and biases (always causal, also in eval: Q4)."""

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Attend over the input (positions ``0..L-1``), or, with ``cache``, over the cached prefix plus the input
        placed at positions ``start_pos..start_pos+L-1`` (the new keys/values are written into the cache)."""
        _check_padding_mask(key_padding_mask)
        b, n, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        cos, sin = self.rotary.cos_sin(start_pos, n, x.device)
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        dropout = self.attn_dropout_p if self.training else 0.0
        if cache is not None:
            end = start_pos + n
            cache.k[:, :, start_pos:end] = k
            cache.v[:, :, start_pos:end] = v
            if start_pos > 0:
                keys, values = cache.k[:, :, :end], cache.v[:, :, :end]
                if n == 1:  # one new query sees every cached position
                    out = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout)
                else:
                    idx = torch.arange(end, device=x.device)
                    mask = idx[None, :] <= (start_pos + torch.arange(n, device=x.device))[:, None]
                    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout)
                return self.resid_dropout(self._merge(out))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_dropout(self._merge(out))


class MultiHeadCrossAttentionWithRoPE(_ProjectedAttention):
    """Cross-attention of the dependency layer (queries from the sibling embedding, keys/values from the context).

    Q2: the RoPE table length follows the query, so a length-1 inference query rotates q and all keys by angle 0
    (no positional encoding); the causal flag follows ``self.training`` (Q4). ``positioned_query = True`` is the
    optional fix (query at position Lk-1, keys at 0..Lk-1); default off, as in the official code.
    """

    def __init__(self, d_model: int, n_heads: int = 4, attn_dropout_p: float = 0.0, resid_dropout: float = 0.0):
        super().__init__(d_model, n_heads, attn_dropout_p, resid_dropout)
        self.positioned_query = False  # Q2 fix, off by default (not a constructor argument: config stays official)
        # Q4: causal also in eval mode when set (the trainer's causal validation loss); never saved in config.json.
        self.causal_in_eval = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_padding_mask(key_padding_mask)
        nq = query.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        nk = k.shape[2]
        if self.positioned_query and nq == 1 and nk > 1:
            q, k = self._rotate_positioned(q, k)
        else:
            q, k = self.rotary(q, k)  # Q2: table length from the query
        causal = self.training or self.causal_in_eval  # Q4: causal flag tied to train mode (official)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout_p if self.training else 0.0, is_causal=causal
        )
        return self.resid_dropout(self._merge(out))

    def _rotate_positioned(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nk = k.shape[2]
        cos, sin = self.rotary.cos_sin(0, nk, k.device)
        k = self.rotary.rotate(k, cos, sin)
        q = self.rotary.rotate(q, cos[:, :, -1:], sin[:, :, -1:])
        return q, k

    def project_keys(self, context: torch.Tensor, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, L, hd]`` of context rows at positions ``start_pos..`` (for the cached step)."""
        k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        if self.positioned_query:
            cos, sin = self.rotary.cos_sin(start_pos, k.shape[2], k.device)
            k = self.rotary.rotate(k, cos, sin)
        # Q2: without the fix, a length-1 query rotates keys by angle 0, an exact identity, so nothing to do.
        return k, v

    def attend_cached(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Inference step: one query per row ``[B, 1, D]`` over cached keys/values ``[B, H, L, hd]``, no mask."""
        q = self._heads(self.q_proj(query))
        if self.positioned_query and keys.shape[2] > 1:
            cos, sin = self.rotary.cos_sin(keys.shape[2] - 1, 1, q.device)
            q = self.rotary.rotate(q, cos, sin)
        return self._merge(F.scaled_dot_product_attention(q, keys, values))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(norm1(x))`` then ``x + FFN(norm2(x))``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_dim: int = 1024,
        ffn_dropout_p: float = 0.0,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.self_attn = MultiHeadAttentionWithRoPE(d_model, n_heads, attn_dropout_p, resid_dropout_p)
        self.norm2 = RMSNorm(d_model)
        self.ffn = FeedForward(d_model, ff_dim, ffn_dropout_p)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), key_padding_mask, cache=cache, start_pos=start_pos)
        return x + self.ffn(self.norm2(x))
