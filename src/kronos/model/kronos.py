"""Kronos: the decoder-only autoregressive predictor over (s1, s2) tokens, and the published size presets.

The module reproduces the official ``Kronos`` class (constructor, state dict, numerics; MODEL_ARCHITECTURE_ANALYSIS.md
§4). On top of the
official ``forward`` / ``decode_s1`` / ``decode_s2`` it offers an incremental path with a key/value cache
(:meth:`Kronos.new_cache`, :meth:`Kronos.forward_cached`, :meth:`Kronos.decode_s2_cached`) used by fast generation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kronos.errors import ConfigError, InputError
from kronos.model.hub import CheckpointMixin
from kronos.model.layers import KVCache, MultiHeadCrossAttentionWithRoPE, RMSNorm, TransformerBlock
from kronos.model.tokenizer import KronosTokenizer


class HierarchicalEmbedding(nn.Module):
    """``fusion_proj([sqrt(D) E1[s1], sqrt(D) E2[s2]])`` (analysis §4.1)."""

    def __init__(self, s1_bits: int, s2_bits: int, d_model: int) -> None:
        super().__init__()
        self.s1_bits = s1_bits
        self.s2_bits = s2_bits
        self.d_model = d_model
        self.emb_s1 = nn.Embedding(2**s1_bits, d_model)
        self.emb_s2 = nn.Embedding(2**s2_bits, d_model)
        nn.init.normal_(self.emb_s1.weight, mean=0, std=d_model**-0.5)
        nn.init.normal_(self.emb_s2.weight, mean=0, std=d_model**-0.5)
        self.fusion_proj = nn.Linear(2 * d_model, d_model)

    def split_token(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split composite ids. Q16 (MODEL_ARCHITECTURE_ANALYSIS.md §8): the official splitter treats the HIGH bits
        as s1 (the tokenizer's ``encode(half=False)`` puts s1 in the low bits); kept for compatibility, prefer
        passing (s1, s2) pairs."""
        s2 = token_ids & ((1 << self.s2_bits) - 1)
        s1 = token_ids >> self.s2_bits
        return s1, s2

    def forward(self, token_ids) -> torch.Tensor:
        if isinstance(token_ids, (tuple, list)):
            s1, s2 = token_ids
        else:
            s1, s2 = self.split_token(token_ids)
        scale = math.sqrt(self.d_model)
        return self.fusion_proj(torch.cat([self.emb_s1(s1) * scale, self.emb_s2(s2) * scale], dim=-1))


class FixedEmbedding(nn.Module):
    """Frozen sinusoidal table (``learn_te=False``); Q6: the predictor's init overwrites it with noise."""

    def __init__(self, c_in: int, d_model: int) -> None:
        super().__init__()
        table = torch.zeros(c_in, d_model).float()
        position = torch.arange(0, c_in).float().unsqueeze(1)
        div_term = (torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model)).exp()
        table[:, 0::2] = torch.sin(position * div_term)
        table[:, 1::2] = torch.cos(position * div_term)
        self.emb = nn.Embedding(c_in, d_model)
        self.emb.weight = nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x).detach()


class TemporalEmbedding(nn.Module):
    """Sum of minute/hour/weekday/day/month table look-ups (stamp fields in that order, analysis §4.2)."""

    SIZES = {"minute": 60, "hour": 24, "weekday": 7, "day": 32, "month": 13}

    def __init__(self, d_model: int, learn_pe: bool) -> None:
        super().__init__()
        make = (lambda n: nn.Embedding(n, d_model)) if learn_pe else (lambda n: FixedEmbedding(n, d_model))
        self.minute_embed = make(self.SIZES["minute"])
        self.hour_embed = make(self.SIZES["hour"])
        self.weekday_embed = make(self.SIZES["weekday"])
        self.day_embed = make(self.SIZES["day"])
        self.month_embed = make(self.SIZES["month"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        minute = self.minute_embed(x[:, :, 0])
        hour = self.hour_embed(x[:, :, 1])
        weekday = self.weekday_embed(x[:, :, 2])
        day = self.day_embed(x[:, :, 3])
        month = self.month_embed(x[:, :, 4])
        return hour + weekday + day + month + minute  # official summation order


class DependencyAwareLayer(nn.Module):
    """s2 conditioning: ``norm(context + CrossAttn(sibling, context))`` (Q3: 4 heads, residual on the context)."""

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.cross_attn = MultiHeadCrossAttentionWithRoPE(d_model, n_heads, dropout)
        self.norm = RMSNorm(d_model)

    def forward(
        self, hidden_states: torch.Tensor, sibling_embed: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn = self.cross_attn(sibling_embed, hidden_states, hidden_states, key_padding_mask=key_padding_mask)
        return self.norm(hidden_states + attn)  # Q3: residual on the context (keys), not on the query


class DualHead(nn.Module):
    """Linear heads for s1 logits and (conditioned) s2 logits."""

    def __init__(self, s1_bits: int, s2_bits: int, d_model: int) -> None:
        super().__init__()
        self.vocab_s1 = 2**s1_bits
        self.vocab_s2 = 2**s2_bits
        self.proj_s1 = nn.Linear(d_model, self.vocab_s1)
        self.proj_s2 = nn.Linear(d_model, self.vocab_s2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_s1(x)

    def cond_forward(self, x2: torch.Tensor) -> torch.Tensor:
        return self.proj_s2(x2)


@dataclass
class KronosCache:
    """Key/value cache of one generation run: one entry per trunk block plus the dependency layer's keys/values
    over the context window. ``length`` = number of valid positions (all window positions restart at 0)."""

    layers: list[KVCache]
    dep: KVCache
    capacity: int
    length: int = 0
    extra: dict = field(default_factory=dict)


class Kronos(nn.Module, CheckpointMixin):
    """The Kronos predictor with the official constructor arguments and state-dict layout."""

    def __init__(
        self,
        s1_bits: int,
        s2_bits: int,
        n_layers: int,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        ffn_dropout_p: float,
        attn_dropout_p: float,
        resid_dropout_p: float,
        token_dropout_p: float,
        learn_te: bool,
    ) -> None:
        super().__init__()
        self._record_config(locals())
        self.s1_bits = s1_bits
        self.s2_bits = s2_bits
        self.n_layers = n_layers
        self.d_model = d_model
        self.n_heads = n_heads
        self.learn_te = learn_te
        self.s1_vocab_size = 2**s1_bits
        self.embedding = HierarchicalEmbedding(s1_bits, s2_bits, d_model)
        self.time_emb = TemporalEmbedding(d_model, learn_te)
        self.token_drop = nn.Dropout(token_dropout_p)
        self.transformer = nn.ModuleList(
            [
                TransformerBlock(d_model, n_heads, ff_dim, ffn_dropout_p, attn_dropout_p, resid_dropout_p)
                for _ in range(n_layers)
            ]
        )
        self.norm = RMSNorm(d_model)
        self.dep_layer = DependencyAwareLayer(d_model)  # Q3: always 4 heads
        self.head = DualHead(s1_bits, s2_bits, d_model)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """The official initialisation: Xavier-normal Linear weights, zero biases, N(0, D^-1/2) embeddings, unit
        RMSNorm weights."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Q6: this also overwrites the "fixed" sinusoidal temporal tables (learn_te=False) with noise.
            nn.init.normal_(module.weight, mean=0, std=self.d_model**-0.5)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ Q2 option
    @property
    def positioned_dep_query(self) -> bool:
        """Q2 fix (default False = official): give the length-1 inference query of the dependency layer position
        L-1 and the keys positions 0..L-1. Changes outputs; not stored in config.json."""
        return self.dep_layer.cross_attn.positioned_query

    @positioned_dep_query.setter
    def positioned_dep_query(self, value: bool) -> None:
        self.dep_layer.cross_attn.positioned_query = bool(value)

    # ------------------------------------------------------------------ official API
    def _embed(self, s1_ids: torch.Tensor, s2_ids: torch.Tensor, stamp: torch.Tensor | None) -> torch.Tensor:
        x = self.embedding([s1_ids, s2_ids])
        if stamp is not None:
            x = x + self.time_emb(stamp)
        return self.token_drop(x)

    def forward(
        self,
        s1_ids: torch.Tensor,
        s2_ids: torch.Tensor,
        stamp: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        use_teacher_forcing: bool = False,
        s1_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training/validation pass: ``(s1_logits, s2_logits)`` ``[B, L, V1]``, ``[B, L, V2]`` (analysis §5.3).

        The s2 head is conditioned on ``s1_targets`` with teacher forcing, else on one multinomial sample per
        position of the model's own s1 distribution (Q13, what the released scripts do).
        """
        s1_logits, x = self.decode_s1(s1_ids, s2_ids, stamp, padding_mask)
        if use_teacher_forcing:
            if s1_targets is None:
                raise InputError("use_teacher_forcing=True needs s1_targets (the next-step s1 ids)")
            sibling = s1_targets
        else:
            probs = F.softmax(s1_logits.detach(), dim=-1)
            sibling = torch.multinomial(probs.reshape(-1, self.s1_vocab_size), 1).view(s1_ids.shape)
        s2_logits = self.decode_s2(x, sibling, padding_mask)
        return s1_logits, s2_logits

    def decode_s1(
        self,
        s1_ids: torch.Tensor,
        s2_ids: torch.Tensor,
        stamp: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk pass: ``(s1_logits, context)``, context = normed hidden states ``[B, L, D]`` (analysis §4.3-4.4)."""
        x = self._embed(s1_ids, s2_ids, stamp)
        for block in self.transformer:
            x = block(x, key_padding_mask=padding_mask)
        x = self.norm(x)
        return self.head(x), x

    def decode_s2(
        self, context: torch.Tensor, s1_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """s2 logits conditioned on sibling s1 ids (analysis §4.5). Q3: sibling = raw ``emb_s1`` row, no sqrt(D)."""
        sibling = self.embedding.emb_s1(s1_ids)
        x2 = self.dep_layer(context, sibling, key_padding_mask=padding_mask)
        return self.head.cond_forward(x2)

    # ------------------------------------------------------------------ incremental inference
    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> KronosCache:
        """Preallocated key/value cache for ``batch`` rows and up to ``capacity`` window positions."""
        ref = self.norm.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        layers = []
        for block in self.transformer:
            attn = block.self_attn
            layers.append(KVCache(batch, attn.n_heads, attn.head_dim, capacity, device, dtype))
        cross = self.dep_layer.cross_attn
        dep = KVCache(batch, cross.n_heads, cross.head_dim, capacity, device, dtype)
        return KronosCache(layers=layers, dep=dep, capacity=capacity)

    def forward_cached(
        self, s1_ids: torch.Tensor, s2_ids: torch.Tensor, stamp: torch.Tensor | None, cache: KronosCache
    ) -> torch.Tensor:
        """Append tokens ``[B, n]`` at window positions ``cache.length..`` and return their context ``[B, n, D]``.

        With an empty cache this computes exactly :meth:`decode_s1`'s context for the window (positions restart at
        0). The dependency layer's keys/values of the new context rows are cached too.
        """
        start = cache.length
        n = s1_ids.shape[1]
        if start + n > cache.capacity:
            raise InputError(f"KV cache overflow: {start + n} positions > capacity {cache.capacity}")
        x = self._embed(s1_ids, s2_ids, stamp)
        for block, layer_cache in zip(self.transformer, cache.layers):
            x = block(x, cache=layer_cache, start_pos=start)
        x = self.norm(x)
        k, v = self.dep_layer.cross_attn.project_keys(x, start)
        cache.dep.k[:, :, start : start + n] = k
        cache.dep.v[:, :, start : start + n] = v
        cache.length = start + n
        return x

    def decode_s2_cached(self, context_last: torch.Tensor, s1_ids: torch.Tensor, cache: KronosCache) -> torch.Tensor:
        """s2 logits ``[B, V2]`` of the last window position, given its context ``[B, D]`` and sampled s1 ``[B]``.

        Equals ``decode_s2(context, s1[:, None])[:, -1]`` in eval mode (Q2: no RoPE, no mask for the length-1
        query), using the cached keys/values of all window positions.
        """
        sibling = self.embedding.emb_s1(s1_ids.reshape(-1, 1))
        n = cache.length
        attn = self.dep_layer.cross_attn.attend_cached(sibling, cache.dep.k[:, :, :n], cache.dep.v[:, :, :n])
        x2 = self.dep_layer.norm(context_last.unsqueeze(1) + attn)  # Q3: residual on the context
        return self.head.cond_forward(x2)[:, 0]


# ---------------------------------------------------------------------- presets
_TOKENIZER_BASE = {
    "d_in": 6, "d_model": 256, "n_heads": 4, "ff_dim": 512, "n_enc_layers": 4, "n_dec_layers": 4,
    "ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "s1_bits": 10, "s2_bits": 10,
    "beta": 0.05, "gamma0": 1.0, "gamma": 1.1, "zeta": 0.05, "group_size": 4,
}  # fmt: skip

TOKENIZER_PRESETS: dict[str, dict[str, Any]] = {
    "base": dict(_TOKENIZER_BASE),  # Kronos-Tokenizer-base, 3,958,042 parameters
    "2k": {**_TOKENIZER_BASE, "group_size": 5},  # Kronos-Tokenizer-2k (for Kronos-mini)
    "tiny": {  # tests and CPU demos
        "d_in": 6, "d_model": 32, "n_heads": 4, "ff_dim": 64, "n_enc_layers": 2, "n_dec_layers": 2,
        "ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "s1_bits": 4, "s2_bits": 4,
        "beta": 0.05, "gamma0": 1.0, "gamma": 1.1, "zeta": 0.05, "group_size": 4,
    },
}  # fmt: skip

PREDICTOR_PRESETS: dict[str, dict[str, Any]] = {
    "mini": {  # Kronos-mini, 4,108,032 parameters, context 2048, Tokenizer-2k
        "s1_bits": 10, "s2_bits": 10, "n_layers": 4, "d_model": 256, "n_heads": 4, "ff_dim": 512,
        "ffn_dropout_p": 0.2, "attn_dropout_p": 0.0, "resid_dropout_p": 0.2, "token_dropout_p": 0.0,
        "learn_te": True,
    },
    "small": {  # Kronos-small, 24,741,376 parameters, context 512
        "s1_bits": 10, "s2_bits": 10, "n_layers": 8, "d_model": 512, "n_heads": 8, "ff_dim": 1024,
        "ffn_dropout_p": 0.25, "attn_dropout_p": 0.1, "resid_dropout_p": 0.25, "token_dropout_p": 0.1,
        "learn_te": True,
    },
    "base": {  # Kronos-base, 102,310,592 parameters, context 512
        "s1_bits": 10, "s2_bits": 10, "n_layers": 12, "d_model": 832, "n_heads": 16, "ff_dim": 2048,
        "ffn_dropout_p": 0.2, "attn_dropout_p": 0.0, "resid_dropout_p": 0.2, "token_dropout_p": 0.0,
        "learn_te": True,
    },
    "tiny": {  # tests and CPU demos (pairs with the "tiny" tokenizer: 4/4 bits)
        "s1_bits": 4, "s2_bits": 4, "n_layers": 2, "d_model": 32, "n_heads": 4, "ff_dim": 64,
        "ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "token_dropout_p": 0.0,
        "learn_te": True,
    },
}  # fmt: skip

# Context length each published predictor was trained with (not stored in checkpoints; MODEL_ARCHITECTURE_ANALYSIS.md
# §7).
DEFAULT_MAX_CONTEXT: dict[str, int] = {"mini": 2048, "small": 512, "base": 512, "tiny": 512}


def _resolve_preset(
    kind: str, presets: Mapping[str, dict], keys: list[str], preset_or_dict: str | Mapping[str, Any], overrides
) -> dict:
    if isinstance(preset_or_dict, str):
        if preset_or_dict not in presets:
            raise ConfigError(f"unknown {kind} preset '{preset_or_dict}'; known presets: {sorted(presets)}")
        config = copy.deepcopy(presets[preset_or_dict])
    elif isinstance(preset_or_dict, Mapping):
        config = dict(preset_or_dict)
        base = config.pop("preset", None)
        if base is not None:
            config = {**_resolve_preset(kind, presets, keys, base, {}), **config}
    else:
        raise ConfigError(f"{kind} must be a preset name {sorted(presets)} or a dict of arguments")
    config.update(overrides)
    unknown = sorted(set(config) - set(keys))
    missing = [k for k in keys if k not in config]
    if unknown or missing:
        raise ConfigError(f"{kind} config: unknown keys {unknown}, missing keys {missing}; expected {sorted(keys)}")
    return config


def build_tokenizer(preset_or_dict: str | Mapping[str, Any], **overrides: Any) -> KronosTokenizer:
    """A freshly initialised tokenizer from a preset name (``TOKENIZER_PRESETS``) or a dict of constructor args
    (a dict may name a ``"preset"`` to start from); ``overrides`` replace single arguments."""
    keys = KronosTokenizer.constructor_keys()
    return KronosTokenizer(**_resolve_preset("tokenizer", TOKENIZER_PRESETS, keys, preset_or_dict, overrides))


def build_predictor(preset_or_dict: str | Mapping[str, Any], **overrides: Any) -> Kronos:
    """A freshly initialised predictor from a preset name (``PREDICTOR_PRESETS``) or a dict of constructor args
    (a dict may name a ``"preset"`` to start from); ``overrides`` replace single arguments."""
    keys = Kronos.constructor_keys()
    return Kronos(**_resolve_preset("predictor", PREDICTOR_PRESETS, keys, preset_or_dict, overrides))
